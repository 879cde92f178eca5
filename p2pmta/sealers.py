# -*- test-case-name: tests.test_sealing -*-
"""
The peer's sealing processes (see L{p2pmta.sealing}): children started
when first needed, started again a little after one dies, and stopped
with the peer.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import sys

from twisted.internet import error, protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure

import p2pmta
from p2pmta.errors import SealingFailed
from p2pmta.sealing import PARENT_PID, factsOf, frame, keyFields

#: How many sealing processes a peer runs at most.  One, sealing whole
#: batches, leaves a core to the SMTP sessions: 1000 messages of 10 KB
#: were submitted and listed in 2.47 s against 2.80 s with the threads
#: (means of twelve, alternated); two, sealing halves side by side, gained
#: less (2.65 s against 2.83 s).  Each process holds some 30 MB.
SEALERS = 1

#: After a sealing process ends unasked, how long the peer seals in its
#: own threads before it starts another (a child that cannot even start
#: is not started again for every batch).
RESTART_DELAY = 5.0


def childEnvironment(parentPid: int) -> dict:
    """
    The environment of a sealing process started by the peer C{parentPid}:
    ours, with this very p2pmta importable wherever it was run from, and
    the peer's pid, so that the child dies with it (see
    L{p2pmta.sealing.PARENT_PID}).
    """
    env = dict(os.environ)
    home = os.path.dirname(os.path.dirname(os.path.abspath(p2pmta.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    env[PARENT_PID] = str(parentPid)
    return env


class _SealingProcess(protocol.ProcessProtocol):
    """
    One child running C{python -m p2pmta.sealing}: its requests are
    answered in the order they were made.

    @ivar keys: The names of the keys it was sent.
    @ivar waiting: The Deferreds of the requests it has not answered yet.
    @ivar ended: Fires once it has ended.
    @ivar running: Whether it still runs.
    """

    log = Logger()

    def __init__(self, onEnd) -> None:
        self._onEnd = onEnd
        self.keys: set[str] = set()
        self.waiting: collections.deque[Deferred] = collections.deque()
        self.ended: Deferred = Deferred()
        self.running = True
        self._buffer = bytearray()

    def ask(self, request: dict) -> Deferred:
        """
        @return: a Deferred firing with its answer, or failing with
            L{SealingFailed} if the process ends first.
        """
        d: Deferred = Deferred()
        self.waiting.append(d)
        self.transport.write(frame(request))
        return d

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (size,) = struct.unpack_from(">I", self._buffer)
            if len(self._buffer) < 4 + size:
                return
            body = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            try:
                answer = json.loads(body)
                if not isinstance(answer, dict) or not ("results" in answer or "error" in answer):
                    raise ValueError("not an answer")
                waiter = self.waiting.popleft()
            except (ValueError, IndexError):
                self.log.error("a sealing process answered what was not asked: stopping it")
                self.kill()
                return
            waiter.callback(answer)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.log.warn("sealing process {pid}: {line}", pid=self.transport.pid, line=line)

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self._onEnd(self, reason)
        waiting, self.waiting = self.waiting, collections.deque()
        for waiter in waiting:
            waiter.errback(SealingFailed(f"the sealing process ended: {reason.getErrorMessage()}"))
        self.ended.callback(None)


class Sealers:
    """
    Up to L{SEALERS} sealing processes, each sealing one batch of messages
    at a time.
    """

    log = Logger()

    def __init__(self, reactor, count: int = SEALERS, argv: list[str] | None = None) -> None:
        """
        @param count: How many processes to run at most.
        @param argv: The command of one (by default, this Python running
            L{p2pmta.sealing}).
        """
        self._reactor = reactor
        self.count = count
        self._argv = argv or [sys.executable, "-m", "p2pmta.sealing"]
        self._processes: list[_SealingProcess] = []
        self._stopping = False
        self._pausedUntil = float("-inf")

    def available(self) -> bool:
        """Whether a process can seal now (else the caller seals itself)."""
        return (
            IReactorProcess.providedBy(self._reactor)
            and not self._stopping
            and self._reactor.seconds() >= self._pausedUntil
        )

    def seal(self, outbox, limit: int, jobs: list, keys: dict, lanes: int = 1) -> Deferred:
        """
        Seal spooled messages into C{outbox} in one of the processes.

        @param outbox: The L{p2pmta.store.Outbox}; its spare files are used.
        @param limit: The largest header section read.
        @param jobs: C{(spool path, fingerprints)} of each message: its file
            and the keys to encrypt it to.
        @param keys: Those keys (L{p2pmta.openpgp.PublicKey}) by fingerprint.
        @param lanes: How many of them the process seals at once (see
            L{p2pmta.sealing.LANES}).
        @return: a Deferred firing with, for each job, the facts that
            L{p2pmta.sealing.sealSpooled} returns or the L{Failure} that
            stopped it; or failing with L{SealingFailed} if no process
            could seal them.
        """
        return Deferred.fromCoroutine(self._seal(outbox, limit, jobs, keys, lanes))

    async def _seal(self, outbox, limit: int, jobs: list, keys: dict, lanes: int) -> list:
        process = self._process()
        spares = outbox.spares.claim(len(jobs))
        # A key is named by its encryption subkey too: should a peer's key
        # get a new one, a process that has the old is sent the new.
        names = {fpr: f"{fpr}:{key.encryptionFingerprint.hex()}" for fpr, key in keys.items()}
        request = {
            "outbox": outbox.directory,
            "mode": outbox.fileMode,
            "limit": limit,
            "jobs": [{"spool": spool, "keys": [names[fpr] for fpr in fingerprints]} for spool, fingerprints in jobs],
            "spares": spares,
            "lanes": lanes,
            "keys": {names[fpr]: keyFields(key) for fpr, key in keys.items() if names[fpr] not in process.keys},
        }
        process.keys.update(request["keys"])
        answer = await process.ask(request)
        outbox.spares.giveBack(answer.get("unusedSpares", []))
        if "error" in answer:
            raise SealingFailed(answer["error"])
        return [_facts(result) for result in answer["results"]]

    def _process(self) -> _SealingProcess:
        """The process to ask: an idle one, a new one, or the least busy."""
        if not self.available():
            raise SealingFailed("no sealing process now")
        idle = [p for p in self._processes if not p.waiting]
        if idle:
            return idle[0]
        if len(self._processes) < self.count:
            return self._spawn()
        return min(self._processes, key=lambda p: len(p.waiting))

    def _spawn(self) -> _SealingProcess:
        process = _SealingProcess(self._ended)
        env = childEnvironment(os.getpid())
        try:
            self._reactor.spawnProcess(process, self._argv[0], self._argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._pausedUntil = self._reactor.seconds() + RESTART_DELAY
            raise SealingFailed(f"cannot start a sealing process: {e}") from None
        self._processes.append(process)
        return process

    def _ended(self, process: _SealingProcess, reason: Failure) -> None:
        self._processes.remove(process)
        if not self._stopping:
            self.log.warn(
                "a sealing process ended ({why}); sealing in the peer's threads for {delay:.0f}s",
                why=reason.getErrorMessage(),
                delay=RESTART_DELAY,
            )
            self._pausedUntil = self._reactor.seconds() + RESTART_DELAY

    def stop(self, timeout: float = 10.0) -> Deferred:
        """
        Let the processes finish what they were asked, then end them (killed
        if they take more than C{timeout} seconds).

        @return: a Deferred firing once all have ended.
        """
        self._stopping = True
        processes = list(self._processes)
        for process in processes:
            process.transport.closeStdin()
        killer = self._reactor.callLater(timeout, lambda: [p.kill() for p in processes if p.running])

        def ended(_) -> None:
            if killer.active():
                killer.cancel()

        return DeferredList([p.ended for p in processes]).addCallback(ended)


def _facts(answer: dict):
    """One job's answer: its facts (see L{p2pmta.sealing.factsOf}), or the L{Failure} that stopped it."""
    try:
        return factsOf(answer)
    except SealingFailed:
        return Failure()
