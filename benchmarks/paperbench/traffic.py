"""
The receiver's network traffic, counted by the kernel.

Method C{iptables} (the one the figures are meant for): a chain of our own,
jumped to from INPUT for packets arriving on C{lo}, with one rule per
(protocol, port, direction).  On loopback every packet is sent and received
on this host, so each crosses INPUT exactly once: a rule matching the
source port counts what the receiver's endpoint sends, one matching the
destination port what it receives.  Bytes are iptables' counters: whole IP
packets, headers included (TCP/UDP and IP headers, ACKs, retransmissions).
The rules only count (no target), so they change no packet's fate.  Every
port of a system under test is below the kernel's ephemeral range, so a
rule never matches some unrelated client's source port.

Method C{lo-total} (fallback, when iptables is missing or we are not
root): the C{lo} interface's received-bytes counter.  It counts every
loopback packet of every program on the host, the IMAP client's included:
an upper bound, labelled as such everywhere it is reported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from paperbench.procs import run

_COMMENT = re.compile(r"/\* (p2b:\S+) \*/")
_chains = 0


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["iptables", "-w", *args], check=check)


def iptablesUsable(install: bool = True) -> str | None:
    """
    @return: L{None} if iptables can count here, else why not.  Installs
        Debian's C{iptables} when root and missing, if C{install}.
    """
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("iptables") is None and install:
        run(["apt-get", "install", "-y", "-q", "iptables"], check=False,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    probe = _iptables("-nL", "INPUT", check=False)
    if probe.returncode != 0:
        return f"iptables does not work here: {probe.stderr.strip()}"
    return None


class IptablesCounters:
    """
    Byte counters for named groups of (protocol, port) on C{lo}.

    @ivar receiverKeys: the groups that make up the receiver's traffic.
    @ivar localKeys: the groups reported apart (the local IMAP client).
    """

    method = "iptables"

    def __init__(self, counted: dict[str, list[tuple[str, int]]], local: dict[str, list[tuple[str, int]]]) -> None:
        global _chains
        _chains += 1
        self.chain = f"P2B-{os.getpid()}-{_chains}"
        self.receiverKeys = list(counted)
        self.localKeys = list(local)
        self.label = "iptables byte counters on lo (IP packets, headers included), per port"
        self._open = False
        _iptables("-N", self.chain)
        self._open = True
        try:
            for name, endpoints in {**counted, **local}.items():
                for proto, port, *whose in endpoints:
                    # Packets from the receiver's own port go out, from a
                    # remote port (the sender's outbox) come in.
                    remote = whose == ["remote"]
                    for match, direction in (("--sport", "in" if remote else "out"),
                                             ("--dport", "out" if remote else "in")):
                        _iptables("-A", self.chain, "-p", proto, match, str(port),
                                  "-m", "comment", "--comment", f"p2b:{name}:{direction}")
            _iptables("-I", "INPUT", "1", "-i", "lo", "-j", self.chain)
        except Exception:
            self.close()
            raise

    def snapshot(self) -> dict[str, int]:
        """
        @return: bytes per group (C{NAME}), and per direction seen from the
            receiver (C{NAME_in}, C{NAME_out}), and packets (C{NAME_packets}).
        """
        out = _iptables("-nvxL", self.chain).stdout
        totals = {}
        for name in self.receiverKeys + self.localKeys:
            totals.update({name: 0, f"{name}_in": 0, f"{name}_out": 0, f"{name}_packets": 0})
        for line in out.splitlines()[2:]:
            match = _COMMENT.search(line)
            if match:
                name, direction = match.group(1)[4:].rsplit(":", 1)
                packets, nbytes = (int(x) for x in line.split()[:2])
                totals[name] += nbytes
                totals[f"{name}_{direction}"] += nbytes
                totals[f"{name}_packets"] += packets
        return totals

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # Remove every jump to the chain (one, unless something went odd).
        while _iptables("-D", "INPUT", "-i", "lo", "-j", self.chain, check=False).returncode == 0:
            pass
        _iptables("-F", self.chain, check=False)
        _iptables("-X", self.chain, check=False)


class LoopbackTotal:
    """The fallback: every byte received on C{lo}, by anyone."""

    method = "lo-total"

    def __init__(self, why: str) -> None:
        self.receiverKeys = ["lo-total"]
        self.localKeys: list[str] = []
        self.label = (f"FALLBACK lo-total ({why}): all loopback traffic of the host, every port and "
                      "program, IMAP included; an upper bound, not the receiver's traffic")

    def snapshot(self) -> dict[str, int]:
        with open("/sys/class/net/lo/statistics/rx_bytes") as f:
            return {"lo-total": int(f.read())}

    def close(self) -> None:
        pass


def openCounters(counted, local, method: str = "auto", install: bool = True):
    """
    Counters for one system under test: iptables when it can be had
    (C{method} C{"auto"} or C{"iptables"}; installed when root, missing and
    C{install}), else the labelled fallback.
    """
    if method in ("auto", "iptables"):
        why = iptablesUsable(install)
        if why is None:
            return IptablesCounters(counted, local)
        if method == "iptables":
            raise RuntimeError(f"cannot count with iptables: {why}")
    else:
        why = "asked for"
    return LoopbackTotal(why)


def staleChains() -> list[str]:
    """Chains left by a benchmark that was killed (its pid is gone)."""
    if shutil.which("iptables") is None or os.geteuid() != 0:
        return []
    out = _iptables("-S", check=False).stdout
    stale = []
    for chain in re.findall(r"^-N (P2B-(\d+)-\d+)$", out, re.MULTILINE):
        if not os.path.exists(f"/proc/{chain[1]}"):
            stale.append(chain[0])
    return stale


def removeStale() -> None:
    for chain in staleChains():
        while _iptables("-D", "INPUT", "-i", "lo", "-j", chain, check=False).returncode == 0:
            pass
        _iptables("-F", chain, check=False)
        _iptables("-X", chain, check=False)
