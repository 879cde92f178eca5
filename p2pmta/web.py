# -*- test-case-name: tests.test_web -*-
"""
The public outbox over HTTP (the paper's sections 4.3 and 4.5).

A peer serves exactly these, for C{GET} and C{HEAD}:

  - C{/pubkey}: the peer's ASCII-armoured OpenPGP public key,
    C{application/pgp-keys};
  - C{/outbox/msglist}: the digests held, as the JSON object
    C{{"messages": ["<digest>", ...]}} (sorted), C{application/json};
  - C{/outbox/<digest>}: the ciphertext named by that lowercase hex SHA-256,
    C{application/octet-stream}, streamed, with byte ranges;
  - C{/outbox/batch?d=<digest>&d=<digest>...}: up to L{MAX_PULL_BATCH}
    ciphertexts in one answer, C{application/x-p2pmta-batch} (see
    L{_Batch}): a receiver opening many messages from one sender pays for
    one request, not one each.

Every other path is 404, a target that is not a path (C{*}, an absolute
URL, C{xpubkey}) is 400 (and Twisted's parser answers 400 to some malformed
requests before we see them), and every other method 405.  A name is checked
against C{^[0-9a-f]{64}$} before the file system is touched, and nothing but
a regular file named by a digest directly in the outbox folder is ever served:
no directory listing, no redirect, no 500.

Strangers may use it, so what each client can take is bounded (all limits are
arguments of L{makeSite}):

  - a request must arrive whole (line, headers and any body) within
    C{requestTimeout} seconds of its first byte, or it is answered 408 and
    the connection closed: a client sending its headers a byte at a time
    holds nothing for long;
  - a client that leaves a response unread for C{stallTimeout} seconds
    (the send buffer stays full) is disconnected;
  - a client (an IPv4 address, or an IPv6 /64) may hold
    C{maxConnectionsPerClient} connections, and the next is answered 503
    with C{Retry-After}; it may download C{maxDownloadsPerClient}
    ciphertexts at once, and the next is answered 429 with C{Retry-After};
  - a C{Range} header is honoured for a single range only; several ranges,
    or a malformed header, are ignored and the whole ciphertext is sent, so
    no response is larger than the ciphertext.
"""

import ipaddress
import json
import re
from collections.abc import Callable
from io import BytesIO

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server, static
from twisted.web.resource import Resource

from p2pmta.batch import MAX_PULL_BATCH, BatchProducer
from p2pmta.store import isDigest

IDLE_TIMEOUT = 180
"""
Seconds a connection may stay idle, or take to send a request, before it is
closed.  Twisted does not apply it while a response is being written.  Long
enough for a receiver's connections to outlive a few polls (an idle
connection costs no bytes; a new one costs a handshake and a close), and
longer than our client keeps them
(L{p2pmta.httpclient.CACHED_CONNECTION_TIMEOUT}).
"""

REQUEST_TIMEOUT = 30
"""
Seconds a client has, from the first byte of a request, to send all of it.
"""

STALL_TIMEOUT = 60
"""
Seconds a client may leave a response unread before it is disconnected.
"""

MAX_CONNECTIONS_PER_CLIENT = 32
"""Connections one client (IPv4 address or IPv6 /64) may hold at once."""

MAX_DOWNLOADS_PER_CLIENT = 8
"""Ciphertexts one client (IPv4 address or IPv6 /64) may download at once."""

RETRY_AFTER = 10
"""The C{Retry-After} of 429 and 503 answers, in seconds."""

ACCESS_LOG_NAMESPACE = "p2pmta.web.access"
"""The L{twisted.logger} namespace of access-log events."""

COMPLAINT_INTERVAL = 60.0
"""Seconds between two log lines about the same client hitting a limit."""

_ALLOWED_METHODS = (b"GET", b"HEAD")

_accessLog = Logger(namespace=ACCESS_LOG_NAMESPACE)


def clientKey(address) -> str:
    """
    @return: whom the per-client limits count C{address} (an L{IAddress})
        as: its IPv4 address (also when written as an IPv4-mapped IPv6
        address), the /64 of its IPv6 address (one host usually has a whole
        /64), or C{"local"} for a UNIX socket.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "local"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Error(Resource):
    """
    A short plain-text error answered to every method, for every path below.
    """

    isLeaf = True

    def __init__(self, code: int, message: bytes, headers=()) -> None:
        super().__init__()
        self._code = code
        self._message = message
        self._headers = headers

    def render(self, request) -> bytes:
        request.setResponseCode(self._code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in self._headers:
            request.setHeader(name, value)
        return self._message


_NOT_FOUND = _Error(404, b"Not found.\n")
_BAD_TARGET = _Error(400, b"Bad request: the target must be a path.\n")
_REFUSED_BODY = b"Too many connections from your address; retry later.\n"
_NOT_ALLOWED = _Error(
    405, b"Method not allowed.\n", [(b"allow", b", ".join(_ALLOWED_METHODS))]
)
_UNAVAILABLE = _Error(503, b"Temporarily unavailable.\n")
_BAD_BATCH = _Error(
    400,
    b"Bad request: ask for 1 to %d distinct digests, as d=<digest>.\n"
    % (MAX_PULL_BATCH,),
)


class _Node(Resource):
    """
    A resource with no children but those put in it: any other path below it
    is 404, and so is the node itself unless it renders something.
    """

    def getChild(self, name: bytes, request) -> Resource:
        return _NOT_FOUND

    def render(self, request) -> bytes:
        # Only GET and HEAD get this far; HEAD is rendered by render_GET.
        if getattr(self, "render_GET", None) is None:
            return _NOT_FOUND.render(request)
        return super().render(request)


class _PublicKey(_Node):
    """
    C{/pubkey}: the peer's ASCII-armoured public key.
    """

    log = Logger()

    def __init__(self, publicKey: Callable[[], object]) -> None:
        super().__init__()
        self._publicKey = publicKey

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addBoth(gone.append)

        def send(key: bytes | str) -> None:
            if isinstance(key, str):
                key = key.encode("ascii")
            if gone:
                return
            request.setHeader(b"content-type", b"application/pgp-keys")
            request.setHeader(b"content-length", b"%d" % (len(key),))
            request.write(key)
            request.finish()

        def failed(reason) -> None:
            self.log.failure("could not read the peer's public key", reason)
            if gone:
                return
            request.write(_UNAVAILABLE.render(request))
            request.finish()

        maybeDeferred(self._publicKey).addCallback(send).addErrback(failed)
        return server.NOT_DONE_YET


class _MessageList(_Node):
    """
    C{/outbox/msglist}: C{{"messages": [<digest>, ...]}}, sorted, and, when
    the outbox has them, C{"notifications": [{"key": "hash:<sha1>",
    "entry": <base64>}, ...]}.
    """

    log = Logger()

    def __init__(self, outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def render_GET(self, request) -> bytes:
        try:
            digests = self._outbox.digests()
        except OSError:
            self.log.failure("could not list the outbox")
            return _UNAVAILABLE.render(request)
        listing = {"messages": digests}
        notifications = getattr(self._outbox, "notifications", None)
        if notifications is not None:
            # Opaque DHT entries under key hashes: what group members
            # re-publish while this peer is away.
            listing["notifications"] = notifications()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(listing).encode("ascii")


class _Ciphertext(static.File):
    """
    One stored ciphertext: L{static.File}'s streaming, byte ranges and HEAD,
    without any of its directory behaviour, and with no more headers than a
    client needs (each is paid for on every pull): C{Date} (which HTTP
    requires), C{Content-Length}, C{Content-Type} and
    C{X-Content-Type-Options} (so that no browser ever renders what a group
    member gave us as a page of this peer), and C{Content-Range} when
    answering a range.

    There is no validator: the name is the SHA-256 of the content, which
    never changes, so C{Last-Modified} and C{If-Modified-Since} (or an
    C{ETag}) would buy nothing, and C{Last-Modified} would tell anyone when
    the message was written.  Nor is there C{Accept-Ranges}: a client may
    send C{Range} without being invited to, and is answered all the same.
    """

    log = Logger()

    childNotFound = _NOT_FOUND
    forbidden = _NOT_FOUND

    def __init__(self, path: str) -> None:
        super().__init__(path, defaultType="application/octet-stream")
        self.type = "application/octet-stream"
        self.encoding = None

    def getChild(self, name: bytes, request) -> Resource:
        return _NOT_FOUND

    def directoryListing(self) -> Resource:
        return _NOT_FOUND

    def redirect(self, request) -> bytes:
        return _NOT_FOUND.render(request)

    def render_GET(self, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        self.restat(False)
        if not self.isfile():
            # Removed, or replaced by something else, since the look-up.
            return _NOT_FOUND.render(request)
        try:
            fileForReading = self.openForReading()
        except OSError:
            self.log.failure("could not open {path}", path=self.path)
            return _NOT_FOUND.render(request)
        if request.method == b"HEAD":
            self._setContentHeaders(request)
            fileForReading.close()
            return b""
        self.makeProducer(request, fileForReading).start()
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    def makeProducer(self, request, fileForReading):
        """
        The producer of the body, honouring a single byte range only:
        Twisted's own would answer many overlapping ranges with many copies
        of the file, and fails with a 500 on some malformed headers.
        """
        size = self.getFileSize()
        header = request.getHeader(b"range")
        wanted = None if header is None else _byteRange(header, size)
        if wanted is None:
            self._setContentHeaders(request, size)
            request.setResponseCode(http.OK)
            return static.NoRangeStaticProducer(request, fileForReading)
        if wanted is _UNSATISFIABLE:
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            request.setHeader(b"content-range", b"bytes */%d" % (size,))
            self._setContentHeaders(request, 0)
            return static.SingleRangeStaticProducer(request, fileForReading, 0, 0)
        first, last = wanted
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
        self._setContentHeaders(request, last - first + 1)
        return static.SingleRangeStaticProducer(
            request, fileForReading, first, last - first + 1
        )


_RANGE = re.compile(
    rb"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.IGNORECASE
)

_UNSATISFIABLE = object()

# Larger than any file: what a longer run of digits is taken to mean.
_HUGE = 10**19


def _number(digits: bytes) -> int:
    # int() refuses more than 4300 digits, and nothing needs more than 19.
    return int(digits) if len(digits) <= 19 else _HUGE


def _byteRange(header: bytes, size: int):
    """
    Read a C{Range} header (RFC 9110, section 14) for a file of C{size}
    bytes.

    @return: C{(first, last)}, the inclusive bounds of the one range asked
        for, clamped to the file; L{_UNSATISFIABLE} if it lies beyond the
        file; or L{None} if the header is to be ignored (malformed, or
        several ranges).
    """
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = _number(last)
        if suffix == 0 or size == 0:
            return _UNSATISFIABLE
        return (size - min(suffix, size), size - 1)
    start = _number(first)
    end = _number(last) if last else _HUGE
    if end < start:
        return None
    if start >= size:
        return _UNSATISFIABLE
    return (start, min(end, size - 1))


class _Batch(_Node):
    """
    C{/outbox/batch?d=<digest>&d=<digest>...}: the ciphertexts asked for, in
    the order asked, as C{application/x-p2pmta-batch} (the format is
    L{p2pmta.batch}'s), streamed (chunked) one file after the other.

    A request asking for no digest, more than L{MAX_PULL_BATCH}, the same
    one twice, or anything that is not a lowercase hex SHA-256 is answered
    400; any other parameter is ignored.  One batch counts as one download
    against its client's limit.  Should a file turn out shorter than it was
    when its line was written, the connection is dropped: the client sees a
    truncated answer, never a silently shorter ciphertext.
    """

    def __init__(self, outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def render_GET(self, request):
        wanted = request.args.get(b"d", [])
        if not 0 < len(wanted) <= MAX_PULL_BATCH or len(set(wanted)) != len(wanted):
            return _BAD_BATCH.render(request)
        digests = []
        for name in wanted:
            try:
                digest = name.decode("ascii")
            except UnicodeDecodeError:
                return _BAD_BATCH.render(request)
            if not isDigest(digest):
                return _BAD_BATCH.render(request)
            digests.append(digest)
        request.setHeader(b"content-type", b"application/x-p2pmta-batch")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        if request.method == b"HEAD":
            return b""
        BatchProducer(request, self._outbox, digests).start()
        return server.NOT_DONE_YET


class _Outbox(_Node):
    """
    C{/outbox/}: the message list, the ciphertexts and batches of them.
    """

    def __init__(self, outbox) -> None:
        super().__init__()
        self._outbox = outbox
        self._messageList = _MessageList(outbox)
        self._batch = _Batch(outbox)

    def getChild(self, name: bytes, request) -> Resource:
        if request.postpath:
            # Something follows, even if only a trailing slash.
            return _NOT_FOUND
        if name == b"msglist":
            return self._messageList
        if name == b"batch":
            return self._batch
        try:
            digest = name.decode("ascii")
        except UnicodeDecodeError:
            return _NOT_FOUND
        if not isDigest(digest):
            return _NOT_FOUND
        path = self._outbox.path(digest)
        if path is None:
            return _NOT_FOUND
        return _Ciphertext(path.path)


class _Request(server.Request):
    """
    A request whose response has no C{Server} header (Twisted's names its
    version: bytes on every response, and a hint for whoever looks for
    vulnerable peers), and whose body (we serve only GET and HEAD) is thrown
    away as it arrives rather than kept in memory or a temporary file.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.removeHeader(b"server")
        super().write(data)


class _Channel(http.HTTPChannel):
    """
    An L{http.HTTPChannel} with two more clocks: one for the arrival of a
    whole request (L{requestTimeout} seconds from its first byte), and one
    for a client that does not read what it asked for (L{stallTimeout}
    seconds with the send buffer full).

    @ivar client: the client, as L{clientKey} names it.
    """

    log = Logger()

    requestTimeout: float | None = REQUEST_TIMEOUT
    stallTimeout: float | None = STALL_TIMEOUT
    client = "unknown"

    _requestCall = None
    _stallCall = None
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        noDelay = getattr(self.transport, "setTcpNoDelay", None)
        if noDelay is not None:
            # An answer's last bytes must not wait for the client's
            # delayed ACK (Nagle).
            noDelay(True)
        self.site._connected(self)
        self._counted = True

    def dataReceived(self, data: bytes) -> None:
        # A request starts: it has requestTimeout seconds to arrive whole.
        # (While one is being answered, what comes next is only buffered.)
        if (
            self._requestCall is None
            and not self._handlingRequest
            and self.requestTimeout
        ):
            self._requestCall = self.callLater(
                self.requestTimeout, self._requestTooSlow
            )
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel("_requestCall")
        super().allContentReceived()

    def pauseProducing(self) -> None:
        # The transport's buffer is full: the client is not reading.
        super().pauseProducing()
        if self._stallCall is None and self.stallTimeout:
            self._stallCall = self.callLater(self.stallTimeout, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel("_stallCall")
        super().resumeProducing()

    def connectionLost(self, reason) -> None:
        self._cancel("_requestCall")
        self._cancel("_stallCall")
        super().connectionLost(reason)
        if self._counted:
            self._counted = False
            self.site._disconnected(self)

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            setattr(self, name, None)
            if call.active():
                call.cancel()

    def _requestTooSlow(self) -> None:
        self._requestCall = None
        self.log.info(
            "{client} took over {timeout}s to send a request: answered 408",
            client=self.client,
            timeout=self.requestTimeout,
        )
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\n"
            b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        # Close once that is written, and abort if the client holds on.
        self.timeoutConnection()

    def _stalled(self) -> None:
        self._stallCall = None
        self.log.info(
            "{client} read nothing for {timeout}s: disconnected",
            client=self.client,
            timeout=self.stallTimeout,
        )
        self.transport.abortConnection()


class _Refused(Protocol):
    """
    A connection past a client's limit: answered 503 with C{Retry-After} at
    once, then closed when the client closes its side (or after C{linger}
    seconds).  Whatever it sends is thrown away.
    """

    def __init__(self, clock, retryAfter: int, linger: float = 5.0) -> None:
        self._clock = clock
        self._retryAfter = retryAfter
        self._linger = linger
        self._abort = None

    def connectionMade(self) -> None:
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Retry-After: %d\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
            % (self._retryAfter, len(_REFUSED_BODY))
            + _REFUSED_BODY
        )
        # Half-close: closing outright with the request unread would send
        # a reset, which may destroy the answer before the client reads it.
        loseWrite = getattr(self.transport, "loseWriteConnection", None)
        if loseWrite is None:
            self.transport.loseConnection()
        else:
            loseWrite()
        self._abort = self._clock.callLater(
            self._linger, self.transport.abortConnection
        )

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None


class _LineWriter:
    """
    The log "file" of an L{OutboxSite}: hands each line to a callable.
    """

    def __init__(self, emit: Callable[[str], object]) -> None:
        self._emit = emit

    def write(self, data: str) -> None:
        for line in data.splitlines():
            if line:
                self._emit(line)

    def close(self) -> None:
        pass


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _logAccess(line: str) -> None:
    _accessLog.info("{line}", line=line)


class OutboxSite(server.Site):
    """
    The outbox's L{server.Site}: only GET and HEAD, no C{Server} header, and
    an access log in the combined format, written to a file, to a callable,
    or by default to L{twisted.logger} as one C{info} event C{"{line}"} per
    request in the namespace L{ACCESS_LOG_NAMESPACE}.
    """

    protocol = _Channel
    requestFactory = _Request
    displayTracebacks = False

    _limitLog = Logger()

    def __init__(
        self,
        resource: Resource,
        logPath: str | Callable[[str], object] | None = None,
        timeout: float | None = IDLE_TIMEOUT,
        reactor=None,
        requestTimeout: float | None = REQUEST_TIMEOUT,
        stallTimeout: float | None = STALL_TIMEOUT,
        maxConnectionsPerClient: int | None = MAX_CONNECTIONS_PER_CLIENT,
        maxDownloadsPerClient: int | None = MAX_DOWNLOADS_PER_CLIENT,
        retryAfter: int = RETRY_AFTER,
    ) -> None:
        """
        @param resource: The root resource.
        @param logPath: The access log: a file name, a callable given each
            line (a L{str} without its newline), or L{None} for
            L{twisted.logger}.
        @param timeout: See L{IDLE_TIMEOUT}.
        @param reactor: The reactor (for timeouts and log timestamps).
        @param requestTimeout: See L{REQUEST_TIMEOUT}; L{None} for none.
        @param stallTimeout: See L{STALL_TIMEOUT}; L{None} for none.
        @param maxConnectionsPerClient: See L{MAX_CONNECTIONS_PER_CLIENT};
            L{None} for no limit.
        @param maxDownloadsPerClient: See L{MAX_DOWNLOADS_PER_CLIENT};
            L{None} for no limit.
        @param retryAfter: See L{RETRY_AFTER}.
        """
        self.requestTimeout = requestTimeout
        self.stallTimeout = stallTimeout
        self.maxConnectionsPerClient = maxConnectionsPerClient
        self.maxDownloadsPerClient = maxDownloadsPerClient
        self.retryAfter = retryAfter
        #: Open connections, by client.
        self.connections: dict[str, int] = {}
        #: Ciphertext downloads in progress, by client.
        self.downloads: dict[str, int] = {}
        self._lastComplaint: dict[tuple[str, str], float] = {}
        self._tooMany = _Error(
            429,
            b"Too many downloads from your address at once; retry later.\n",
            [(b"retry-after", b"%d" % (retryAfter,))],
        )
        self._emitAccess: Callable[[str], object] | None = None
        if logPath is None:
            self._emitAccess = _logAccess
        elif callable(logPath):
            self._emitAccess = logPath
            logPath = None
        kwargs = {} if reactor is None else {"reactor": reactor}
        super().__init__(
            resource,
            logPath=logPath,
            timeout=timeout,
            parsePOSTFormSubmission=False,
            **kwargs,
        )

    def startFactory(self) -> None:
        super().startFactory()
        if self._emitAccess is not None:
            self.logFile = _LineWriter(self._emitAccess)

    def buildProtocol(self, addr):
        key = clientKey(addr)
        limit = self.maxConnectionsPerClient
        if limit is not None and self.connections.get(key, 0) >= limit:
            self._complain(
                key,
                "connections",
                "{client} holds {limit} connections: refused another",
                limit=limit,
            )
            return _Refused(self.reactor, self.retryAfter)
        channel = super().buildProtocol(addr)
        channel.client = key
        channel.requestTimeout = self.requestTimeout
        channel.stallTimeout = self.stallTimeout
        return channel

    def _connected(self, channel: _Channel) -> None:
        self.connections[channel.client] = self.connections.get(channel.client, 0) + 1

    def _disconnected(self, channel: _Channel) -> None:
        _decrement(self.connections, channel.client)

    def getResourceFor(self, request) -> Resource:
        if request.method not in _ALLOWED_METHODS:
            return _NOT_ALLOWED
        if not request.path.startswith(b"/"):
            # Twisted drops the first byte of any target, so "xpubkey" would
            # be /pubkey: only paths (origin-form) are served.
            return _BAD_TARGET
        resource = super().getResourceFor(request)
        if isinstance(resource, (_Ciphertext, _Batch)):
            return self._admit(request, resource)
        return resource

    def _admit(self, request, resource: Resource) -> Resource:
        """
        Count a download against its client's limit until it is done.
        """
        key = clientKey(request.getClientAddress())
        limit = self.maxDownloadsPerClient
        if limit is not None and self.downloads.get(key, 0) >= limit:
            self._complain(
                key,
                "downloads",
                "{client} is downloading {limit} ciphertexts: answered 429",
                limit=limit,
            )
            return self._tooMany
        self.downloads[key] = self.downloads.get(key, 0) + 1
        request.notifyFinish().addBoth(lambda _: _decrement(self.downloads, key))
        return resource

    def _complain(self, key: str, what: str, format: str, **kwargs) -> None:
        """
        Log that a client hit a limit, at most once every
        L{COMPLAINT_INTERVAL} seconds per client and limit.
        """
        now = self.reactor.seconds()
        last = self._lastComplaint.get((key, what))
        if last is not None and now - last < COMPLAINT_INTERVAL:
            return
        if len(self._lastComplaint) > 4096:
            self._lastComplaint = {
                k: t
                for k, t in self._lastComplaint.items()
                if now - t < COMPLAINT_INTERVAL
            }
        self._lastComplaint[(key, what)] = now
        self._limitLog.info(format, client=key, **kwargs)


def makeSite(
    outbox,
    publicKey: Callable[[], object],
    logPath: str | Callable[[str], object] | None = None,
    timeout: float | None = IDLE_TIMEOUT,
    reactor=None,
    requestTimeout: float | None = REQUEST_TIMEOUT,
    stallTimeout: float | None = STALL_TIMEOUT,
    maxConnectionsPerClient: int | None = MAX_CONNECTIONS_PER_CLIENT,
    maxDownloadsPerClient: int | None = MAX_DOWNLOADS_PER_CLIENT,
    retryAfter: int = RETRY_AFTER,
) -> OutboxSite:
    """
    Build the peer's public web site (see the module docstring for what it
    serves).

    @param outbox: The L{p2pmta.interfaces.IOutbox} to serve.
    @param publicKey: A callable returning the peer's ASCII-armoured public
        key (L{bytes}), or a Deferred firing with it, such as
        L{p2pmta.interfaces.IKeyring.publicKey}.  Called for each request.
    @param logPath: The access log: a file name, a callable given each line,
        or L{None} for L{twisted.logger} (namespace L{ACCESS_LOG_NAMESPACE}).
    @param timeout: See L{IDLE_TIMEOUT}.
    @param reactor: The reactor, for timeouts and log timestamps; the global
        one if L{None}.
    @param requestTimeout: See L{REQUEST_TIMEOUT}; L{None} for none.
    @param stallTimeout: See L{STALL_TIMEOUT}; L{None} for none.
    @param maxConnectionsPerClient: See L{MAX_CONNECTIONS_PER_CLIENT};
        L{None} for no limit.
    @param maxDownloadsPerClient: See L{MAX_DOWNLOADS_PER_CLIENT}; L{None}
        for no limit.
    @param retryAfter: See L{RETRY_AFTER}.

    @return: The site, for C{listenTCP} or C{strports.service}.
    """
    root = _Node()
    root.putChild(b"pubkey", _PublicKey(publicKey))
    root.putChild(b"outbox", _Outbox(outbox))
    return OutboxSite(
        root,
        logPath=logPath,
        timeout=timeout,
        reactor=reactor,
        requestTimeout=requestTimeout,
        stallTimeout=stallTimeout,
        maxConnectionsPerClient=maxConnectionsPerClient,
        maxDownloadsPerClient=maxDownloadsPerClient,
        retryAfter=retryAfter,
    )
