# -*- test-case-name: tests.test_web -*-
"""
The public outbox over HTTP (the paper's sections 4.3 and 4.5): the site,
its connections and the limits it puts on each client.

What it serves (C{/pubkey}, C{/outbox/msglist}, C{/outbox/<digest>} and
C{/outbox/batch}, for C{GET} and C{HEAD}) is L{p2pmta.webtree}'s.  Every
other path is 404, a target that is not a path (C{*}, an absolute URL,
C{xpubkey}) is 400 (and Twisted's parser answers 400 to some malformed
requests before we see them), and every other method 405.

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
  - a C{Range} header is honoured for a single range only (see
    L{p2pmta.webtree}), so no response is larger than the ciphertext.
"""

import ipaddress
from collections.abc import Callable
from io import BytesIO

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from p2pmta.transports import sendInLargeWrites
from p2pmta.webtree import (
    ALLOWED_METHODS,
    BAD_TARGET,
    NOT_ALLOWED,
    Batch,
    Ciphertext,
    ErrorPage,
    outboxTree,
)

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


_REFUSED_BODY = b"Too many connections from your address; retry later.\n"


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
        # A ciphertext of a megabyte goes out in one send, not eleven.
        sendInLargeWrites(self.transport)
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
        self._tooMany = ErrorPage(
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
        if request.method not in ALLOWED_METHODS:
            return NOT_ALLOWED
        if not request.path.startswith(b"/"):
            # Twisted drops the first byte of any target, so "xpubkey" would
            # be /pubkey: only paths (origin-form) are served.
            return BAD_TARGET
        resource = super().getResourceFor(request)
        if isinstance(resource, (Ciphertext, Batch)):
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
    return OutboxSite(
        outboxTree(outbox, publicKey),
        logPath=logPath,
        timeout=timeout,
        reactor=reactor,
        requestTimeout=requestTimeout,
        stallTimeout=stallTimeout,
        maxConnectionsPerClient=maxConnectionsPerClient,
        maxDownloadsPerClient=maxDownloadsPerClient,
        retryAfter=retryAfter,
    )
