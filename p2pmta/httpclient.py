# -*- test-case-name: tests.test_httpclient,tests.test_hostile_web,tests.test_descriptor -*-
"""
Reading other peers' outboxes over HTTP, bounded in size and time.

Whoever runs the other end may be hostile, so every fetch is bounded:

  - the connection and the response's headers must come within C{timeout}
    seconds (a port that accepts and never answers, or answers a byte a
    second, fails then);
  - the headers may take at most L{MAX_HEADER_BYTES} when the agent's pool
    is a L{BoundedHTTPConnectionPool} (Twisted's client has no limit on
    how many header lines it collects);
  - the body may not be larger than the caller expects: a larger
    C{Content-Length} fails at once, and a body that goes on fails at the
    first byte too many, so no more is ever read or kept;
  - the body may not go quiet for C{timeout} seconds, and must have arrived
    C{timeout + maxSize / minRate} seconds after the headers.

Every failure is a L{FetchError}, and a fetch that fails drops its
connection.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from p2pmta.errors import FetchError
from p2pmta.fileutil import HashingSink

TIMEOUT = 30.0
"""
Seconds to wait for a connection and a response's headers, and the longest
silence allowed while its body arrives.
"""

MIN_RATE = 16 * 1024
"""
The slowest average rate, in bytes per second, that a body may arrive at
(beyond the first L{TIMEOUT} seconds).
"""

BUSY_RETRIES = 2
"""
How many times a pull answered 429 or 503 with a C{Retry-After} of at most
L{BUSY_WAIT} seconds tries again, after that wait.
"""

BUSY_WAIT = 15
"""The longest C{Retry-After}, in seconds, that a pull waits out."""

BUSY_BODY = 4096
"""The most bytes of a busy answer read (to keep its connection)."""

MAX_HEADER_BYTES = 64 * 1024
"""The most bytes of status line and headers a response may have."""

MAX_PERSISTENT_PER_HOST = 8
"""
Idle connections kept open to one peer: as many as a peer lets one client
download at once (L{p2pmta.web.MAX_DOWNLOADS_PER_CLIENT}), so that a burst
of pulls reuses its connections instead of closing all but Twisted's
default two and opening them again for the next burst.
"""

CACHED_CONNECTION_TIMEOUT = 150
"""
Seconds an idle connection is kept: longer than two polls apart (see
L{p2pmta.config.DEFAULT_POLL_INTERVAL}), shorter than a peer keeps it
(L{p2pmta.web.IDLE_TIMEOUT}), so that we close it rather than send a
request just as the peer does.
"""


READ_SIZE = 256 * 1024
"""
How many bytes a connection reads at a time, against Twisted's 64 KiB: a
1 MB ciphertext comes in a few reads, not in some twenty, each a system
call, a turn of the reactor and a pass through the HTTP parser.  Raw
peers fetching 300 messages of 1 MB: 5.7-6.2 ms a message against 6.1-6.7
with Twisted's size, then 6.0-6.7 against 6.2-6.8 (benchmarks/README.md).
"""


class _HeaderBoundedProtocol(HTTP11ClientProtocol):
    """
    An L{HTTP11ClientProtocol} that drops the connection once a response's
    status line and headers pass L{MAX_HEADER_BYTES}: Twisted limits each
    line, not how many there are.  It reads L{READ_SIZE} bytes at a time.
    """

    maxHeaderBytes = MAX_HEADER_BYTES
    _headerBytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        if getattr(self.transport, "bufferSize", None):  # TCP's
            self.transport.bufferSize = READ_SIZE

    def request(self, request):
        self._headerBytes = 0
        return super().request(request)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        parser = getattr(self, "_parser", None)
        if parser is not None and parser.state in (STATUS, HEADER):
            # Still in the headers after all of it: all of it was headers.
            self._headerBytes += len(data)
            if self._headerBytes > self.maxHeaderBytes and self.transport is not None:
                self.transport.abortConnection()


class _HeaderBoundedFactory(Factory):
    """
    What L{HTTPConnectionPool} builds its connections with (the signature
    of Twisted's C{_HTTP11ClientFactory}).
    """

    def __init__(self, quiescentCallback, metadata) -> None:
        self._quiescentCallback = quiescentCallback
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"_HeaderBoundedFactory({self._quiescentCallback}, {self._metadata})"

    def buildProtocol(self, addr):
        return _HeaderBoundedProtocol(self._quiescentCallback)


class BoundedHTTPConnectionPool(HTTPConnectionPool):
    """
    An L{HTTPConnectionPool} whose connections refuse responses with more
    than L{MAX_HEADER_BYTES} of headers.  Give it to the L{Agent} that
    L{fetchInto} uses.
    """

    _factory = _HeaderBoundedFactory

    def getConnection(self, key, endpoint):
        # Twisted hands out the connection idle longest; take the one idle
        # shortest instead.  Its acknowledgement of the last response is
        # then often still pending and rides on this request instead of
        # going alone, and the other connections idle out when traffic
        # thins.
        connections = self._connections.get(key)
        if connections:
            connections.insert(0, connections.pop())
        return super().getConnection(key, endpoint)


def makeAgent(
    reactor,
    persistent: bool = True,
    maxPersistentPerHost: int = MAX_PERSISTENT_PER_HOST,
    cachedConnectionTimeout: float = CACHED_CONNECTION_TIMEOUT,
) -> tuple[Agent, BoundedHTTPConnectionPool]:
    """
    @param maxPersistentPerHost: See L{MAX_PERSISTENT_PER_HOST}.
    @param cachedConnectionTimeout: See L{CACHED_CONNECTION_TIMEOUT}.

    @return: an L{Agent} for L{fetchInto}, and its pool (whose
        C{closeCachedConnections} a service calls when it stops).
    """
    pool = BoundedHTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = maxPersistentPerHost
    pool.cachedConnectionTimeout = cachedConnectionTimeout
    return Agent(reactor, pool=pool), pool


def _retryAfter(response) -> float | None:
    """
    How long a 429 or 503 answer asks us to wait before trying again, if
    it says so in seconds and that is at most L{BUSY_WAIT}; else L{None}.
    """
    if response.code not in (429, 503):
        return None
    values = response.headers.getRawHeaders(b"retry-after") or [b""]
    try:
        seconds = int(values[-1].strip())
    except ValueError:  # absent, or an HTTP date
        return None
    return float(seconds) if 0 <= seconds <= BUSY_WAIT else None


class _Discard(Protocol):
    """
    A body nobody wants: its connection is dropped rather than read to the
    end (it may be huge, or never end).
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _BoundedBody(Protocol):
    """
    Pass a response body to C{sink} (a callable taking bytes), failing
    L{finished} with L{FetchError} once more than C{maxSize} bytes arrive
    or none for C{idleTimeout} seconds.  Cancelling L{finished} stops the
    transfer too.  Once failed, the connection is dropped and nothing more
    reaches C{sink}.

    C{sink} may return a L{Deferred} (its data goes to a thread, say): the
    transfer then pauses until it fires, what arrives meanwhile waits its
    turn, and L{finished} fires after it.  A failed one fails the fetch.

    @ivar finished: a L{Deferred} firing with L{None} once the whole body
        has been passed on.
    @ivar sinkError: what C{sink} raised, if it did: our own failure (a
        full disk, say), not the other peer's.
    """

    def __init__(self, sink, maxSize: int, clock, idleTimeout: float | None) -> None:
        self.finished: Deferred = Deferred(self._cancelled)
        self._sink = sink
        self._remaining = maxSize
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._idle = None
        self._done = False
        self.sinkError: Exception | None = None
        # The sink's Deferred not yet fired, what arrived meanwhile, and
        # the end of the body if it came meanwhile.
        self._sinking: Deferred | None = None
        self._waiting: list[bytes] = []
        self._ended: Failure | None = None

    def connectionMade(self) -> None:
        if self._idleTimeout:
            self._idle = self._clock.callLater(self._idleTimeout, self._tooQuiet)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._remaining -= len(data)
        if self._remaining < 0:
            self._fail(FetchError("response larger than expected"))
            return
        if self._idle is not None:
            self._idle.reset(self._idleTimeout)
        if self._sinking is not None:
            # Bytes already read when the transport was paused.
            self._waiting.append(data)
            return
        self._pass(data)

    def _pass(self, data: bytes) -> None:
        try:
            result = self._sink(data)
        except Exception as e:
            self.sinkError = e
            self._fail(Failure())
            return
        if isinstance(result, Deferred):
            self._sinking = result
            self.transport.pauseProducing()
            # Our own disk's time is not the other peer's silence.
            self._stopClock()
            result.addCallbacks(self._sunk, self._sinkFailed)

    def _sunk(self, _) -> None:
        self._sinking = None
        if self._done:
            return
        while self._waiting and self._sinking is None and not self._done:
            self._pass(self._waiting.pop(0))
        if self._sinking is not None or self._done:
            return
        if self._ended is not None:
            self._end(self._ended)
            return
        if self._idleTimeout and self._idle is None:
            self._idle = self._clock.callLater(self._idleTimeout, self._tooQuiet)
        self.transport.resumeProducing()

    def _sinkFailed(self, reason: Failure) -> None:
        self._sinking = None
        if self._done:
            return
        self.sinkError = reason.value
        self._fail(reason)

    def connectionLost(self, reason: Failure) -> None:
        self._stopClock()
        if self._done:
            return
        if self._sinking is not None and reason.check(ResponseDone, PotentialDataLoss):
            # All arrived; the sink has yet to take it all.
            self._ended = reason
            return
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        self._done = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(FetchError(f"connection lost: {_why(reason.value)}"))

    def _tooQuiet(self) -> None:
        self._idle = None
        self._fail(FetchError(f"nothing received for {self._idleTimeout:g}s"))

    def _fail(self, why) -> None:
        if self._done:
            return
        self._done = True
        self._stopClock()
        self.transport.stopProducing()
        self.finished.errback(why)

    def _cancelled(self, finished: Deferred) -> None:
        # The Deferred then fails with CancelledError by itself.
        if self._done:
            return
        self._done = True
        self._stopClock()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stopClock(self) -> None:
        if self._idle is not None:
            if self._idle.active():
                self._idle.cancel()
            self._idle = None


def _timedOut(what: str):
    """
    An C{onTimeoutCancel} for L{Deferred.addTimeout}: whatever the
    cancellation gave, the fetch failed for want of time.
    """

    def timedOut(result, timeout: float) -> Failure:
        if not isinstance(result, Failure) and hasattr(result, "deliverBody"):
            # A response came just as time ran out: too late all the same.
            result.deliverBody(_Discard())
        return Failure(FetchError(f"{what} within {timeout:g}s"))

    return timedOut


def _why(error: BaseException) -> str:
    """
    A short reason for a failed fetch.
    """
    if isinstance(error, FetchError):
        return str(error.args[0]) if error.args else "failed"
    if isinstance(error, ResponseFailed):
        return (
            "; ".join(f.getErrorMessage() for f in error.reasons) or "response failed"
        )
    return str(error) or type(error).__name__


WRITE_BATCH = 1024 * 1024
"""How many bytes L{HashingDownload} collects before a thread writes them."""


class HashingDownload:
    """
    A sink for L{fetchInto} that hashes what it is given and writes it to a
    file, in threads, L{WRITE_BATCH} bytes at a time: the reactor thread
    only collects chunks (hashing and writing a megabyte would cost it a
    few milliseconds).  It returns a L{Deferred} when it hands a batch to a
    thread, so the transfer waits for each write, and writes never overlap.

    @ivar size: how many bytes were written.
    """

    def __init__(self, inThreads, f, batch: int = WRITE_BATCH) -> None:
        """
        @param inThreads: runs a blocking call in a thread and returns a
            L{Deferred} of its result (L{p2pmta.service.Peer.inThreads}).
        @param f: what to write to: anything with C{write}.
        """
        self._inThreads = inThreads
        self._sink = HashingSink(f)
        self._batch = batch
        self._chunks: list[bytes] = []
        self._collected = 0
        self._writing: Deferred | None = None

    @property
    def size(self) -> int:
        return self._sink.size

    def __call__(self, data: bytes) -> Deferred | None:
        self._chunks.append(data)
        self._collected += len(data)
        if self._collected >= self._batch:
            return self._write()
        return None

    def _write(self) -> Deferred:
        chunks, self._chunks, self._collected = self._chunks, [], 0
        writing = self._writing = self._inThreads(self._sink.writelines, chunks)

        def written(result):
            if self._writing is writing:
                self._writing = None
            return result

        return writing.addBoth(written)

    async def finish(self) -> str:
        """
        Write what is left, once the transfer is over.

        @return: the lowercase hex SHA-256 of everything written.
        """
        if self._chunks:
            await self._write()
        return self._sink.hash.hexdigest()

    async def settled(self) -> None:
        """
        Wait for the write in a thread, if one runs, whatever its outcome:
        before the file is rewound or closed after a failed transfer.
        """
        while self._writing is not None:
            try:
                await self._writing
            except Exception:
                pass


async def fetchInto(
    agent: Agent,
    url: str,
    sink,
    maxSize: int,
    reactor,
    timeout: float = TIMEOUT,
    minRate: float = MIN_RATE,
) -> None:
    """
    GET C{url} and pass its body, chunk by chunk, to C{sink}.

    @param maxSize: the most bytes the body may have.
    @param timeout: see L{TIMEOUT}.
    @param minRate: see L{MIN_RATE}.

    A 429 or 503 answer with a short C{Retry-After} is tried again after
    that wait (see L{BUSY_RETRIES}).

    @raise FetchError: on a network error, a status other than 200, a body
        over C{maxSize} bytes, or a server too slow (see the module
        docstring).  What C{sink} raises (a full disk of ours) is raised
        as it is: another server would not do better.
    """
    for attempt in range(BUSY_RETRIES + 1):
        # Host is all the request carries: no User-Agent, which would cost
        # bytes on every pull and tell every peer our version.
        requested = agent.request(b"GET", url.encode("ascii"))
        requested.addTimeout(timeout, reactor, onTimeoutCancel=_timedOut("no answer"))
        try:
            response = await requested
        except Exception as e:
            raise FetchError(f"{url}: {_why(e)}") from None
        wait = _retryAfter(response) if attempt < BUSY_RETRIES else None
        if wait is None:
            break
        # Busy (too many downloads from us at once, say while a group
        # member replicates): read the short answer to its end, so that
        # the connection stays for the next try, and come back when told.
        busy = _BoundedBody(lambda data: None, BUSY_BODY, reactor, timeout)
        response.deliverBody(busy)
        busy.finished.addTimeout(timeout, reactor)
        try:
            await busy.finished
        except Exception:
            pass  # too long or cut short: the next try connects anew
        await deferLater(reactor, wait, lambda: None)
    if response.code != 200:
        response.deliverBody(_Discard())
        raise FetchError(f"{url}: HTTP {response.code}")
    if isinstance(response.length, int) and response.length > maxSize:
        response.deliverBody(_Discard())
        raise FetchError(f"{url}: {response.length} bytes is more than {maxSize}")
    body = _BoundedBody(sink, maxSize, reactor, timeout)
    response.deliverBody(body)
    deadline = timeout + maxSize / minRate
    body.finished.addTimeout(
        deadline, reactor, onTimeoutCancel=_timedOut("body not received")
    )
    try:
        await body.finished
    except Exception as e:
        if body.sinkError is not None:
            # Not the other peer's fault: trying another one will not help.
            raise body.sinkError from None
        raise FetchError(f"{url}: {_why(e)}") from None


async def fetchIntoFile(agent: Agent, url: str, f, maxSize: int, reactor, inThreads) -> str:
    """
    GET C{url} into the file C{f} (anything with C{write}), which threads
    hash and write a batch at a time (see L{HashingDownload}); bounded as
    L{fetchInto} says.  No write of it runs once this returns or raises,
    so the caller may rewind or close C{f} at once.

    @param inThreads: see L{HashingDownload}.
    @return: the lowercase hex SHA-256 of the body.
    """
    sink = HashingDownload(inThreads, f)
    try:
        await fetchInto(agent, url, sink, maxSize, reactor)
        return await sink.finish()
    finally:
        await sink.settled()


async def fetchBytes(
    agent: Agent,
    url: str,
    maxSize: int,
    reactor,
    timeout: float = TIMEOUT,
    minRate: float = MIN_RATE,
) -> bytes:
    """
    GET C{url}, whose body must be at most C{maxSize} bytes (see
    L{fetchInto}).
    """
    chunks: list[bytes] = []
    await fetchInto(agent, url, chunks.append, maxSize, reactor, timeout, minRate)
    return b"".join(chunks)
