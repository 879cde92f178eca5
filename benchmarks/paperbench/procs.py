"""
Child processes and ports for the benchmark.

Every child runs in a session of its own, so stopping it stops whatever it
started too (twistd's gpg children, a server's workers), and nothing is left
behind when the harness is interrupted.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import signal
import socket
import subprocess
import time


def ephemeralRange() -> tuple[int, int]:
    """The kernel's ephemeral port range (where clients' ports come from)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


#: Every port L{freePorts} has handed out in this process.  Each system
#: chooses its ports when it is made, and binds them only when it starts:
#: without this, the baseline could be given a port p2pmta's peers were
#: given a moment before, and whichever started second could not listen.
_handedOut: set[int] = set()


def freePorts(count: int, low: int = 20000) -> list[int]:
    """
    C{count} ports free for both TCP and UDP on 127.0.0.1, chosen at random
    below the ephemeral range: a counter that matches a server's port then
    never matches some client's source port as well.  None of them was
    handed out before in this process.
    """
    high = min(ephemeralRange()[0], 65536) - 1
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(count * 200):
        if len(chosen) == count:
            break
        port = rng.randint(low, high)
        if port in chosen or port in _handedOut:
            continue
        if _bindable(port, socket.SOCK_STREAM) and _bindable(port, socket.SOCK_DGRAM):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError(f"could not find {count} free ports in {low}-{high}")
    _handedOut.update(chosen)
    return chosen


def _bindable(port: int, kind: int) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Child:
    """
    A child process whose output goes to a log file, in its own session.

    @ivar name: what it is, for messages.
    @ivar log: the path of its log (stdout and stderr).
    """

    def __init__(self, name: str, argv: list[str], log: str, env=None, cwd=None) -> None:
        self.name = name
        self.log = log
        self._logFile = open(log, "ab")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logFile,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_dieWithParent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def waitFor(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """
        Wait until the log matches C{pattern}.

        @raise RuntimeError: if the process ends first, or on time-out, with
            the end of its log.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} ended ({self.process.returncode}) before {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM its whole session, then SIGKILL what is left."""
        if self.process.poll() is None:
            _signalGroup(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the child started and left in its session goes too.
        _signalGroup(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        self._logFile.close()


def _dieWithParent() -> None:
    """
    In the child, before exec: get SIGTERM when the benchmark dies, even
    by SIGKILL, when no clean-up of ours can run.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signalGroup(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command to completion, its output captured as text."""
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    result = subprocess.run(argv, check=False, capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result
