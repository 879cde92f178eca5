# -*- test-case-name: tests.test_web -*-
"""
The public outbox over HTTP (the paper's sections 4.3 and 4.5).

A peer serves exactly these, for C{GET} and C{HEAD}:

  - C{/pubkey}: the peer's ASCII-armoured OpenPGP public key,
    C{application/pgp-keys};
  - C{/outbox/msglist}: the digests held, as the JSON object
    C{{"messages": ["<digest>", ...]}} (sorted), C{application/json};
  - C{/outbox/<digest>}: the ciphertext named by that lowercase hex SHA-256,
    C{application/octet-stream}, streamed, with byte ranges.

Every other path is 404 (Twisted's parser answers 400 to some malformed
requests before we see them) and every other method 405.  A name is checked
against C{^[0-9a-f]{64}$} before the file system is touched, and nothing but
a regular file named by a digest directly in the outbox folder is ever served:
no directory listing, no redirect, no 500.
"""

import json
from collections.abc import Callable
from io import BytesIO

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web import server, static
from twisted.web.resource import Resource

from p2pmta.store import isDigest

SERVER_NAME = b"p2pmta"
"""The C{Server} header of every response."""

IDLE_TIMEOUT = 60
"""
Seconds a connection may stay idle, or take to send a request, before it is
closed.  Twisted does not apply it while a response is being written.
"""

ACCESS_LOG_NAMESPACE = "p2pmta.web.access"
"""The L{twisted.logger} namespace of access-log events."""

_ALLOWED_METHODS = (b"GET", b"HEAD")

_accessLog = Logger(namespace=ACCESS_LOG_NAMESPACE)


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
_NOT_ALLOWED = _Error(
    405, b"Method not allowed.\n", [(b"allow", b", ".join(_ALLOWED_METHODS))]
)
_UNAVAILABLE = _Error(503, b"Temporarily unavailable.\n")


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
    One stored ciphertext: L{static.File} (streaming, byte ranges, HEAD,
    If-Modified-Since) without any of its directory behaviour.
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
        try:
            return super().render_GET(request)
        except OSError:
            # Removed, or replaced by something unreadable, since the look-up.
            self.log.failure("could not open {path}", path=self.path)
            return _NOT_FOUND.render(request)

    render_HEAD = render_GET


class _Outbox(_Node):
    """
    C{/outbox/}: the message list and the ciphertexts.
    """

    def __init__(self, outbox) -> None:
        super().__init__()
        self._outbox = outbox
        self._messageList = _MessageList(outbox)

    def getChild(self, name: bytes, request) -> Resource:
        if request.postpath:
            # Something follows, even if only a trailing slash.
            return _NOT_FOUND
        if name == b"msglist":
            return self._messageList
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
    A request whose response names p2pmta, not Twisted's version, as its
    server, and whose body (we serve only GET and HEAD) is thrown away as it
    arrives rather than kept in memory or a temporary file.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.setHeader(b"server", SERVER_NAME)
        super().write(data)


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


def _logAccess(line: str) -> None:
    _accessLog.info("{line}", line=line)


class OutboxSite(server.Site):
    """
    The outbox's L{server.Site}: only GET and HEAD, a C{Server: p2pmta}
    header, and an access log in the combined format, written to a file, to
    a callable, or by default to L{twisted.logger} as one C{info} event
    C{"{line}"} per request in the namespace L{ACCESS_LOG_NAMESPACE}.
    """

    requestFactory = _Request
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        logPath: str | Callable[[str], object] | None = None,
        timeout: float | None = IDLE_TIMEOUT,
        reactor=None,
    ) -> None:
        """
        @param resource: The root resource.
        @param logPath: The access log: a file name, a callable given each
            line (a L{str} without its newline), or L{None} for
            L{twisted.logger}.
        @param timeout: See L{IDLE_TIMEOUT}.
        @param reactor: The reactor (for timeouts and log timestamps).
        """
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

    def getResourceFor(self, request) -> Resource:
        if request.method not in _ALLOWED_METHODS:
            return _NOT_ALLOWED
        return super().getResourceFor(request)


def makeSite(
    outbox,
    publicKey: Callable[[], object],
    logPath: str | Callable[[str], object] | None = None,
    timeout: float | None = IDLE_TIMEOUT,
    reactor=None,
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

    @return: The site, for C{listenTCP} or C{strports.service}.
    """
    root = _Node()
    root.putChild(b"pubkey", _PublicKey(publicKey))
    root.putChild(b"outbox", _Outbox(outbox))
    return OutboxSite(root, logPath=logPath, timeout=timeout, reactor=reactor)
