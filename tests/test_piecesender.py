"""
Tests for L{p2pmta.piecesender}: the writer of FETCH answers.  It is
exercised end to end by L{tests.test_imap}; here, on a
L{StringTransport}, what is hard to catch there.
"""

import io

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from p2pmta.piecesender import FileRange, PieceSender


class PieceSenderTests(TestCase):
    def test_waitsForADeferred(self):
        """
        A L{Deferred} in the stream holds the pieces after it until it
        fires; the pieces after it are made only then.
        """
        transport = StringTransport()
        gate: Deferred = Deferred()
        made = []

        def pieces():
            yield b"a"
            yield gate
            made.append("after")
            yield b"b"

        done = PieceSender(transport, pieces()).start()
        self.assertEqual(transport.value(), b"a")
        self.assertEqual(made, [])
        self.assertNoResult(done)
        gate.callback("ignored")
        self.assertEqual(transport.value(), b"ab")
        self.assertEqual(made, ["after"])
        self.successResultOf(done)

    def test_resumeWhileWaiting(self):
        """
        A drained transport does not make the sender go past a Deferred it
        waits for.
        """
        transport = StringTransport()
        gate: Deferred = Deferred()
        sender = PieceSender(transport, iter([b"a", gate, b"b"]))
        done = sender.start()
        sender.resume()
        self.assertEqual(transport.value(), b"a")
        gate.callback(None)
        self.assertEqual(transport.value(), b"ab")
        self.successResultOf(done)

    def test_firedDeferred(self):
        """
        A Deferred that has fired already is passed over at once, however
        many there are (no recursion per piece).
        """
        transport = StringTransport()
        pieces = []
        for _ in range(5000):
            pieces += [succeed(None), b"x"]
        done = PieceSender(transport, pieces).start()
        self.assertEqual(transport.value(), b"x" * 5000)
        self.successResultOf(done)

    def test_failedDeferred(self):
        """
        A Deferred that fails is logged; the answer goes on (what it
        stood for is the stream's to leave out).
        """
        transport = StringTransport()
        gate: Deferred = Deferred()
        done = PieceSender(transport, iter([gate, b"b"])).start()
        gate.errback(ValueError("boom"))
        self.assertEqual(transport.value(), b"b")
        self.successResultOf(done)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_stoppedWhileWaiting(self):
        """
        A connection lost while the sender waits ends it; the Deferred
        firing later writes nothing.
        """
        transport = StringTransport()
        gate: Deferred = Deferred()
        sender = PieceSender(transport, iter([b"a", gate, b"b"]))
        done = sender.start()
        sender.stop()
        self.failureResultOf(done, ConnectionError)
        gate.callback(None)
        self.assertEqual(transport.value(), b"a")

    def test_smallPiecesGathered(self):
        """
        Small pieces go out in writes of about C{chunkSize} bytes, not a
        write each; what is gathered is written before a wait and at the
        end.
        """
        transport = StringTransport()
        writes = []
        transport.write = lambda data: (writes.append(len(data)), StringTransport.write(transport, data))
        gate: Deferred = Deferred()
        sender = PieceSender(transport, [b"x"] * 100 + [gate] + [b"y"] * 3)
        sender.chunkSize = 40
        done = sender.start()
        self.assertEqual(writes, [40, 40, 20])
        gate.callback(None)
        self.assertEqual(writes, [40, 40, 20, 3])
        self.assertEqual(transport.value(), b"x" * 100 + b"yyy")
        self.successResultOf(done)

    def test_shortFilePadded(self):
        """
        A file shorter than its range is padded to the length announced.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"abc")
        transport = StringTransport()
        done = PieceSender(transport, [FileRange(path, 1, 5)]).start()
        self.assertEqual(transport.value(), b"bc   ")
        self.successResultOf(done)

    def test_inMemoryRangeInOnePiece(self):
        """
        A range of a message held in memory is written in one piece, apart
        from what was gathered before it; a file's range in chunks.
        """
        body = bytes(range(256)) * 1000
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        for handle, expected in ((io.BytesIO(body), [3, 250_000]), (None, [40_003, 40_000] + [40_000] * 4 + [10_000])):
            transport = StringTransport()
            writes = []
            transport.write = lambda data, writes=writes, transport=transport: (
                writes.append(len(data)),
                StringTransport.write(transport, data),
            )
            sender = PieceSender(transport, [b"{1}", FileRange(path, 6, 250_000, handle)])
            sender.chunkSize = 40_000
            self.successResultOf(sender.start())
            self.assertEqual(writes, expected)
            self.assertEqual(transport.value(), b"{1}" + body[6:250_006])
