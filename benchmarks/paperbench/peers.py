"""
p2pmta as an operator runs it: two C{twistd -n p2pmta} processes, alice
(the sender) and bob (the receiver), on 127.0.0.1, in a DHT with a few more
plain OpenDHT nodes (L{paperbench.dhtnodes}).
"""

from __future__ import annotations

import os
import sys

from paperbench.procs import Child, freePorts
from paperbench.procstat import ProcessSet

HERE = os.path.dirname(os.path.abspath(__file__))

#: twistd's own entry point, run by this very interpreter (the venv's).
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]

GROUP = "bench"
PASSWORD = "bench-pw"


class Peer:
    """One C{twistd -n p2pmta} process and its ports."""

    def __init__(self, name: str, root: str, ports: list[int]) -> None:
        self.name = name
        self.address = f"{name}@{GROUP}"
        self.dataDir = os.path.join(root, name)
        self.smtpPort, self.imapPort, self.httpPort, self.dhtPort = ports
        self.child: Child | None = None

    def start(self, root: str, bootstrap: list[int], pollInterval: float) -> None:
        argv = TWISTD + [
            "-n", "--pidfile=", "p2pmta",
            "--data-dir", self.dataDir, "--address", self.address, "--password", PASSWORD,
            "--smtp", f"tcp:{self.smtpPort}:interface=127.0.0.1",
            "--imap", f"tcp:{self.imapPort}:interface=127.0.0.1",
            "--http", f"tcp:{self.httpPort}:interface=127.0.0.1",
            "--dht-port", str(self.dhtPort), "--dht-interface", "127.0.0.1",
            "--poll-interval", str(pollInterval),
        ]
        for port in bootstrap:
            argv += ["--bootstrap", f"127.0.0.1:{port}"]
        self.child = Child(f"twistd p2pmta {self.address}", argv, os.path.join(root, f"{self.name}.log"), cwd=root)

    def processes(self) -> ProcessSet:
        """The peer's processes: twistd, its gpg children and its gpg-agent (found by its home)."""
        return ProcessSet([self.child.pid], marks=[self.dataDir])


class P2PMTASystem:
    """
    alice and bob as two twistd processes, plus C{dhtNodes} plain OpenDHT
    nodes in a helper process.  bob receives.
    """

    name = "p2pmta"

    def __init__(self, root: str, dhtNodes: int = 4, pollInterval: float = 60.0) -> None:
        self.root = root
        self.label = f"2 twistd peers + {dhtNodes} plain OpenDHT nodes"
        self.dhtNodes = dhtNodes
        self.pollInterval = pollInterval
        self.helper: Child | None = None
        ports = freePorts(8 + dhtNodes)  # in one go, so that no two are the same
        self.alice = Peer("alice", root, ports[0:4])
        self.bob = Peer("bob", root, ports[4:8])
        self.helperPorts = ports[8:]

    # What the workload needs to know

    @property
    def smtp(self):
        return ("127.0.0.1", self.alice.smtpPort, (self.alice.address, PASSWORD))

    @property
    def imap(self):
        return ("127.0.0.1", self.bob.imapPort, (self.bob.address, PASSWORD))

    mailFrom = property(lambda self: self.alice.address)
    rcptTo = property(lambda self: self.bob.address)

    def counted(self) -> dict[str, list[tuple[str, int]]]:
        """
        The receiver's traffic across its host boundary, by component:
        all of bob's DHT node's UDP, bob's HTTP pulls from alice's outbox,
        and what bob's own outbox serves (alice fetching bob's key).
        """
        return {
            "dht": [("udp", self.bob.dhtPort)],
            "pull": [("tcp", self.alice.httpPort, "remote")],
            "outbox": [("tcp", self.bob.httpPort)],
        }

    def local(self) -> dict[str, list[tuple[str, int]]]:
        """Client-server traffic on the receiver's host, reported apart."""
        return {"imap": [("tcp", self.bob.imapPort)]}

    def roles(self) -> dict[str, ProcessSet]:
        return {"receiver": self.bob.processes(), "sender": self.alice.processes()}

    # Life cycle

    def start(self) -> None:
        if self.dhtNodes:
            self.helper = Child(
                "OpenDHT helper nodes",
                [sys.executable, os.path.join(HERE, "dhtnodes.py"), *map(str, self.helperPorts)],
                os.path.join(self.root, "dhtnodes.log"),
            )
            self.helper.waitFor(r"ready")
        # alice joins through the helper nodes, bob through them and alice.
        self.alice.start(self.root, self.helperPorts[:2], self.pollInterval)
        self.alice.child.waitFor(r"listening on UDP \d+")
        self.bob.start(self.root, self.helperPorts[:2] + [self.alice.dhtPort], self.pollInterval)
        # First start makes the OpenPGP keys: allow for a slow gpg.
        for peer in (self.alice, self.bob):
            peer.child.waitFor(rf"published descriptor of {peer.address}", timeout=120)

    def stop(self) -> None:
        for child in (self.bob.child, self.alice.child, self.helper):
            if child is not None:
                child.stop()

    def logs(self) -> list[str]:
        return [c.log for c in (self.helper, self.alice.child, self.bob.child) if c is not None]
