"""
Tests for L{p2pmta.httpclient}: what a pull costs on the wire, over real
TCP on 127.0.0.1.  (Hostile servers are in L{tests.test_hostile_web}.)
"""

from __future__ import annotations

import os
import threading

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.client import ResponseDone
from twisted.web.server import Site

from p2pmta.errors import FetchError
from p2pmta.httpclient import BUSY_RETRIES, BUSY_WAIT, MAX_PERSISTENT_PER_HOST, READ_SIZE, fetchBytes, makeAgent
from p2pmta.store import Outbox
from p2pmta.web import makeSite

BODY = b"hello"


class _KeepAlive(Protocol):
    """
    A keep-alive server for body-less requests: records each request as
    C{(connection number, request bytes)} in its factory and answers it with
    L{BODY}, after C{factory.delays[connection number]} seconds if given.
    """

    def connectionMade(self) -> None:
        self.number = len(self.factory.connections)
        self.factory.connections.append(self)
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            request, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            self.factory.requests.append((self.number, request))
            delay = self.factory.delays.get(self.number, 0)
            deferLater(reactor, delay, self._answer)

    def _answer(self) -> None:
        if self.transport.connected:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )


class _KeepAliveFactory(Factory):
    protocol = _KeepAlive

    def __init__(self) -> None:
        self.connections: list[_KeepAlive] = []
        self.requests: list[tuple[int, bytes]] = []
        self.delays: dict[int, float] = {}


class PullCostTests(TestCase):
    """
    Pulls reuse their connections and send nothing HTTP does not need.
    """

    def setUp(self) -> None:
        self.factory = _KeepAliveFactory()
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self._closeServerSide)
        self.url = f"http://127.0.0.1:{port.getHost().port}/outbox/" + "0" * 64
        self.agent, self.pool = makeAgent(reactor)
        self.addCleanup(self.pool.closeCachedConnections)

    def _closeServerSide(self) -> None:
        for connection in self.factory.connections:
            connection.transport.abortConnection()

    def pull(self) -> Deferred:
        return Deferred.fromCoroutine(
            fetchBytes(self.agent, self.url, len(BODY), reactor, timeout=5)
        )

    def test_requestIsLineAndHost(self):
        """
        A pull's request is its request line and C{Host}: no C{User-Agent}
        or anything else.
        """

        async def run():
            self.assertEqual(await self.pull(), BODY)
            [(_, request)] = self.factory.requests
            line, *headers = request.split(b"\r\n")
            self.assertEqual(line, b"GET /outbox/" + b"0" * 64 + b" HTTP/1.1")
            self.assertEqual([h.split(b":", 1)[0].lower() for h in headers], [b"host"])

        return Deferred.fromCoroutine(run())

    def test_sinkErrorIsOurs(self):
        """
        What the sink raises (our own disk full) comes out as it is, not as
        a L{FetchError} that would send the caller to another server.
        """
        import errno

        from p2pmta.httpclient import fetchInto

        def full(data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        async def run():
            with self.assertRaises(OSError) as caught:
                await fetchInto(self.agent, self.url, full, len(BODY), reactor, timeout=5)
            self.assertEqual(caught.exception.errno, errno.ENOSPC)
            # The connection finishes its response and returns to the pool,
            # whose clean-up closes it.
            await deferLater(reactor, 0.1, lambda: None)

        return Deferred.fromCoroutine(run())

    def test_sequentialPullsShareOneConnection(self):
        """
        Pulls one after another all go over one connection.
        """

        async def run():
            for _ in range(5):
                self.assertEqual(await self.pull(), BODY)
            self.assertEqual(len(self.factory.connections), 1)
            self.assertEqual([n for n, _ in self.factory.requests], [0] * 5)

        return Deferred.fromCoroutine(run())

    def test_readsLargeBlocks(self):
        """
        A pull's connection reads L{READ_SIZE} bytes at a time, more than
        Twisted's default.
        """

        async def run():
            self.assertEqual(await self.pull(), BODY)
            [[protocol]] = self.pool._connections.values()
            self.assertEqual(protocol.transport.bufferSize, READ_SIZE)
            self.assertGreater(READ_SIZE, tcp.Connection.bufferSize)

        return Deferred.fromCoroutine(run())

    def test_burstsKeepTheirConnections(self):
        """
        After a burst of L{MAX_PERSISTENT_PER_HOST} concurrent pulls, all
        their connections are kept: the next burst opens none.
        """

        async def run():
            burst = MAX_PERSISTENT_PER_HOST
            self.assertGreaterEqual(burst, 8)
            for _ in range(2):
                results = await gatherResults([self.pull() for _ in range(burst)])
                self.assertEqual(results, [BODY] * burst)
            self.assertEqual(len(self.factory.connections), burst)

        return Deferred.fromCoroutine(run())

    def test_lastIdleConnectionFirst(self):
        """
        The next pull goes over the connection that finished last, whose
        acknowledgement of that answer can ride along with the request.
        """

        async def run():
            # Connection 0 answers 0.2s late, so it finishes second.
            self.factory.delays[0] = 0.2
            await gatherResults([self.pull(), self.pull()])
            self.factory.delays.clear()
            self.assertEqual(await self.pull(), BODY)
            self.assertEqual([n for n, _ in self.factory.requests][-1], 0)
            self.assertEqual(len(self.factory.connections), 2)

        return Deferred.fromCoroutine(run())


class AgainstOurOutboxTests(TestCase):
    """
    Our fetcher and our outbox together over real TCP.
    """

    def test_pullsReuseOneConnection(self):
        """
        Several ciphertexts pulled one after another from our own outbox
        come over one connection: the server keeps it alive too.
        """

        async def run():
            pool = ThreadPool(minthreads=1, maxthreads=2, name="test-httpclient")
            pool.start()
            self.addCleanup(pool.stop)
            outbox = Outbox(reactor, os.path.abspath(self.mktemp()), pool)
            blobs = [os.urandom(11_000) for _ in range(4)]
            digests = [await outbox.add(blob) for blob in blobs]
            site = makeSite(outbox, lambda: succeed(b"KEY"), logPath=lambda line: None)
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            agent, agentPool = makeAgent(reactor)
            self.addCleanup(agentPool.closeCachedConnections)
            base = f"http://127.0.0.1:{port.getHost().port}/outbox/"
            for digest, blob in zip(digests, blobs):
                got = await fetchBytes(agent, base + digest, len(blob), reactor)
                self.assertEqual(got, blob)
            self.assertEqual(site.connections, {"127.0.0.1": 1})

        return Deferred.fromCoroutine(run())


class _Busy(Resource):
    """Answers 429 with C{retryAfter} to the first C{busy} requests."""

    isLeaf = True

    def __init__(self, busy: int, retryAfter: bytes | None) -> None:
        super().__init__()
        self.busy, self.retryAfter, self.requests = busy, retryAfter, 0

    def render_GET(self, request):
        self.requests += 1
        if self.requests <= self.busy:
            request.setResponseCode(429)
            if self.retryAfter is not None:
                request.setHeader(b"retry-after", self.retryAfter)
            return b"busy"
        return BODY


class BusyServerTests(TestCase):
    """
    A server that says "too many at once, come back in N seconds" (429 or
    503 with C{Retry-After}, as our outbox does past its per-client limit)
    is asked again after that wait, a bounded number of times, over the
    same connection.
    """

    def setUp(self) -> None:
        self.agent, agentPool = makeAgent(reactor)
        self.addCleanup(agentPool.closeCachedConnections)

    def fetch(self, resource: _Busy):
        site = Site(resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/outbox/x"
        return Deferred.fromCoroutine(fetchBytes(self.agent, url, 100, reactor))

    async def _triedAgain(self):
        resource = _Busy(BUSY_RETRIES, b"0")
        self.assertEqual(await self.fetch(resource), BODY)
        self.assertEqual(resource.requests, BUSY_RETRIES + 1)

    def test_triedAgainAfterTheWait(self):
        return Deferred.fromCoroutine(self._triedAgain())

    async def _givesUp(self, resource: _Busy, requests: int):
        with self.assertRaises(FetchError) as caught:
            await self.fetch(resource)
        self.assertIn("HTTP 429", str(caught.exception))
        self.assertEqual(resource.requests, requests)

    def test_givesUpAfterRetries(self):
        """Still busy after L{BUSY_RETRIES} more tries: a L{FetchError}."""
        return Deferred.fromCoroutine(self._givesUp(_Busy(10, b"0"), BUSY_RETRIES + 1))

    def test_noRetryAfter(self):
        """No C{Retry-After}: fails at once."""
        return Deferred.fromCoroutine(self._givesUp(_Busy(1, None), 1))

    def test_retryAfterTooLong(self):
        """A C{Retry-After} longer than L{BUSY_WAIT}: fails at once."""
        return Deferred.fromCoroutine(self._givesUp(_Busy(1, b"%d" % (BUSY_WAIT + 1)), 1))

    def test_retryAfterADate(self):
        """A C{Retry-After} that is a date: fails at once."""
        return Deferred.fromCoroutine(self._givesUp(_Busy(1, b"Wed, 21 Oct 2026 07:28:00 GMT"), 1))


class _Recording:
    """A file's C{write} that records which thread wrote how much."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: list[tuple[bool, int]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((threading.current_thread() is threading.main_thread(), len(data)))
        self.data += data


class SinkFlowControlTests(TestCase):
    """
    A sink that returns a L{Deferred} (its data goes to a thread) holds the
    transfer until it fires.
    """

    def body(self, sink):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from p2pmta.httpclient import _BoundedBody

        protocol = _BoundedBody(sink, 100, Clock(), None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_pausedUntilTheSinkHasIt(self):
        """
        The transfer pauses while the sink's Deferred is pending; what
        arrives meanwhile reaches the sink after it, in order; the body is
        finished only once the sink has it all.
        """
        given, pending = [], []

        def sink(data: bytes):
            given.append(data)
            if data.startswith(b"slow"):
                pending.append(Deferred())
                return pending[-1]
            return None

        protocol, transport = self.body(sink)
        protocol.dataReceived(b"a")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"slow1")
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"b")
        protocol.dataReceived(b"slow2")
        protocol.dataReceived(b"c")
        protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(given, [b"a", b"slow1"])
        self.assertNoResult(protocol.finished)
        pending[0].callback(None)
        self.assertEqual(given, [b"a", b"slow1", b"b", b"slow2"])
        self.assertNoResult(protocol.finished)
        pending[1].callback(None)
        self.assertEqual(given, [b"a", b"slow1", b"b", b"slow2", b"c"])
        self.successResultOf(protocol.finished)

    def test_resumedAfterTheSink(self):
        """The transfer goes on once the sink's Deferred fires."""
        pending = Deferred()
        protocol, transport = self.body(lambda data: pending)
        protocol.dataReceived(b"x")
        self.assertEqual(transport.producerState, "paused")
        pending.callback(None)
        self.assertEqual(transport.producerState, "producing")

    def test_sinkFailureIsOurs(self):
        """
        A sink's Deferred that fails (our disk full) fails the body with
        what it failed with, stops the transfer and passes nothing more.
        """
        import errno

        given, pending = [], Deferred()

        def sink(data: bytes):
            given.append(data)
            return pending

        protocol, transport = self.body(sink)
        protocol.dataReceived(b"x")
        protocol.dataReceived(b"y")
        pending.errback(OSError(errno.ENOSPC, "full"))
        self.assertEqual(given, [b"x"])
        self.assertIsInstance(protocol.sinkError, OSError)
        self.failureResultOf(protocol.finished, OSError)
        self.assertEqual(transport.producerState, "stopped")

    def test_tooLargeWhilePaused(self):
        """Bytes over the limit fail the body even while the sink holds it."""
        protocol, transport = self.body(lambda data: Deferred())
        protocol.dataReceived(b"x" * 60)
        protocol.dataReceived(b"y" * 60)
        self.failureResultOf(protocol.finished, FetchError)


class HashingDownloadTests(TestCase):
    """
    L{HashingDownload} over real TCP from our own outbox: a large
    ciphertext is written and hashed by threads, a batch at a time, never
    by the reactor thread.
    """

    def test_writtenInThreads(self):
        from p2pmta.httpclient import WRITE_BATCH, HashingDownload, fetchInto

        async def run():
            pool = ThreadPool(minthreads=1, maxthreads=2, name="test-download")
            pool.start()
            self.addCleanup(pool.stop)
            outbox = Outbox(reactor, os.path.abspath(self.mktemp()), pool)
            blob = os.urandom(3 * WRITE_BATCH + 12345)
            digest = await outbox.add(blob)
            site = makeSite(outbox, lambda: succeed(b"KEY"), logPath=lambda line: None)
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            agent, agentPool = makeAgent(reactor)
            self.addCleanup(agentPool.closeCachedConnections)
            f = _Recording()
            batches: list[int] = []

            def inThreads(g, chunks):
                batches.append(sum(map(len, chunks)))
                return deferToThreadPool(reactor, pool, g, chunks)

            sink = HashingDownload(inThreads, f)
            url = f"http://127.0.0.1:{port.getHost().port}/outbox/{digest}"
            await fetchInto(agent, url, sink, len(blob), reactor)
            self.assertEqual(await sink.finish(), digest)
            self.assertEqual(bytes(f.data), blob)
            self.assertEqual(sink.size, len(blob))
            self.assertEqual([inMain for inMain, _ in f.writes if inMain], [])
            # A thread call per batch of at least WRITE_BATCH, but the last.
            self.assertIn(len(batches), (3, 4))
            self.assertGreaterEqual(min(batches[:-1]), WRITE_BATCH)

        return Deferred.fromCoroutine(run())


class SinkIdleTests(TestCase):
    """The idle timeout measures the other peer's silence, not our disk's."""

    def test_noIdleTimeoutWhileTheSinkHolds(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from p2pmta.httpclient import _BoundedBody

        clock, pending = Clock(), Deferred()
        protocol = _BoundedBody(lambda data: pending, 100, clock, 5)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"x")
        clock.advance(60)
        self.assertNoResult(protocol.finished)
        pending.callback(None)
        clock.advance(4)
        self.assertNoResult(protocol.finished)
        clock.advance(1)
        self.failureResultOf(protocol.finished, FetchError)
