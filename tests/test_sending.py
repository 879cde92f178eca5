"""
Tests for L{p2pmta.sending.Sender}'s pipeline scheduling, with a fake
clock.  The pipeline's steps themselves are tested with real peers in
L{tests.test_mailflow}.
"""

import base64
import io
import os
import zlib
from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.notices import Notices
from p2pmta.sealing import HUFFMAN_ONLY, LANES, compression
from p2pmta.sending import Sender


class PipelineTestCase(SynchronousTestCase):
    """
    A L{Sender} on a fake clock whose pipeline batches (C{batches}) wait
    until their Deferred in C{running} fires.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.peer = SimpleNamespace(reactor=self.clock, dataDir=SimpleNamespace(spool="spool"), track=lambda d: d)
        self.sender = Sender(self.peer, 1000)
        self.batches: list = []
        self.running: list = []

        def processBatch(ids):
            self.batches.append(ids)
            d: Deferred = Deferred()
            self.running.append(d)
            return d

        self.sender._processBatch = processBatch


class GatherTests(PipelineTestCase):
    """
    In a burst, a pipeline batch waits L{Sender.gatherDelay} for more
    messages, but not while no SMTP session is open.
    """

    def _burst(self) -> None:
        """One message in a batch while two more arrive."""
        self.sender.process("a")
        self.sender.process("b")
        self.sender.process("c")
        self.assertEqual(self.batches, [["a"]])
        self.running[0].callback(None)

    def test_waitsWhileSessionOpen(self) -> None:
        """
        While a session is open, the next batch waits for the gather delay.
        """
        self.sender.sessions(1)
        self._burst()
        self.clock.advance(self.sender.gatherDelay * 0.9)
        self.assertEqual(self.batches, [["a"]])
        self.clock.advance(self.sender.gatherDelay * 0.2)
        self.assertEqual(self.batches, [["a"], ["b", "c"]])
        self.assertEqual(self.sender._gatherWaiters, [], "a wait over leaves no trace")

    def test_sessionsGoneEndWait(self) -> None:
        """
        The wait ends as soon as the last session closes.
        """
        self.sender.sessions(1)
        self._burst()
        self.clock.advance(self.sender.gatherDelay * 0.1)
        self.assertEqual(self.batches, [["a"]])
        self.sender.sessions(0)
        self.assertEqual(self.batches, [["a"], ["b", "c"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sender._gatherWaiters, [])

    def test_noSessionNoWait(self) -> None:
        """
        With no session open (the client has gone), nothing more is on its
        way: the next batch goes at once.
        """
        self._burst()
        self.assertEqual(self.batches, [["a"], ["b", "c"]])


class QuietTests(PipelineTestCase):
    """
    L{Sender.quiet} fires once no message can be on its way: no SMTP
    session is open and the pipeline has none left.  The notices wait for
    it, so that the last message of a client that has gone is told of
    without L{Notices.notifyDelay}.
    """

    def test_atOnce(self) -> None:
        """
        With no session open and an empty pipeline, it has fired already.
        """
        self.assertTrue(self.sender.quiet(10.0).called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lastSessionCloses(self) -> None:
        """
        While a session is open it waits, until that session closes.
        """
        self.sender.sessions(1)
        d = self.sender.quiet(10.0)
        self.clock.advance(5.0)
        self.assertFalse(d.called)
        self.sender.sessions(0)
        self.assertTrue(d.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sender._quietWaiters, [], "a wait over leaves no trace")

    def test_pipelineRunsDry(self) -> None:
        """
        While the pipeline holds messages it waits, until the pipeline has
        none left; a session still open keeps it waiting.
        """
        self.sender.process("a")
        d = self.sender.quiet(10.0)
        self.assertFalse(d.called)
        self.running[0].callback(None)
        self.assertTrue(d.called)

        self.sender.sessions(1)
        self.sender.process("b")
        d = self.sender.quiet(10.0)
        self.running[1].callback(None)
        self.assertFalse(d.called)
        self.clock.advance(10.0)
        self.assertTrue(d.called, "at most the timeout")

    def test_noticesWaitForIt(self) -> None:
        """
        A notice waits L{Notices.notifyDelay} for company while a session
        is open, and not at all once none can come.
        """
        runs = []

        class Recording(Notices):
            async def _notifyPending(self) -> None:
                runs.append(self._peer.reactor.seconds())

        notices = Recording(self.peer, self.sender)
        self.sender.sessions(1)
        notices.notifyPending()
        self.clock.advance(notices.notifyDelay * 0.9)
        self.assertEqual(runs, [])
        self.clock.advance(notices.notifyDelay * 0.2)
        self.assertEqual(len(runs), 1)

        self.sender.sessions(0)
        notices.notifyPending()
        self.assertEqual(len(runs), 2, "no wait: nothing more can come")


class LanesTests(SynchronousTestCase):
    """
    A batch is sealed one message at a time while an SMTP session is open,
    and L{LANES} at a time (as the cores allow) once none is.
    """

    def lanesAsked(self, sessions: int) -> int:
        """The lanes L{Sender} asks its sealing process for, C{sessions} open."""
        asked = []

        class Sealers:
            def available(self) -> bool:
                return True

            def seal(self, outbox, limit, jobs, keys, lanes=1):
                asked.append(lanes)
                return succeed([("digest", 1, 1, b"", "[]", b"")] * len(jobs))

        keyring = SimpleNamespace(whileShared=lambda f, rows, recipients: succeed(([("spool", ["key"])] * len(rows), {})))
        peer = SimpleNamespace(
            reactor=Clock(), dataDir=SimpleNamespace(spool="spool"), track=lambda d: d,
            sealers=Sealers(), keyring=keyring, outbox=object(),
        )  # fmt: skip
        sender = Sender(peer, 1000)
        sender.sessions(sessions)
        results = self.successResultOf(Deferred.fromCoroutine(sender._encryptPart([{"id": "a"}, {"id": "b"}], {})))
        self.assertEqual(len(results), 2)
        [lanes] = asked
        return lanes

    def test_oneWhileASessionIsOpen(self) -> None:
        """While a session is open, one message at a time: a core is left to it."""
        self.assertEqual(self.lanesAsked(1), 1)

    def test_asManyAsCoresOnceNone(self) -> None:
        """Once no session is open, L{LANES} at a time, no more than there are cores."""
        self.assertEqual(self.lanesAsked(0), max(1, min(LANES, os.cpu_count() or 1)))
        self.patch(os, "cpu_count", lambda: 1)
        self.assertEqual(self.lanesAsked(0), 1)
        self.patch(os, "cpu_count", lambda: 64)
        self.assertEqual(self.lanesAsked(0), LANES)


class CompressionTests(SynchronousTestCase):
    """
    How a message is compressed before encryption: by what shrinks it, at a
    cost its size allows.
    """

    def compression(self, headers: bytes, body: bytes):
        data = headers + body
        return compression(io.BytesIO(data), headers, len(data))

    def test_tinyCompressedHard(self):
        """A message of up to 4 KiB is compressed hard, whatever it holds."""
        headers = b"Subject: x\r\n\r\n"
        self.assertEqual(self.compression(headers, os.urandom(4_000)), (6, zlib.Z_DEFAULT_STRATEGY))

    def test_compressedTypesByteByByte(self):
        """
        Content that is compressed already (its base64) is coded byte by
        byte, however small, and left as it is when large.
        """
        headers = b"Content-Type: image/JPEG\r\n\r\n"
        self.assertEqual(self.compression(headers, b"a" * 1000), HUFFMAN_ONLY)
        self.assertEqual(self.compression(headers, b"a" * 300_000)[0], 0)

    def test_byWhatItHolds(self):
        """
        A larger message is compressed by its repeats when a sample of it
        shrinks well (text: hard up to 32 KiB, less hard up to 256 KiB,
        fast beyond); base64 of random bytes, which does not, is coded byte
        by byte up to 256 KiB and left as it is beyond.
        """
        headers = b"Subject: x\r\n\r\n"
        line = b"The quick brown fox jumps over the lazy dog, again.\r\n"
        random = base64.encodebytes(os.urandom(1_000_000)).replace(b"\n", b"\r\n")
        self.assertEqual(self.compression(headers, line * 100), (6, zlib.Z_DEFAULT_STRATEGY))
        self.assertEqual(self.compression(headers, random[:5_000]), HUFFMAN_ONLY)
        self.assertEqual(self.compression(headers, random[:14_000]), HUFFMAN_ONLY)
        self.assertEqual(self.compression(headers, line * 2_000), (4, zlib.Z_DEFAULT_STRATEGY))
        self.assertEqual(self.compression(headers, line * 20_000), (1, zlib.Z_DEFAULT_STRATEGY))
        self.assertEqual(self.compression(headers, random[:100_000]), HUFFMAN_ONLY)
        self.assertEqual(self.compression(headers, random)[0], 0)
