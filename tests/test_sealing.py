"""
Tests for L{p2pmta.sealing} and L{p2pmta.sealers}: spooled messages
encrypted into the outbox in a child process (real processes, real keys
made by gpg), and the pipeline sealing in its threads when no child can.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from unittest import skipUnless

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from p2pmta import openpgp, sealing
from p2pmta.errors import SealingFailed
from p2pmta.fileutil import SpareFiles
from p2pmta.notification import attachmentsOf
from p2pmta.sealers import Sealers, childEnvironment
from p2pmta.sealing import PARENT_PID, factsOf, frame, keyFields, keyFromFields, sealBatch
from tests.peers import PeerHarness
from tests.test_mailflow import fetchOne, makeMessage, stripAdded
from tests.test_fileutil import cachedPages, evict, requireDirect
from tests.test_openpgp import _keys

TEXT = makeMessage("alice@demo", ["bob@demo"], "text", b"")
BINARY = makeMessage("alice@demo", ["bob@demo"], "binary", os.urandom(30_000))


def _spooled(folder: str, name: str, message: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(message)
    return path


class _Folders:
    """A spool, an outbox and its spares in a temporary folder."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="seal", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.spool = os.path.join(self.root, "spool")
        os.mkdir(self.spool)
        directory = os.path.join(self.root, "outbox")
        os.mkdir(directory)
        self.outbox = SimpleNamespace(
            directory=directory, fileMode=0o644, spares=SpareFiles(directory + ".spare", 10)
        )
        keys = _keys()
        self.bob = openpgp.SecretKey.fromExport(keys["bob"][3])
        self.carol = openpgp.SecretKey.fromExport(keys["carol"][3])
        self.keys = {k.publicKey.fingerprint: k.publicKey for k in (self.bob, self.carol)}

    def assertSealed(self, facts, spooled: str, secret) -> None:
        """C{facts} are those of C{spooled}, sealed for C{secret}'s key."""
        digest, ciphertextSize, size, headers, attachments, sessionKey = facts
        with open(spooled, "rb") as f:
            plaintext = f.read()
        with open(os.path.join(self.outbox.directory, digest), "rb") as f:
            ciphertext = f.read()
        self.assertEqual(hashlib.sha256(ciphertext).hexdigest(), digest)
        self.assertEqual(len(ciphertext), ciphertextSize)
        self.assertEqual(size, len(plaintext))
        self.assertEqual(headers, plaintext[: plaintext.index(b"\r\n\r\n") + 4])
        self.assertIsInstance(json.loads(attachments), list)
        for keys in ({"secretKey": secret}, {"sessionKey": sessionKey}):
            out = io.BytesIO()
            openpgp.decrypt(io.BytesIO(ciphertext), out, maxOutput=len(plaintext), **keys)
            self.assertEqual(out.getvalue(), plaintext)


class SealBatchTests(_Folders, TestCase):
    """L{sealBatch}, the child's work, called in this process."""

    def request(self, jobs, spares=()) -> dict:
        return {"outbox": self.outbox.directory, "mode": 0o644, "limit": 1 << 20, "jobs": jobs, "spares": list(spares)}

    def test_sealsEachForItsRecipients(self) -> None:
        """
        Each message lands in the outbox under the SHA-256 of its
        ciphertext, readable with its recipient's key or its session key,
        and its facts say its size, headers and attachments.
        """
        text = _spooled(self.spool, "a", TEXT)
        binary = _spooled(self.spool, "b", BINARY)
        bob, carol = self.bob.publicKey.fingerprint, self.carol.publicKey.fingerprint
        answer = sealBatch(self.request([{"spool": text, "keys": [bob]}, {"spool": binary, "keys": [carol]}]), self.keys)
        first, second = [factsOf(result) for result in answer["results"]]
        self.assertSealed(first, text, self.bob)
        self.assertSealed(second, binary, self.carol)
        self.assertEqual([a["name"] for a in json.loads(second[4])], ["data.bin"])
        self.assertRaises(Exception, self.assertSealed, second, binary, self.bob)
        self.assertEqual(sorted(os.listdir(self.outbox.directory)), sorted([first[0], second[0]]))

    def test_largeMessageStreamed(self) -> None:
        """
        A message over L{sealing.WHOLE_MESSAGE} is read a block at a time,
        not held whole: its facts are those it has when sealed whole.
        """
        bob = self.bob.publicKey.fingerprint
        whole = factsOf(sealBatch(self.request([{"spool": _spooled(self.spool, "a", BINARY), "keys": [bob]}]), self.keys)["results"][0])
        self.patch(sealing, "WHOLE_MESSAGE", len(BINARY) - 1)
        held = []
        self.patch(sealing, "attachmentsOf", lambda source, **kw: held.append(source) or attachmentsOf(source, **kw))
        spooled = _spooled(self.spool, "b", BINARY)
        streamed = factsOf(sealBatch(self.request([{"spool": spooled, "keys": [bob]}]), self.keys)["results"][0])
        self.assertSealed(streamed, spooled, self.bob)
        self.assertNotIsInstance(held[0], bytes)
        self.assertEqual(streamed[2:5], whole[2:5])
        self.assertEqual(json.loads(streamed[4]), [{"name": "data.bin", "type": "application/octet-stream", "size": 30_000}])

    def test_spoolReadPastThePageCache(self) -> None:
        """
        A spooled message of a block or more is read past the page cache,
        as it was written (L{p2pmta.spool.openedForMessage}): sealing it
        puts none of its pages there.
        """
        requireDirect(self.spool)
        large = makeMessage("alice@demo", ["bob@demo"], "binary", os.urandom(300_000))
        spooled = _spooled(self.spool, "a", large)
        evict(spooled)
        facts = factsOf(sealBatch(self.request([{"spool": spooled, "keys": [self.bob.publicKey.fingerprint]}]), self.keys)["results"][0])
        self.assertEqual(cachedPages(spooled), [])
        self.assertSealed(facts, spooled, self.bob)

    def test_sparesUsedOrGivenBack(self) -> None:
        """
        A claimed spare holds a ciphertext (its inode used again); those
        not used are named in the answer.
        """
        spares = []
        for n in range(3):
            path = os.path.join(self.outbox.spares.folder, f"spare{n}")
            open(path, "wb").close()
            spares.append(path)
        inodes = {os.stat(p).st_ino for p in spares}
        job = {"spool": _spooled(self.spool, "a", TEXT), "keys": [self.bob.publicKey.fingerprint]}
        answer = sealBatch(self.request([job], spares), self.keys)
        [result] = answer["results"]
        self.assertIn(os.stat(os.path.join(self.outbox.directory, result["digest"])).st_ino, inodes)
        self.assertEqual(len(answer["unusedSpares"]), 2)
        self.assertTrue(all(os.path.exists(p) for p in answer["unusedSpares"]))

    def test_oneFailsOthersSealed(self) -> None:
        """A message that cannot be sealed is told of; the others are sealed."""
        good = _spooled(self.spool, "a", TEXT)
        fingerprint = self.bob.publicKey.fingerprint
        jobs = [{"spool": os.path.join(self.spool, "gone"), "keys": [fingerprint]}, {"spool": good, "keys": [fingerprint]}]
        missing, sealed = sealBatch(self.request(jobs), self.keys)["results"]
        self.assertIn("FileNotFoundError", missing["error"])
        self.assertEqual(os.listdir(self.outbox.directory), [sealed["digest"]])

    def test_unknownKeyIsTheJobsError(self) -> None:
        """A job naming a key the child was not sent fails alone."""
        jobs = [{"spool": _spooled(self.spool, "a", TEXT), "keys": ["nobody"]}]
        [result] = sealBatch(self.request(jobs), self.keys)["results"]
        self.assertIn("KeyError", result["error"])
        self.assertEqual(os.listdir(self.outbox.directory), [])

    def test_flushFailsItsJobAlone(self) -> None:
        """
        A ciphertext that cannot be flushed (in a thread, while the next
        message is sealed) fails its job, and leaves no file behind; the
        others are sealed and flushed.
        """
        fingerprint = self.bob.publicKey.fingerprint
        # The second message's ciphertext, much the largest, fails.
        messages = {"a": TEXT, "b": BINARY, "c": TEXT + b"c"}
        jobs = [{"spool": _spooled(self.spool, name, message), "keys": [fingerprint]} for name, message in messages.items()]
        realFsync = os.fsync

        def fsync(fd):
            found = os.fstat(fd)
            if stat.S_ISREG(found.st_mode) and found.st_size > len(BINARY) // 2:
                raise OSError(errno.EIO, "the disk failed")
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        first, failed, third = sealBatch(self.request(jobs), self.keys)["results"]
        self.assertIn("the disk failed", failed["error"])
        self.assertEqual(sorted(os.listdir(self.outbox.directory)), sorted([first["digest"], third["digest"]]))
        self.assertSealed(factsOf(first), jobs[0]["spool"], self.bob)
        self.assertSealed(factsOf(third), jobs[2]["spool"], self.bob)

    def test_failedAfterStoringLeavesNoFile(self) -> None:
        """A job that fails once its ciphertext is stored takes that file back."""
        jobs = [{"spool": _spooled(self.spool, "a", TEXT), "keys": [self.bob.publicKey.fingerprint]}]

        def answerOf(facts):
            raise ValueError("cannot answer")

        self.patch(sealing, "answerOf", answerOf)
        [result] = sealBatch(self.request(jobs), self.keys)["results"]
        self.assertIn("cannot answer", result["error"])
        self.assertEqual(os.listdir(self.outbox.directory), [])

    def test_lanesSealSideBySide(self) -> None:
        """
        With C{lanes}, that many messages are sealed at once, each in a
        thread of its own; the answers keep the jobs' order, a failed job
        failing alone.
        """
        fingerprint = self.bob.publicKey.fingerprint
        messages = [TEXT, BINARY, None, TEXT + b"d", BINARY + b"e"]
        jobs = [
            {"spool": os.path.join(self.spool, "gone") if message is None else _spooled(self.spool, str(n), message), "keys": [fingerprint]}
            for n, message in enumerate(messages)
        ]
        # The first two messages wait for each other: were they sealed one
        # after the other, the first would wait in vain and fail.
        meet = threading.Barrier(2, timeout=30)
        threads = []
        encrypt = openpgp.encrypt

        def encrypting(*args, **kwargs):
            threads.append(threading.current_thread().name)
            if len(threads) <= 2:
                meet.wait()
            return encrypt(*args, **kwargs)

        self.patch(openpgp, "encrypt", encrypting)
        results = sealBatch(dict(self.request(jobs), lanes=2), self.keys)["results"]
        self.assertEqual(len(threads), 4)
        self.assertTrue(all(name.startswith("p2pmta-seal") for name in threads), threads)
        self.assertIn("FileNotFoundError", results[2]["error"])
        for job, result in zip(jobs, results):
            if job is not jobs[2]:
                self.assertSealed(factsOf(result), job["spool"], self.bob)
        self.assertEqual(len(os.listdir(self.outbox.directory)), 4)

    def test_oneLaneByDefault(self) -> None:
        """Without C{lanes}, or with one, the messages are sealed one by one, here."""
        fingerprint = self.bob.publicKey.fingerprint
        threads = []
        encrypt = openpgp.encrypt

        def encrypting(*args, **kwargs):
            threads.append(threading.current_thread())
            return encrypt(*args, **kwargs)

        self.patch(openpgp, "encrypt", encrypting)
        for n, lanes in enumerate((None, 1)):
            jobs = [{"spool": _spooled(self.spool, f"{n}{m}", TEXT + bytes([m])), "keys": [fingerprint]} for m in range(2)]
            request = self.request(jobs) if lanes is None else dict(self.request(jobs), lanes=lanes)
            for job, result in zip(jobs, sealBatch(request, self.keys)["results"]):
                self.assertSealed(factsOf(result), job["spool"], self.bob)
        self.assertEqual(threads, [threading.current_thread()] * 4)

    def test_keysCrossWhole(self) -> None:
        """A key sent to a child as fields is the key it was."""
        key = self.bob.publicKey
        self.assertEqual(keyFromFields(json.loads(json.dumps(keyFields(key)))), key)


class SealersTests(_Folders, TestCase):
    """L{Sealers}, with real child processes."""

    timeout = 60

    def sealers(self, argv=None) -> Sealers:
        sealers = Sealers(reactor, argv=argv)
        self.addCleanup(sealers.stop)
        return sealers

    def job(self, name: str = "a", message: bytes = TEXT):
        return (_spooled(self.spool, name, message), [self.bob.publicKey.fingerprint])

    async def test_sealsInAChild(self) -> None:
        """
        A child seals the jobs it is given, keeps the keys it was sent for
        the next batch, and ends when the sealers stop.
        """
        sealers = self.sealers()
        first = await sealers.seal(self.outbox, 1 << 20, [self.job("a")], self.keys)
        [process] = sealers._processes
        pid = process.transport.pid
        self.assertNotEqual(pid, os.getpid())
        # It yields the CPU to the peer's sessions.
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, pid), min(19, ours + sealing.NICENESS))
        # Keys go once to a process; a later batch names them only.
        asked, ask = [], process.ask
        process.ask = lambda request: (asked.append(request), ask(request))[1]
        second = await sealers.seal(self.outbox, 1 << 20, [self.job("b", BINARY)], self.keys)
        self.assertEqual(sealers._processes, [process])
        self.assertEqual([request["keys"] for request in asked], [{}])
        self.assertSealed(first[0], os.path.join(self.spool, "a"), self.bob)
        self.assertSealed(second[0], os.path.join(self.spool, "b"), self.bob)
        await sealers.stop()
        self.assertFalse(process.running)
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertFalse(sealers.available())

    async def test_lanesCrossToTheChild(self) -> None:
        """The lanes asked for reach the child, which seals the batch with them."""
        sealers = self.sealers()
        asked = []
        await sealers.seal(self.outbox, 1 << 20, [self.job("warm")], self.keys)
        [process] = sealers._processes
        ask = process.ask
        process.ask = lambda request: (asked.append(request), ask(request))[1]
        jobs = [self.job(str(n), BINARY + bytes([n])) for n in range(3)]
        results = await sealers.seal(self.outbox, 1 << 20, jobs, self.keys, lanes=2)
        self.assertEqual([request["lanes"] for request in asked], [2])
        for (spool, _), facts in zip(jobs, results):
            self.assertSealed(facts, spool, self.bob)

    async def test_sparesClaimedAndGivenBack(self) -> None:
        """The outbox's spares go to the child; those it does not use come back."""
        for n in range(3):
            self.outbox.spares._spares.append(os.path.join(self.outbox.spares.folder, f"s{n}"))
            open(self.outbox.spares._spares[-1], "wb").close()
        await self.sealers().seal(self.outbox, 1 << 20, [self.job()], self.keys)
        self.assertEqual(len(self.outbox.spares), 2)

    async def test_jobFailureIsItsOwn(self) -> None:
        """A job the child could not seal is a L{Failure} in its place."""
        missing = (os.path.join(self.spool, "gone"), [self.bob.publicKey.fingerprint])
        results = await self.sealers().seal(self.outbox, 1 << 20, [missing, self.job()], self.keys)
        self.assertTrue(results[0].check(SealingFailed))
        self.assertSealed(results[1], os.path.join(self.spool, "a"), self.bob)

    async def test_childThatCannotStart(self) -> None:
        """
        A child that dies before answering fails the request with
        L{SealingFailed}, and none is started again for a while.
        """
        sealers = self.sealers([sys.executable, "-c", "import sys; sys.exit(3)"])
        with self.assertRaises(SealingFailed):
            await sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)
        self.assertFalse(sealers.available())
        with self.assertRaises(SealingFailed):
            await sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)

    def test_noProcessesWithoutAReactorForThem(self) -> None:
        """On a reactor that cannot run processes, the caller seals itself."""
        from twisted.internet.task import Clock

        self.assertFalse(Sealers(Clock()).available())
        self.assertTrue(Sealers(reactor).available())

    async def test_missingProgram(self) -> None:
        """A program that is not there fails the request, not the caller."""
        sealers = self.sealers([os.path.join(self.root, "no-such-python")])
        with self.assertRaises(SealingFailed):
            await sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)

    async def test_childThatAnswersNonsense(self) -> None:
        """A child that answers what is not an answer is stopped; the request fails."""
        program = "import sys; sys.stdin.buffer.read(4); sys.stdout.buffer.write(b'\\0\\0\\0\\2[]'); sys.stdout.flush(); sys.stdin.read()"
        sealers = self.sealers([sys.executable, "-c", program])
        with self.assertRaises(SealingFailed):
            await sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)
        self.assertEqual(sealers._processes, [])

    async def test_killedWhileSealing(self) -> None:
        """A child killed with a request in hand fails it."""
        sealers = self.sealers([sys.executable, "-c", "import time; time.sleep(60)"])
        d = sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)
        sealers._processes[0].kill()
        with self.assertRaises(SealingFailed):
            await d

    async def test_stuckChildKilledAtStop(self) -> None:
        """A child that does not end when its input closes is killed."""
        sealers = self.sealers([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"])
        d = sealers.seal(self.outbox, 1 << 20, [self.job()], self.keys)
        d.addErrback(lambda f: f.trap(SealingFailed))
        [process] = sealers._processes
        await sealers.stop(timeout=0.5)
        self.assertFalse(process.running)
        await d


def _gone(pid: int) -> bool:
    """Whether process C{pid} has ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


class MainTests(TestCase):
    """L{sealing.main}, the child's loop, called in this process."""

    def test_keepsFreedMemory(self) -> None:
        """
        The child sets its allocator as a peer does (see L{p2pmta.allocator}):
        a 1 MB message passes through buffers of its size there too.  It
        lowers its priority first (see L{sealing.NICENESS}).
        """
        calls = []
        self.patch(sealing.allocator, "keepFreedMemory", lambda: calls.append(True))
        self.patch(sealing, "_dieWithParent", lambda: None)
        self.patch(sealing, "_yieldToSessions", lambda: calls.append("nice"))
        self.patch(sealing.signal, "signal", lambda *args: None)
        self.patch(sys, "stdin", SimpleNamespace(buffer=io.BytesIO()))
        self.patch(sys, "stdout", SimpleNamespace(buffer=io.BytesIO()))
        sealing.main()
        self.assertEqual(calls, ["nice", True])


#: A stand-in peer: starts a sealing process reading the descriptor given,
#: prints its pid, and waits to be killed.
_PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, {name}=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-m", "p2pmta.sealing"], stdin=int(sys.argv[1]), env=env)
print(child.pid, flush=True)
time.sleep(20)  # bounds a blocked read of its output, should the test fail
"""


class DiesWithItsPeerTests(TestCase):
    """A sealing process does not outlive a peer that was killed."""

    timeout = 30

    @skipUnless(sys.platform.startswith("linux"), "prctl(2) is Linux's")
    def test_killedPeer(self) -> None:
        """
        Killed, the peer takes its sealing process with it, although the
        process's input is still open (here, held by the test): it cannot
        go on writing into an outbox the peer, started again, is clearing.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        # The stand-in gives the child its own pid as the peer's.
        env = childEnvironment(os.getpid())
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT.format(name=PARENT_PID), str(readEnd)],
            pass_fds=(readEnd,),
            stdout=subprocess.PIPE,
            env=env,
        )
        os.close(readEnd)
        self.addCleanup(lambda: parent.poll() is None and (parent.kill(), parent.wait()))
        self.addCleanup(parent.stdout.close)
        child = int(parent.stdout.readline())
        self.addCleanup(lambda: _gone(child) or os.kill(child, signal.SIGKILL))
        # An answer shows it is past its start and serving requests.
        outbox = self.mktemp()
        os.makedirs(outbox)
        os.write(writeEnd, frame({"outbox": outbox, "mode": 0o600, "limit": 1, "jobs": []}))
        size = struct.unpack(">I", parent.stdout.read(4))[0]
        self.assertEqual(json.loads(parent.stdout.read(size)), {"results": [], "unusedSpares": []})
        self.assertFalse(_gone(child))
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(child):
            self.assertLess(time.monotonic(), deadline, "the sealing process outlived its peer")
            time.sleep(0.05)


class PipelineTests(TestCase):
    """The sending pipeline between real peers, with and without a child."""

    timeout = 180

    async def _sendReceive(self, broken: bool) -> None:
        h = PeerHarness(self)
        alice = await h.start("alice")
        await h.start("bob")
        warnings = []
        if broken:
            alice.sealers = Sealers(reactor, argv=[sys.executable, "-c", "import sys; sys.exit(1)"])

            def observe(event):
                if "sealing" in event.get("log_format", "") and event.get("log_namespace") == "p2pmta.sending.Sender":
                    warnings.append(event)

            globalLogPublisher.addObserver(observe)
            self.addCleanup(globalLogPublisher.removeObserver, observe)
        messages = [makeMessage("alice@demo", ["bob@demo"], f"m{n}", os.urandom(5000 * n)) for n in range(3)]
        for message in messages:
            self.assertEqual(await h.send("alice", ["bob@demo"], message), {})
        uids = await h.listed("bob", 3)
        bodies = []
        for uid in uids:
            typ, data = await h.imap("bob", lambda c, uid=uid: fetchOne(c, uid, "(BODY[])"))
            self.assertEqual(typ, "OK")
            bodies.append(stripAdded(data[0][1]))
        self.assertEqual(sorted(bodies), sorted(m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in messages))
        if broken:
            self.assertTrue(warnings)
            self.assertEqual(alice.sealers._processes, [])
        else:
            self.assertEqual(len(alice.sealers._processes), 1)
            pid = alice.sealers._processes[0].transport.pid
            await h.stop("alice")
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    def test_sealedInAChild(self):
        """
        Sent messages are sealed in the peer's child process, read whole
        by their recipient, and the child ends with the peer.
        """
        return self._sendReceive(broken=False)

    def test_sealedInThreadsWithoutAChild(self):
        """Where no child can run, the peer seals in its threads: nothing is lost."""
        return self._sendReceive(broken=True)

