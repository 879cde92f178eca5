# -*- test-case-name: tests.test_web -*-
"""
The resources of the public outbox site (see L{p2pmta.web} for the site
and the limits it puts on each client).

A peer serves exactly these, for C{GET} and C{HEAD}:

  - C{/pubkey}: the peer's ASCII-armoured OpenPGP public key,
    C{application/pgp-keys};
  - C{/outbox/msglist}: the digests held, as the JSON object
    C{{"messages": ["<digest>", ...]}} (sorted), C{application/json};
  - C{/outbox/<digest>}: the ciphertext named by that lowercase hex SHA-256,
    C{application/octet-stream}, streamed, with byte ranges;
  - C{/outbox/batch?d=<digest>&d=<digest>...}: up to L{MAX_PULL_BATCH}
    ciphertexts in one answer, C{application/x-p2pmta-batch} (see
    L{Batch}): a receiver opening many messages from one sender pays for
    one request, not one each.

Every other path is 404.  A name is checked against C{^[0-9a-f]{64}$} before
the file system is touched, and nothing but a regular file named by a digest
directly in the outbox folder is ever served: no directory listing, no
redirect, no 500.  A C{Range} header is honoured for a single range only;
several ranges, or a malformed header, are ignored and the whole ciphertext
is sent, so no response is larger than the ciphertext.
"""

import json
import re
from collections.abc import Callable

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web import http, server, static
from twisted.web.resource import Resource

from p2pmta.batch import MAX_PULL_BATCH, BatchProducer
from p2pmta.store import isDigest

#: The methods served; every other is answered 405.
ALLOWED_METHODS = (b"GET", b"HEAD")


class ErrorPage(Resource):
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


_NOT_FOUND = ErrorPage(404, b"Not found.\n")
BAD_TARGET = ErrorPage(400, b"Bad request: the target must be a path.\n")
NOT_ALLOWED = ErrorPage(
    405, b"Method not allowed.\n", [(b"allow", b", ".join(ALLOWED_METHODS))]
)
_UNAVAILABLE = ErrorPage(503, b"Temporarily unavailable.\n")
_BAD_BATCH = ErrorPage(
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


#: How much of a ciphertext's file is read and written to its client at a
#: time: Twisted's 64 KiB made a 1 MB message (1.4 MB in base64) 22 turns
#: of the reactor.  See also L{p2pmta.transports.SEND_LIMIT}.
READ_SIZE = 256 * 1024


class Ciphertext(static.File):
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
        of the file, and fails with a 500 on some malformed headers.  It
        reads L{READ_SIZE} bytes at a time.
        """
        producer = self._producer(request, fileForReading)
        producer.bufferSize = READ_SIZE
        return producer

    def _producer(self, request, fileForReading):
        size = self.getFileSize()
        header = request.getHeader(b"range")
        wanted = None if header is None else _byteRange(header, size)
        if wanted is None:
            self._setContentHeaders(request, size)
            request.setResponseCode(http.OK)
            return _Body(request, fileForReading, 0, size)
        if wanted is _UNSATISFIABLE:
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            request.setHeader(b"content-range", b"bytes */%d" % (size,))
            self._setContentHeaders(request, 0)
            return _Body(request, fileForReading, 0, 0)
        first, last = wanted
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
        self._setContentHeaders(request, last - first + 1)
        return _Body(request, fileForReading, first, last - first + 1)


class _Body(static.SingleRangeStaticProducer):
    """
    The producer of a ciphertext, whole or one range of it: Twisted's
    producer of a range, which finishes the response with the write of its
    last bytes.  Twisted's producer of a whole file finishes it only when
    one more read finds the end of the file, a turn of the reactor later
    (HTTP drives a pull producer from a cooperator).  Until then the
    download counted against its client's limit, although the client had
    all of it and could ask for the next: that request was answered 429
    and waited 10 s (once in 2,000 pulls of the benchmark).

    A file that turns out shorter than it was when its response began
    (which a ciphertext's never should) aborts the connection, instead of
    waiting for bytes that will not come.
    """

    log = Logger()

    def resumeProducing(self) -> None:
        request = self.request
        if not request:
            return
        want = min(self.bufferSize, self.size - self.bytesWritten)
        data = self.fileObject.read(want) if want else b""
        if want and not data:
            self.log.warn("a ciphertext shrank while it was served")
            self.stopProducing()
            request.transport.abortConnection()
            return
        if data:
            self.bytesWritten += len(data)
            request.write(data)
        if self.request and self.bytesWritten == self.size:
            request.unregisterProducer()
            request.finish()
            self.stopProducing()


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


class Batch(_Node):
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
        self._batch = Batch(outbox)

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
        return Ciphertext(path.path)


def outboxTree(outbox, publicKey: Callable[[], object]) -> Resource:
    """
    The root of the site serving C{outbox} and C{publicKey} (see
    L{p2pmta.web.makeSite}).
    """
    root = _Node()
    root.putChild(b"pubkey", _PublicKey(publicKey))
    root.putChild(b"outbox", _Outbox(outbox))
    return root
