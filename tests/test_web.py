"""
Tests for L{p2pmta.web} and L{p2pmta.webtree}: the public outbox over real
HTTP on 127.0.0.1.
"""

import hashlib
import json
import os
import re
import socket
from urllib.parse import quote_from_bytes, unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from p2pmta import transports
from p2pmta.store import Outbox
from p2pmta.web import ACCESS_LOG_NAMESPACE, makeSite
from p2pmta.webtree import READ_SIZE, Ciphertext

CURL = "/usr/bin/curl"

KEY = (
    b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n"
    b"mDMEZtestkeyAAAAFgkrBgEEAdpHDwEBB0A=\n"
    b"-----END PGP PUBLIC KEY BLOCK-----\n"
)

PASSWD_MARKERS = (b"root:", b"/bin/", b"daemon:")

COMBINED = re.compile(
    r'^"127\.0\.0\.1" - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/1\.[01]" (?P<code>\d{3}) '
    r'(?P<length>\d+|-) "(?P<referrer>(?:[^"\\]|\\.)*)" '
    r'"(?P<agent>(?:[^"\\]|\\.)*)"$'
)


class _Tracking(WrappingFactory):
    """
    A wrapping factory that can close every connection it served and tell
    when they are gone, so that no test leaves a socket behind.
    """

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred] = []

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                # Let the wrapped protocol's connectionLost run first.
                reactor.callLater(0, d.callback, None)

    def closeAll(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out.append(rest[:n])
        body = rest[n + 2 :]
    return b"".join(out)


def _parse(response: bytes):
    """
    Split a raw HTTP response into (status, headers, body).
    """
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        body = _dechunk(body)
    return status, headers, body


def _rawExchange(port: int, request: bytes) -> bytes:
    """
    Send C{request} exactly as given and read the answer until the server
    closes the connection (blocking; run it in a thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ServerMixin:
    """
    An outbox in C{<tmp>/outbox} served on an ephemeral 127.0.0.1 port.
    """

    def startServer(self, publicKey=lambda: succeed(KEY), logPath="lines"):
        pool = ThreadPool(minthreads=1, maxthreads=2, name="test-web")
        pool.start()
        self.addCleanup(pool.stop)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.outbox = Outbox(reactor, os.path.join(self.root, "outbox"), pool)
        self.lines: list[str] = []
        if logPath == "lines":
            logPath = self.lines.append
        self.site = makeSite(self.outbox, publicKey, logPath=logPath)
        factory = self.tracking = _Tracking(self.site)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.closeAll)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"

    def raw(self, request: bytes) -> Deferred:
        """
        Send C{request} as-is; fire with (status, headers, body).
        """
        return deferToThread(_rawExchange, self.port, request).addCallback(_parse)

    def rawGet(self, path: bytes, method: bytes = b"GET") -> Deferred:
        return self.raw(
            method + b" " + path + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )

    def curl(self, *args: str) -> Deferred:
        """
        Run curl; fire with (status, headers, body).
        """
        d = getProcessOutputAndValue(
            CURL,
            ["-q", "-sS", "--noproxy", "*", "--max-time", "20", "-D", "-", *args],
        )

        def parsed(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            return _parse(out)

        return d.addCallback(parsed)

    def agent(self) -> Agent:
        return Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))


class ServeTests(_ServerMixin, TestCase):
    """
    What the outbox serves.
    """

    def setUp(self) -> None:
        self.startServer()

    @inlineCallbacks
    def test_noDelay(self):
        """
        Connections to the outbox have TCP_NODELAY: an answer's last bytes
        do not wait for the client's delayed ACK.
        """
        sock = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        while not self.tracking.protocols:
            yield deferLater(reactor, 0.01, lambda: None)
        [wrapper] = self.tracking.protocols
        handle = wrapper.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_largeSends(self):
        """
        The outbox's connections send up to L{transports.SEND_LIMIT} bytes
        at a time: a ciphertext of a megabyte goes out in one send.
        """
        sock = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        while not self.tracking.protocols:
            yield deferLater(reactor, 0.01, lambda: None)
        [wrapper] = self.tracking.protocols
        self.assertEqual(wrapper.transport.SEND_LIMIT, transports.SEND_LIMIT)
        self.assertGreater(transports.SEND_LIMIT, 1024 * 1024 - 1)

    def test_readSize(self):
        """
        A ciphertext's file is read L{READ_SIZE} bytes at a time, whether
        it is served whole or a range of it.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(os.urandom(1000))
        resource = Ciphertext(path)
        for wanted in (None, b"bytes=10-19"):
            request = DummyRequest([b""])
            if wanted is not None:
                request.requestHeaders.setRawHeaders(b"range", [wanted])
            with open(path, "rb") as f:
                producer = resource.makeProducer(request, f)
            self.assertEqual(producer.bufferSize, READ_SIZE)
            self.assertEqual(request.responseCode, 200 if wanted is None else 206)

    def _served(self, data: bytes, wanted=None, shrink: bool = False) -> tuple:
        """
        Serve a ciphertext file holding C{data} (its range C{wanted}) to a
        L{DummyRequest}, truncated once its response began if C{shrink}.

        @return: the events, in order (C{"resume"}, C{("write", n)},
            C{"finish"}), and the request.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        events = []

        class Request(DummyRequest):
            def write(self, chunk):
                events.append(("write", len(chunk)))
                super().write(chunk)

            def finish(self):
                events.append("finish")
                super().finish()

        request = Request([b""])
        request.transport = transport = StringTransport()

        def abort():
            request.go = 0  # DummyRequest's loop, as a real connection's loss ends it
            StringTransport.abortConnection(transport)

        transport.abortConnection = abort
        if wanted is not None:
            request.requestHeaders.setRawHeaders(b"range", [wanted])
        with open(path, "rb") as f:
            producer = Ciphertext(path).makeProducer(request, f)
            if shrink:
                os.truncate(path, len(data) // 2)
            resume = producer.resumeProducing
            producer.resumeProducing = lambda: events.append("resume") or resume()
            producer.start()
        return events, request

    def test_finishedWithItsLastBytes(self):
        """
        A response is finished by the write of its last bytes, whole or a
        range: not one turn of the reactor later, which let the download
        count against its client's limit after the client had it all.
        """
        data = os.urandom(2 * READ_SIZE + 5)
        for wanted, sizes in [(None, [READ_SIZE, READ_SIZE, 5]), (b"bytes=3-", [READ_SIZE, READ_SIZE, 2]),
                              (b"bytes=0-9", [10])]:
            events, request = self._served(data, wanted)
            expected = []
            for size in sizes:
                expected += ["resume", ("write", size)]
            self.assertEqual(events, expected + ["finish"], wanted)
            self.assertEqual(b"".join(request.written), data[3:] if wanted == b"bytes=3-" else data[: sum(sizes)])
        events, request = self._served(b"", None)
        self.assertEqual(events, ["resume", "finish"])

    def test_shrunkFileAborts(self):
        """
        A file found shorter than it was when its response began aborts the
        connection rather than leave the client waiting.
        """
        events, request = self._served(os.urandom(3 * READ_SIZE), shrink=True)
        self.assertEqual(events, ["resume", ("write", READ_SIZE), "resume", ("write", READ_SIZE // 2), "resume"])
        self.assertTrue(request.transport.disconnected)
        self.assertFalse(request.finished)

    @inlineCallbacks
    def test_rangeAcrossReads(self):
        """
        A range that starts and ends inside different reads of the file is
        served exactly.
        """
        data = os.urandom(3 * READ_SIZE)
        digest = yield self.outbox.add(data)
        first, last = READ_SIZE - 7, 2 * READ_SIZE + 11
        url = f"{self.base}/outbox/{digest}"
        status, headers, body = yield self.curl("-H", f"Range: bytes={first}-{last}", url)
        self.assertEqual(status, 206)
        self.assertEqual(body, data[first : last + 1])

    @inlineCallbacks
    def test_pubkey(self):
        """
        C{/pubkey} answers the key as C{application/pgp-keys}, with no
        C{Server} header.
        """
        status, headers, body = yield self.curl(self.base + "/pubkey")
        self.assertEqual(status, 200)
        self.assertEqual(body, KEY)
        self.assertEqual(headers[b"content-type"], b"application/pgp-keys")
        self.assertNotIn(b"server", headers)

    @inlineCallbacks
    def test_ciphertext(self):
        """
        C{/outbox/<digest>} streams the stored bytes as
        C{application/octet-stream}; their SHA-256 is the name.
        """
        data = os.urandom(3 * 1024 * 1024 + 5)
        digest = yield self.outbox.add(data)
        response = yield self.agent().request(
            b"GET", f"{self.base}/outbox/{digest}".encode()
        )
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(_digest(body), digest)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"),
            [b"application/octet-stream"],
        )
        self.assertFalse(response.headers.hasHeader(b"server"))

    @inlineCallbacks
    def test_rangeCurl(self):
        """
        A C{Range} request (curl) gets 206, the slice and C{Content-Range}.
        """
        data = bytes(range(256)) * 4
        digest = yield self.outbox.add(data)
        url = f"{self.base}/outbox/{digest}"
        status, headers, body = yield self.curl("-H", "Range: bytes=10-19", url)
        self.assertEqual(status, 206)
        self.assertEqual(body, data[10:20])
        self.assertEqual(headers[b"content-range"], b"bytes 10-19/1024")

    @inlineCallbacks
    def test_ciphertextHeaders(self):
        """
        A ciphertext comes with C{Date}, C{Content-Length}, C{Content-Type}
        and C{X-Content-Type-Options} only: no C{Server}, no validator, no
        C{Accept-Ranges} (each would be paid for on every pull).
        """
        data = os.urandom(11_000)
        digest = yield self.outbox.add(data)
        for method in (b"GET", b"HEAD"):
            status, headers, body = yield self.rawGet(
                f"/outbox/{digest}".encode(), method=method
            )
            self.assertEqual(status, 200)
            self.assertEqual(body, data if method == b"GET" else b"")
            # (Connection: close answers the request's own.)
            headers.pop(b"connection")
            self.assertEqual(
                sorted(headers),
                [
                    b"content-length",
                    b"content-type",
                    b"date",
                    b"x-content-type-options",
                ],
                method,
            )
            self.assertEqual(headers[b"content-type"], b"application/octet-stream")
            self.assertEqual(headers[b"x-content-type-options"], b"nosniff")

    @inlineCallbacks
    def test_noConditionalAnswers(self):
        """
        A ciphertext never changes under its name, so it has no validator:
        C{If-Modified-Since} (even in the future) still gets it whole.
        """
        data = b"immutable"
        digest = yield self.outbox.add(data)
        status, headers, body = yield self.raw(
            f"GET /outbox/{digest} HTTP/1.1\r\n".encode()
            + b"Host: 127.0.0.1\r\nConnection: close\r\n"
            b"If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n\r\n"
        )
        self.assertEqual((status, body), (200, data))
        self.assertNotIn(b"last-modified", headers)
        self.assertNotIn(b"etag", headers)

    @inlineCallbacks
    def test_rangeAgent(self):
        """
        A C{Range} request (Agent) gets 206 and the slice, and an open-ended
        range the tail.
        """
        data = os.urandom(100_000)
        digest = yield self.outbox.add(data)
        url = f"{self.base}/outbox/{digest}".encode()
        for spec, expected in [
            (b"bytes=10-19", data[10:20]),
            (b"bytes=99990-", data[99990:]),
        ]:
            response = yield self.agent().request(
                b"GET", url, Headers({b"range": [spec]})
            )
            body = yield readBody(response)
            self.assertEqual(response.code, 206)
            self.assertEqual(body, expected)

    @inlineCallbacks
    def test_head(self):
        """
        HEAD answers the headers (with the length) and no body, for a
        ciphertext, the key and the list.
        """
        data = b"x" * 12345
        digest = yield self.outbox.add(data)
        status, headers, body = yield self.rawGet(
            f"/outbox/{digest}".encode(), method=b"HEAD"
        )
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers[b"content-length"], b"12345")
        self.assertEqual(headers[b"content-type"], b"application/octet-stream")
        for path in [b"/pubkey", b"/outbox/msglist"]:
            status, headers, body = yield self.rawGet(path, method=b"HEAD")
            self.assertEqual((status, body), (200, b""), path)

    @inlineCallbacks
    def test_msglist(self):
        """
        C{/outbox/msglist} is C{{"messages": [...]}}, the sorted digests.
        """
        status, headers, body = yield self.curl(self.base + "/outbox/msglist")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"messages": []})
        digests = []
        for n in (1, 2, 3):
            digests.append((yield self.outbox.add(os.urandom(n))))
        status, headers, body = yield self.curl(self.base + "/outbox/msglist")
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(json.loads(body), {"messages": sorted(digests)})

    @inlineCallbacks
    def test_removedIsGone(self):
        """
        A removed ciphertext is 404.
        """
        digest = yield self.outbox.add(b"short-lived")
        yield self.outbox.remove(digest)
        status, _, _ = yield self.rawGet(f"/outbox/{digest}".encode())
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_otherMethods(self):
        """
        Every method but GET and HEAD is 405 with C{Allow: GET, HEAD}, on
        existing and missing paths alike.
        """
        digest = yield self.outbox.add(b"m")
        for method in [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]:
            for path in [
                b"/pubkey",
                b"/outbox/msglist",
                f"/outbox/{digest}".encode(),
                b"/x",
            ]:
                status, headers, _body = yield self.raw(
                    method + b" " + path + b" HTTP/1.1\r\nHost: h\r\n"
                    b"Connection: close\r\nContent-Type: "
                    b"application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 7\r\n\r\na=b&c=d"
                )
                self.assertEqual(status, 405, (method, path))
                self.assertEqual(headers[b"allow"], b"GET, HEAD")
        self.assertEqual(self.outbox.digests(), [digest])

    @inlineCallbacks
    def test_accessLogCallable(self):
        """
        Each request gives one combined-format line to the callable.
        """
        yield self.curl(
            "-A", 'test "agent"', "-e", "http://ref/", self.base + "/pubkey"
        )
        yield self.rawGet(b"/nothing")
        self.assertEqual(len(self.lines), 2, self.lines)
        first = COMBINED.match(self.lines[0])
        self.assertIsNotNone(first, self.lines[0])
        self.assertEqual(
            first.group("method", "uri", "code"), ("GET", "/pubkey", "200")
        )
        self.assertEqual(first.group("length"), str(len(KEY)))
        self.assertEqual(first.group("referrer"), "http://ref/")
        self.assertEqual(first.group("agent"), 'test \\"agent\\"')
        second = COMBINED.match(self.lines[1])
        self.assertEqual(second.group("uri", "code"), ("/nothing", "404"))


class TraversalTests(_ServerMixin, TestCase):
    """
    Nothing but the outbox's own ciphertexts can be had, whatever the path.
    """

    def setUp(self) -> None:
        self.startServer()
        # A file named like a digest right next to the outbox folder.
        self.secret = b"root:x:0:0:outside the outbox:/root:/bin/sh\n"
        self.outside = _digest(self.secret)
        with open(os.path.join(self.root, self.outside), "wb") as f:
            f.write(self.secret)

    @inlineCallbacks
    def test_attempts(self):
        """
        Traversal, encoding tricks and malformed names sent as-is are 404 or
        400, never 200 or 500, and never show a file's content.
        """
        held = yield self.outbox.add(b"held")
        o = self.outside.encode()
        h = held.encode()
        paths = [
            b"/outbox/..%2f..%2fetc%2fpasswd",
            b"/outbox/../../etc/passwd",
            b"/outbox/%2e%2e/%2e%2e/etc/passwd",
            b"/../x",
            b"/%2e%2e/x",
            b"/..%2fx",
            b"/..%5cx",
            b"/%252e%252e%252fx",
            b"//etc/passwd",
            b"/etc/passwd",
            b"/outbox/" + h + b"%00.txt",
            b"/outbox/" + h + b"%00",
            b"/outbox/" + h.upper(),
            b"/outbox/" + h + b"/",
            b"/outbox/" + h + b"/x",
            b"/outbox/" + h + b"%2f",
            b"/outbox/" + h + b"%0a",
            b"/outbox/" + h[:-1],
            b"/outbox/" + h + b"0",
            b"/outbox/" + b"g" * 64,
            b"/outbox/" + b"a" * 10240,
            b"/outbox/msglist/",
            b"/outbox/msglist/x",
            b"/pubkey/",
            b"/pubkey/x",
            b"/",
            b"/outbox",
            b"/outbox/",
            b"/outbox//",
            b"/outbox/.",
            b"/outbox/..",
            b"/outbox/" + b".tmp-x",
            b"/" + h,
            b"/outbox/../" + o,
            b"/outbox/..%2f" + o,
            b"/outbox/%2e%2e%2f" + o,
            b"/outbox/%2e%2e/" + o,
            b"/outbox/..%5c" + o,
            b"/" + o,
            b"/outbox/" + b"%" + b"%".join(b"%02x" % c for c in o),
            b"*",
            b"http://127.0.0.1/../etc/passwd",
        ]
        bad = []
        for path in paths:
            status, _headers, body = yield self.rawGet(path)
            fine = status in (400, 404) or (path == b"*" and status == 405)
            leaked = self.secret in body or any(m in body for m in PASSWD_MARKERS)
            if not fine or leaked:
                bad.append((path[:80], status, body[:80]))
        self.assertEqual(bad, [])
        status, _, body = yield self.rawGet(b"/outbox/" + h)
        self.assertEqual((status, body), (200, b"held"))

    @inlineCallbacks
    def test_curlPathAsIs(self):
        """
        curl with C{--path-as-is} cannot reach the file beside the outbox.
        """
        for path in ["/outbox/../" + self.outside, "/outbox/..%2f" + self.outside]:
            status, _, body = yield self.curl("--path-as-is", self.base + path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(self.secret, body)

    @inlineCallbacks
    def test_rawNulAndControlBytes(self):
        """
        Raw NUL, tab and DEL bytes in the request line are refused, not
        served.
        """
        h = (yield self.outbox.add(b"held")).encode()
        for path in [b"/outbox/" + h + b"\x00", b"/outbox/" + h + b"\x7f", b"/\x00"]:
            status, _, _ = yield self.rawGet(path)
            self.assertIn(status, (400, 404), path)

    @inlineCallbacks
    def test_symlinkNotFollowed(self):
        """
        A symbolic link planted in the outbox under a digest name is not
        served.
        """
        os.symlink(
            os.path.join(self.root, self.outside),
            os.path.join(self.outbox.directory, self.outside),
        )
        status, _, body = yield self.rawGet(b"/outbox/" + self.outside.encode())
        self.assertEqual(status, 404)
        self.assertNotIn(self.secret, body)

    @inlineCallbacks
    def test_directoryNeverListed(self):
        """
        A folder in the outbox under a digest name is neither listed nor
        redirected to.
        """
        name = _digest(b"folder")
        os.mkdir(os.path.join(self.outbox.directory, name))
        for path in [name, name + "/"]:
            status, headers, _body = yield self.rawGet(f"/outbox/{path}".encode())
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"location", headers)


class PublicKeyTests(_ServerMixin, TestCase):
    """
    The different shapes of the C{publicKey} callable.
    """

    @inlineCallbacks
    def test_slowKey(self):
        """
        A key that comes later (a Deferred) is served once it comes.
        """
        self.startServer(publicKey=lambda: deferLater(reactor, 0.05, lambda: KEY))
        status, headers, body = yield self.curl(self.base + "/pubkey")
        self.assertEqual((status, body), (200, KEY))
        self.assertEqual(headers[b"content-length"], str(len(KEY)).encode())

    @inlineCallbacks
    def test_plainBytes(self):
        """
        A callable may return the key itself, as L{bytes} or L{str}.
        """
        for key in [KEY, KEY.decode("ascii")]:
            self.startServer(publicKey=lambda key=key: key)
            status, _, body = yield self.curl(self.base + "/pubkey")
            self.assertEqual((status, body), (200, KEY))

    @inlineCallbacks
    def test_failure(self):
        """
        When the key cannot be had, the answer is 503 and the failure is
        logged, never a 500 with a traceback.
        """
        self.startServer(publicKey=lambda: fail(RuntimeError("gpg is gone")))
        status, _, body = yield self.rawGet(b"/pubkey")
        self.assertEqual(status, 503)
        self.assertNotIn(b"gpg is gone", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AccessLogTests(_ServerMixin, TestCase):
    """
    Where access-log lines go.
    """

    @inlineCallbacks
    def test_twistedLogger(self):
        """
        With no C{logPath}, each request is one C{info} event C{"{line}"} in
        the L{ACCESS_LOG_NAMESPACE} namespace.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.startServer(logPath=None)
        yield self.rawGet(b"/outbox/msglist")
        access = [e for e in events if e.get("log_namespace") == ACCESS_LOG_NAMESPACE]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["log_format"], "{line}")
        self.assertEqual(access[0]["log_level"].name, "info")
        line = formatEvent(access[0])
        self.assertRegex(line, COMBINED)
        self.assertIn('"GET /outbox/msglist HTTP/1.1" 200', line)

    @inlineCallbacks
    def test_file(self):
        """
        With a file name as C{logPath}, lines are appended to that file.
        """
        path = os.path.abspath(self.mktemp())
        self.startServer(logPath=path)
        yield self.rawGet(b"/pubkey")
        yield self.rawGet(b"/missing")
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertRegex(line, COMBINED)
        self.assertIn('"GET /missing HTTP/1.1" 404', lines[1])


class _NoOutbox:
    """
    An outbox holding one digest, that fails the test if a malformed name is
    ever looked up.
    """

    held = _digest(b"held")

    def __init__(self, testCase) -> None:
        self.testCase = testCase

    def path(self, digest):
        from p2pmta.store import isDigest

        self.testCase.assertTrue(isDigest(digest), digest)

    def digests(self):
        return [self.held]


class ArbitraryPathTests(SynchronousTestCase):
    """
    Random paths through the site, in memory.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site = makeSite(
            _NoOutbox(self), lambda: KEY, logPath=lambda line: None, reactor=self.clock
        )

    def request(self, path: bytes) -> int:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 "), response[:100])
        return int(response.split(b" ", 2)[1])

    @settings(max_examples=300)
    @given(st.lists(st.binary(max_size=70), min_size=1, max_size=4))
    def test_neverServedOr500(self, segments) -> None:
        """
        Any path is 404 or 400, unless it names C{/pubkey} or
        C{/outbox/msglist}; a malformed name never reaches the outbox.
        """
        path = b"/" + b"/".join(
            quote_from_bytes(s, safe="%./").encode() for s in segments
        )
        decoded = [unquote_to_bytes(s) for s in path[1:].split(b"/")]
        status = self.request(path)
        if decoded in ([b"pubkey"], [b"outbox", b"msglist"]):
            self.assertEqual(status, 200)
        else:
            self.assertIn(status, (400, 404), path)


def _batchItems(body: bytes) -> list:
    """Split a batch answer into C{(digest, bytes or None)}."""
    items = []
    while body:
        line, _, body = body.partition(b"\r\n")
        digest, size = line.split(b" ")
        if size == b"-":
            items.append((digest.decode(), None))
        else:
            n = int(size)
            items.append((digest.decode(), body[:n]))
            body = body[n:]
    return items


class BatchTests(_ServerMixin, TestCase):
    """
    C{/outbox/batch}: several ciphertexts in one answer.
    """

    def setUp(self) -> None:
        self.startServer()

    @inlineCallbacks
    def test_batchCurl(self):
        """
        The ciphertexts come in the order asked, each after its digest and
        size; one not held is named with C{-}; large ones are whole.
        """
        datas = [os.urandom(200_000), b"", os.urandom(10)]
        digests = []
        for data in datas:
            digests.append((yield self.outbox.add(data)))
        absent = _digest(b"not here")
        asked = [digests[2], absent, digests[0], digests[1]]
        query = "&".join("d=" + d for d in asked)
        # --raw: the chunks as sent (curl would decode them; _parse does).
        status, headers, body = yield self.curl("--raw", f"{self.base}/outbox/batch?{query}")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"application/x-p2pmta-batch")
        self.assertEqual(headers[b"x-content-type-options"], b"nosniff")
        self.assertEqual(
            _batchItems(body),
            [(digests[2], datas[2]), (absent, None), (digests[0], datas[0]), (digests[1], b"")],
        )

    @inlineCallbacks
    def test_badBatches(self):
        """
        No digest, too many, one twice, or one that is not a lowercase hex
        SHA-256: 400, before any file is looked at.
        """
        from p2pmta.batch import MAX_PULL_BATCH

        digest = yield self.outbox.add(b"m")
        many = "&".join("d=" + _digest(b"%d" % n) for n in range(MAX_PULL_BATCH + 1))
        for query in [
            "",
            "?x=" + digest,
            "?" + many,
            f"?d={digest}&d={digest}",
            f"?d={digest.upper()}",
            f"?d={digest}&d=../../etc/passwd",
            "?d=" + digest[:-1],
            "?d=%ff",
        ]:
            status, _, body = yield self.rawGet(f"/outbox/batch{query}".encode())
            self.assertEqual(status, 400, query)
            self.assertTrue(body.startswith(b"Bad request: ask for 1 to"), body)
        status, _, _ = yield self.rawGet(f"/outbox/batch/{digest}".encode())
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_batchIsOneDownload(self):
        """
        A batch counts as one download against its client's limit, for as
        long as it is being sent.
        """
        self.site.maxDownloadsPerClient = 1
        digests = []
        for n in range(3):
            digests.append((yield self.outbox.add(os.urandom(4_000_000 + n))))
        response = yield self.agent().request(
            b"GET", f"{self.base}/outbox/batch?d={digests[0]}&d={digests[1]}".encode()
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.site.downloads, {"127.0.0.1": 1})
        status, _, _ = yield self.rawGet(f"/outbox/{digests[2]}".encode())
        self.assertEqual(status, 429)
        body = yield readBody(response)
        self.assertEqual([d for d, _ in _batchItems(body)], digests[:2])
        self.assertEqual(self.site.downloads, {})

    @inlineCallbacks
    def test_readerThroughFetchInto(self):
        """
        The receiver's reader, fed by L{fetchInto} over a real connection,
        gives each ciphertext whole as it arrives, and nothing for one the
        outbox lacks.
        """
        from p2pmta.httpclient import fetchInto
        from p2pmta.batch import BatchReader

        datas = [os.urandom(n) for n in (70_000, 1, 130_000, 5)]
        digests = []
        for data in datas:
            digests.append((yield self.outbox.add(data)))
        absent = _digest(b"absent")
        expected = {d: len(x) for d, x in zip(digests, datas)}
        expected[absent] = 7
        got = []
        reader = BatchReader(expected, lambda digest, data: got.append((digest, data)))
        query = "&".join("d=" + d for d in [absent, *digests])
        yield ensureDeferred(
            fetchInto(self.agent(), f"{self.base}/outbox/batch?{query}", reader.write, reader.maxSize, reactor)
        )
        reader.end()
        self.assertEqual(got, list(zip(digests, datas)))


class BatchReaderTests(SynchronousTestCase):
    """
    The receiver's reading of a batch answer holds the server to what was
    asked.
    """

    def setUp(self) -> None:
        from p2pmta.batch import BatchReader

        self.datas = [b"a" * 100, b"", b"\r\n-\r\n" * 10]
        self.digests = [_digest(x) for x in self.datas]
        self.expected = {d: len(x) for d, x in zip(self.digests, self.datas)}
        self.got = []
        self.reader = BatchReader(self.expected, lambda d, x: self.got.append((d, x)))

    def answer(self) -> bytes:
        return b"".join(b"%s %d\r\n%s" % (d.encode(), len(x), x) for d, x in zip(self.digests, self.datas))

    def test_anyCut(self):
        """
        However the answer is cut into reads, the same ciphertexts come out.
        """
        from p2pmta.batch import BatchReader

        answer = self.answer()
        for step in (1, 2, 3, 7, 64, 65, 66, 67, 68, 69, 100, len(answer)):
            got = []
            reader = BatchReader(self.expected, lambda d, x: got.append((d, x)))
            for i in range(0, len(answer), step):
                reader.write(answer[i : i + step])
            reader.end()
            self.assertEqual(got, list(zip(self.digests, self.datas)), step)

    def test_refused(self):
        """
        A digest not asked for (or twice), a wrong size, a line too long or
        without CRLF, and an answer cut short are errors.
        """
        from p2pmta.errors import FetchError
        from p2pmta.batch import BatchReader

        d = self.digests[0]
        for bad in [
            b"%s 100\r\n" % (_digest(b"other").encode(),),
            b"%s 99\r\n" % (d.encode(),),
            b"%s +100\r\n" % (d.encode(),),
            b"%s 100\n" % (d.encode(),),
            b"x" * 200,
            b"%s 100\r\n%s%s 100\r\n" % (d.encode(), b"a" * 100, d.encode()),
        ]:
            reader = BatchReader(self.expected, lambda d, x: None)
            self.assertRaises(FetchError, reader.write, bad)
        for cut in [b"%s 100\r\naaa" % (d.encode(),), d.encode()[:10]]:
            reader = BatchReader(self.expected, lambda d, x: None)
            reader.write(cut)
            self.assertRaises(FetchError, reader.end)
