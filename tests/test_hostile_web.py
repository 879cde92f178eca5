"""
Hostile clients of the HTTP outbox (L{p2pmta.web}) and hostile servers of
our fetcher (L{p2pmta.httpclient}), over real sockets on 127.0.0.1 (with raw
sockets, and with C{curl} where it fits) and with a clock the tests control.

For every case the answer is a clear protocol error, the daemon stays
usable, nothing outside the outbox is served, and memory and time stay
bounded.  Cases that L{tests.test_web} already proves are named there, not
repeated here.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from p2pmta.errors import FetchError
from p2pmta.httpclient import MAX_HEADER_BYTES, fetchBytes, fetchInto, makeAgent
from p2pmta.store import Outbox
from p2pmta.web import clientKey, makeSite

CURL = "/usr/bin/curl"

KEY = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZhostile=\n-----END PGP PUBLIC KEY BLOCK-----\n"

#: The answers a hostile request may get; never 200 for a path outside the
#: three served, never 500.
REFUSALS = (400, 404)

#: Signs of a directory listing or a redirect to one.
LISTING_MARKERS = (b"Index of", b"<a href", b"Directory listing", b"<html")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- talking HTTP by hand ------------------------------------------------


def _parse(response: bytes):
    """
    Split one raw HTTP response into (status, headers, body); a response
    cut short gives status 0.
    """
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ")[1])
    except (IndexError, ValueError):
        return 0, {}, response
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _statuses(response: bytes) -> list[int]:
    """Every status line in a stream of responses."""
    return [int(m) for m in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", response)]


def _exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """
    Send C{request} exactly as given and read until the server closes
    (blocking; run it in a thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _get(path: bytes, *headers: bytes) -> bytes:
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


def _stuckReader(port: int, path: bytes) -> socket.socket:
    """
    A client that asks for C{path} and never reads the answer: a tiny
    receive buffer, so the server's send buffer fills at once.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    return s


def _closedByServer(s: socket.socket, timeout: float) -> bool:
    """
    Drain C{s} until the server closes it (True) or C{timeout} passes
    (False).  Blocking; run it in a thread.
    """
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not s.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


class _Tracking(WrappingFactory):
    """
    Tracks the connections of a listening factory, to close them all when a
    test ends.
    """

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred] = []

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                reactor.callLater(0, d.callback, None)

    def closeAll(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


async def _until(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, interval, lambda: None)
    return True


class _SiteMixin:
    """
    A peer directory C{<tmp>/parent/peer} whose outbox is served on an
    ephemeral 127.0.0.1 port, with canary files in the peer directory
    (beside the outbox) and in its parent, each under a plain name and
    under the digest of its bytes.
    """

    def startSite(self, **limits) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=2, name="test-hostile-web")
        pool.start()
        self.addCleanup(pool.stop)
        self.parent = os.path.abspath(self.mktemp())
        self.peerDir = os.path.join(self.parent, "peer")
        os.makedirs(self.peerDir)
        self.canaries = []
        for where, tag in [(self.parent, b"parent"), (self.peerDir, b"beside")]:
            canary = b"CANARY-" + tag + b"-" + os.urandom(8).hex().encode() + b"\n"
            self.canaries.append(canary)
            for name in ["canary", "canary.txt", "passwd", _digest(canary)]:
                with open(os.path.join(where, name), "wb") as f:
                    f.write(canary)
        self.outbox = Outbox(reactor, os.path.join(self.peerDir, "outbox"), pool)
        self.lines: list[str] = []
        self.site = makeSite(
            self.outbox, lambda: succeed(KEY), logPath=self.lines.append, **limits
        )
        self.factory = _Tracking(self.site)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.factory.closeAll)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"

    def raw(self, request: bytes) -> Deferred:
        """Send C{request} as-is; fire with the whole raw answer."""
        return deferToThread(_exchange, self.port, request)

    def curl(self, *args: str) -> Deferred:
        """Run curl; fire with (status, headers, body)."""
        d = getProcessOutputAndValue(
            CURL, ["-q", "-sS", "--noproxy", "*", "--max-time", "20", "-D", "-", *args]
        )

        def parsed(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            return _parse(out)

        return d.addCallback(parsed)

    def assertNothingLeaked(self, what, body: bytes) -> None:
        for canary in self.canaries:
            self.assertNotIn(canary.strip(), body, what)
        for marker in LISTING_MARKERS:
            self.assertNotIn(marker, body, what)

    @inlineCallbacks
    def assertStillServes(self):
        """The outbox still answers an honest client."""
        digest = yield self.outbox.add(b"still here")
        status, _, body = _parse((yield self.raw(_get(b"/outbox/" + digest.encode()))))
        self.assertEqual((status, body), (200, b"still here"))
        status, _, body = _parse((yield self.raw(_get(b"/pubkey"))))
        self.assertEqual((status, body), (200, KEY))


# -- 1. paths ------------------------------------------------------------


class PathTests(_SiteMixin, TestCase):
    """
    Traversal and malformed names, under C{/}, C{/outbox/}, C{/pubkey} and
    C{/outbox/msglist}: 404 or 400, never 500, never a byte of a file
    outside the outbox, never a listing.  (L{tests.test_web.TraversalTests}
    proves more of them beside a digest-named file next to the outbox,
    symbolic links and digest-named folders.)
    """

    def setUp(self) -> None:
        self.startSite()

    def hostilePaths(self, held: bytes) -> list[bytes]:
        canaryNames = [_digest(c).encode() for c in self.canaries] + [
            b"canary",
            b"passwd",
        ]
        tricks = [
            b"/../x",
            b"/%2e%2e/x",
            b"/..%2fx",
            b"/..%5cx",
            b"/%252e%252e%252fx",
            b"//etc/passwd",
            b"/etc/passwd",
            b"/.%2e/x",
            b"/%2e./x",
            b"/..;/x",
            b"/%c0%ae%c0%ae/x",
            b"/..\\x",
        ]
        paths = []
        for prefix in [b"", b"/outbox", b"/pubkey", b"/outbox/msglist"]:
            paths += [prefix + t for t in tricks]
            for name in canaryNames:
                paths += [
                    prefix + b"/../" + name,
                    prefix + b"/../../" + name,
                    prefix + b"/..%2f" + name,
                    prefix + b"/..%2f..%2f" + name,
                    prefix + b"/%2e%2e%2f%2e%2e%2f" + name,
                    prefix + b"/..%5c..%5c" + name,
                    prefix + b"/%252e%252e%252f" + name,
                    prefix + b"/" + name,
                ]
            paths += [
                prefix + b"/",
                prefix + b"//",
                prefix + b"/.",
                prefix + b"/..",
                prefix + b"/%00",
                prefix + b"%00",
                prefix + b"/" + b"a" * 10240,
                prefix + b"/" + b"%2e" * 3400,
            ]
        paths += [
            b"/outbox/" + held + b"%00.txt",
            b"/outbox/" + held + b"%00",
            b"/outbox/" + held.upper(),
            b"/outbox/" + held[:10].upper() + held[10:],
            b"/outbox/" + held + b"/",
            b"/outbox/" + held + b"//",
            b"/outbox/" + held + b"/.",
            b"/outbox/" + held + b"%2f",
            b"/outbox/" + held + b".txt",
            b"/outbox//" + held,
            b"/outbox/./" + held,
            b"/outbox/x/../" + held,
            b"/OUTBOX/" + held,
            b"/Outbox/msglist",
            b"/PUBKEY",
            b"/pubkey/",
            b"/outbox/msglist/",
            b"/outbox/msglist%00",
            b"/" + b"a" * 10240,
            b"/" + b"/" * 10240,
            b"/outbox/" + b"../" * 3400,
        ]
        return paths

    @inlineCallbacks
    def test_rawPaths(self):
        """
        Each hostile path, sent byte for byte, is 404 or 400; no canary, no
        listing; the held ciphertext is still served.
        """
        held = (yield self.outbox.add(b"held")).encode()
        bad = []
        for path in self.hostilePaths(held):
            answer = yield self.raw(_get(path))
            status = _parse(answer)[0]
            if status not in REFUSALS:
                bad.append((path[:60], status))
            self.assertNothingLeaked(path[:60], answer)
        self.assertEqual(bad, [])
        yield self.assertStillServes()

    @inlineCallbacks
    def test_curlPaths(self):
        """
        curl (C{--path-as-is}, so it sends the dots) gets 404 or 400 for the
        brief's paths, and none of the canaries.
        """
        held = yield self.outbox.add(b"held")
        paths = [
            "/../x",
            "/%2e%2e/x",
            "/..%2fx",
            "/..%5cx",
            "/%252e%252e%252fx",
            "//etc/passwd",
            f"/outbox/{held}%00.txt",
            f"/outbox/{held.upper()}",
            f"/outbox/{held}/",
            "/outbox/msglist/",
            "/pubkey/",
            "/outbox/../canary",
            "/outbox/../../canary",
            "/" + "a" * 10240,
        ]
        for path in paths:
            status, headers, body = yield self.curl("--path-as-is", self.base + path)
            self.assertIn(status, REFUSALS, path[:60])
            self.assertNotIn(b"location", headers, path[:60])
            self.assertNothingLeaked(path[:60], body)

    @inlineCallbacks
    def test_smuggling(self):
        """
        C{Transfer-Encoding: chunked} beside C{Content-Length} (either
        order, under every served path) is one 400 and the end of the
        connection: the request hidden in the body is never answered.
        """
        held = (yield self.outbox.add(b"held")).encode()
        hidden = b"GET /outbox/" + held + b" HTTP/1.1\r\nHost: h\r\n\r\n"
        chunked = b"0\r\n\r\n" + hidden
        for path in [
            b"/outbox/" + held,
            b"/pubkey",
            b"/outbox/msglist",
            b"/outbox/",
            b"/x",
        ]:
            for framing in [
                [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(chunked)],
                [b"Content-Length: %d" % len(chunked), b"Transfer-Encoding: chunked"],
                [b"Content-Length: 5", b"Content-Length: %d" % len(chunked)],
                [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                [b"Transfer-Encoding: xchunked", b"Content-Length: 5"],
                [b"Transfer-Encoding: chunked, identity"],
                [b"Content-Length: +5"],
                [b"Content-Length: 0x5"],
            ]:
                request = (
                    b"GET "
                    + path
                    + b" HTTP/1.1\r\nHost: h\r\n"
                    + b"".join(h + b"\r\n" for h in framing)
                    + b"\r\n"
                    + chunked
                )
                answer = yield self.raw(request)
                self.assertEqual(
                    _statuses(answer), [400], (path, framing, answer[:200])
                )
                self.assertNotIn(b"held", answer)
        yield self.assertStillServes()

    @inlineCallbacks
    def test_smugglingCurl(self):
        """
        curl sending both framings is answered 400 (under C{/outbox/}).
        """
        held = yield self.outbox.add(b"held")
        status, _, body = yield self.curl(
            "-X",
            "GET",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Length: 3",
            "--data-binary",
            "abc",
            f"{self.base}/outbox/{held}",
        )
        self.assertEqual(status, 400)
        self.assertNotIn(b"held", body)

    @inlineCallbacks
    def test_chunkedBodyDiscarded(self):
        """
        A GET with a chunked body (even garbage chunks) is answered without
        the body being kept; garbage framing is one 400.
        """
        held = (yield self.outbox.add(b"held")).encode()
        ok = yield self.raw(
            b"GET /outbox/" + held + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"
        )
        self.assertEqual(_parse(ok)[0], 200)
        for garbage in [
            b"zz\r\n",
            b"5\r\nabcdefgh\r\n",
            b"-1\r\n",
            b"1" * 2000 + b"\r\n",
        ]:
            answer = yield self.raw(
                b"GET /outbox/"
                + held
                + b" HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                + garbage
            )
            self.assertEqual(_statuses(answer), [400], garbage[:20])
        yield self.assertStillServes()


# -- 2. limits -------------------------------------------------------------


class LimitTests(_SiteMixin, TestCase):
    """
    What one stranger can hold: connections, downloads, slow requests,
    unread responses, byte ranges.
    """

    timeout = 60

    def stuck(self, path: bytes) -> socket.socket:
        s = _stuckReader(self.port, path)
        self.addCleanup(s.close)
        return s

    async def bigCiphertext(self) -> bytes:
        # Larger than the kernel's buffers on both sides, so that a client
        # that does not read keeps its download going.
        return (await self.outbox.add(os.urandom(24 * 1024 * 1024))).encode()

    def test_downloadsPerClient(self):
        """
        A client downloading C{maxDownloadsPerClient} ciphertexts is answered
        429 with C{Retry-After} for one more (raw and curl), while the key
        and list stay available; once one download ends, the next is served.
        """

        async def run():
            self.startSite(maxDownloadsPerClient=2, stallTimeout=None)
            big = await self.bigCiphertext()
            small = (await self.outbox.add(b"small")).encode()
            first = self.stuck(b"/outbox/" + big)
            self.stuck(b"/outbox/" + big)
            self.assertTrue(
                await _until(lambda: self.site.downloads.get("127.0.0.1") == 2)
            )
            status, headers, body = _parse(await self.raw(_get(b"/outbox/" + small)))
            self.assertEqual(status, 429)
            self.assertEqual(headers[b"retry-after"], b"10")
            status, headers, _ = await self.curl(f"{self.base}/outbox/{small.decode()}")
            self.assertEqual((status, headers[b"retry-after"]), (429, b"10"))
            status, _, body = _parse(await self.raw(_get(b"/pubkey")))
            self.assertEqual((status, body), (200, KEY))
            status, _, _ = _parse(await self.raw(_get(b"/outbox/msglist")))
            self.assertEqual(status, 200)
            first.close()
            self.assertTrue(
                await _until(lambda: self.site.downloads.get("127.0.0.1") == 1)
            )
            status, _, body = _parse(await self.raw(_get(b"/outbox/" + small)))
            self.assertEqual((status, body), (200, b"small"))
            self.assertEqual(sum(1 for line in self.lines if '" 429 ' in line), 2)

        return Deferred.fromCoroutine(run())

    def test_defaultDownloadLimit(self):
        """
        By default 8 downloads per client run at once; the 9th is 429.
        """

        async def run():
            self.startSite(stallTimeout=None)
            big = await self.bigCiphertext()
            for _ in range(8):
                self.stuck(b"/outbox/" + big)
            self.assertTrue(
                await _until(lambda: self.site.downloads.get("127.0.0.1") == 8)
            )
            status, headers, _ = _parse(await self.raw(_get(b"/outbox/" + big)))
            self.assertEqual(status, 429)
            self.assertIn(b"retry-after", headers)

        return Deferred.fromCoroutine(run())

    def test_connectionsPerClient(self):
        """
        Past C{maxConnectionsPerClient} open connections, the next is
        answered 503 with C{Retry-After} and closed, logged once however
        many; closing one makes room.
        """

        async def run():
            events = []
            globalLogPublisher.addObserver(events.append)
            self.addCleanup(globalLogPublisher.removeObserver, events.append)
            self.startSite(maxConnectionsPerClient=3)
            idle = []
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", self.port))
                self.addCleanup(s.close)
                idle.append(s)
            self.assertTrue(
                await _until(lambda: self.site.connections.get("127.0.0.1") == 3)
            )
            for _ in range(20):
                status, headers, body = _parse(await self.raw(_get(b"/pubkey")))
                self.assertEqual(status, 503)
                self.assertEqual(headers[b"retry-after"], b"10")
            status, headers, _ = await self.curl(self.base + "/pubkey")
            self.assertEqual(status, 503)
            refusals = [
                e for e in events if "refused another" in e.get("log_format", "")
            ]
            self.assertEqual(len(refusals), 1)
            idle[0].close()
            self.assertTrue(
                await _until(lambda: self.site.connections.get("127.0.0.1") == 2)
            )
            status, _, body = _parse(await self.raw(_get(b"/pubkey")))
            self.assertEqual((status, body), (200, KEY))

        return Deferred.fromCoroutine(run())

    def test_refusedClientHoldsNothing(self):
        """
        A refused connection that never closes is dropped after a few
        seconds all the same.
        """

        async def run():
            self.startSite(maxConnectionsPerClient=1)
            first = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(first.close)
            self.assertTrue(
                await _until(lambda: self.site.connections.get("127.0.0.1") == 1)
            )
            second = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(second.close)
            # The client keeps its side open and sends nothing.
            self.assertTrue(await deferToThread(_closedByServer, second, 10))

        return Deferred.fromCoroutine(run())

    def test_stalledReaderDropped(self):
        """
        A client that stops reading a download is disconnected after
        C{stallTimeout} seconds, and its download no longer counts.
        """

        async def run():
            self.startSite(stallTimeout=0.5)
            big = await self.bigCiphertext()
            s = self.stuck(b"/outbox/" + big)
            self.assertTrue(
                await _until(lambda: self.site.downloads.get("127.0.0.1") == 1)
            )
            started = time.monotonic()
            self.assertTrue(await _until(lambda: not self.site.downloads, timeout=10))
            self.assertLess(time.monotonic() - started, 5)
            self.assertTrue(await deferToThread(_closedByServer, s, 10))
            self.assertTrue(await _until(lambda: not self.site.connections))
            await self.assertStillServes()

        return Deferred.fromCoroutine(run())

    def test_slowReaderNotDropped(self):
        """
        A client that reads slowly but steadily keeps its download.
        """

        async def run():
            self.startSite(stallTimeout=0.5)
            data = os.urandom(400 * 1024)
            digest = (await self.outbox.add(data)).encode()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", self.port))
            s.sendall(_get(b"/outbox/" + digest))

            def readSlowly() -> bytes:
                got = []
                s.settimeout(5)
                while chunk := s.recv(64 * 1024):
                    got.append(chunk)
                    time.sleep(0.02)
                return b"".join(got)

            answer = await deferToThread(readSlowly)
            self.assertEqual(_parse(answer)[2], data)
            self.assertEqual(self.site.downloads, {})

        return Deferred.fromCoroutine(run())

    def test_slowloris(self):
        """
        A client sending its headers a byte at a time, fast enough for the
        idle timeout, gets 408 after C{requestTimeout} seconds and is cut
        off; an honest client is served meanwhile.
        """

        async def run():
            self.startSite(requestTimeout=1)
            s = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(s.close)
            request = (
                b"GET /pubkey HTTP/1.1\r\nHost: h\r\n"
                + b"X-A: "
                + b"b" * 200
                + b"\r\n\r\n"
            )
            started = time.monotonic()

            def drip() -> bytes:
                s.settimeout(0.2)
                for byte in request:
                    try:
                        s.sendall(bytes([byte]))
                    except OSError:
                        break
                    try:
                        answer = s.recv(4096)
                    except TimeoutError:
                        continue
                    except OSError:
                        return b""
                    return answer
                return b"no answer"

            dripping = deferToThread(drip)
            status, _, body = _parse(await self.raw(_get(b"/pubkey")))
            self.assertEqual((status, body), (200, KEY))
            answer = await dripping
            self.assertEqual(_parse(answer)[0], 408)
            self.assertLess(time.monotonic() - started, 5)
            self.assertTrue(await deferToThread(_closedByServer, s, 10))

        return Deferred.fromCoroutine(run())

    def test_slowBody(self):
        """
        A body trickled after the headers counts against the same clock.
        """

        async def run():
            self.startSite(requestTimeout=0.5)
            s = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(s.close)
            s.sendall(
                b"GET /pubkey HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nab"
            )
            self.assertTrue(await deferToThread(_closedByServer, s, 10))

        return Deferred.fromCoroutine(run())

    def test_keepAliveBetweenRequests(self):
        """
        The request clock runs per request: a persistent connection that
        waits between requests longer than C{requestTimeout} is still
        served.
        """

        async def run():
            self.startSite(requestTimeout=0.3)
            s = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(s.close)

            def twoRequests() -> list[bytes]:
                answers = []
                s.settimeout(5)
                for last in (False, True):
                    s.sendall(
                        _get(b"/pubkey")
                        if last
                        else b"GET /pubkey HTTP/1.1\r\nHost: h\r\n\r\n"
                    )
                    answers.append(s.recv(65536))
                    time.sleep(0.8)
                return answers

            answers = await deferToThread(twoRequests)
            self.assertEqual([_parse(a)[0] for a in answers], [200, 200])

        return Deferred.fromCoroutine(run())

    @inlineCallbacks
    def test_ranges(self):
        """
        Only a single range is honoured: many ranges (however overlapping)
        or a malformed header get the whole ciphertext once, never more;
        bytes Twisted chokes on (non-UTF-8, huge numbers) are no 500; a
        range past the end is 416.  (Plain ranges: L{tests.test_web}.)
        """
        self.startSite()
        data = os.urandom(10000)
        digest = (yield self.outbox.add(data)).encode()
        path = b"/outbox/" + digest
        cases = [
            (b"bytes=" + b",".join([b"0-"] * 3000), 200, data),
            (b"bytes=0-0,1-1", 200, data),
            (b"bytes=\xff", 200, data),
            (b"bytes=0-1\xff", 200, data),
            (b"\xff\xfe", 200, data),
            (b"bytes=5-1", 200, data),
            (b"items=0-5", 200, data),
            (b"bytes=-", 200, data),
            (b"bytes=-99999999999999999999", 206, data),
            (b"bytes=-" + b"9" * 5000, 206, data),
            (b"bytes=0-" + b"9" * 5000, 206, data),
            (b"bytes=" + b"9" * 5000 + b"-", 416, b""),
            (b"bytes=10000-", 416, b""),
            (b"bytes=-0", 416, b""),
            (b"bytes=9990-", 206, data[9990:]),
            (b"bytes=-10", 206, data[-10:]),
            (b"BYTES = 3 - 5", 206, data[3:6]),
        ]
        for header, code, body in cases:
            answer = yield self.raw(_get(path, b"Range: " + header))
            status, headers, got = _parse(answer)
            self.assertEqual((status, got), (code, body), header[:40])
            self.assertEqual(int(headers[b"content-length"]), len(body))
            if code == 416:
                self.assertEqual(headers[b"content-range"], b"bytes */10000")
        status, headers, got = yield self.curl(
            "-r", "0-9,20-29", self.base + path.decode()
        )
        self.assertEqual((status, got), (200, data))
        yield self.assertStillServes()

    @inlineCallbacks
    def test_oddHeaders(self):
        """
        Conditional and other headers with garbage are never a 500.
        """
        self.startSite()
        digest = (yield self.outbox.add(b"x" * 100)).encode()
        for header in [
            b"If-Modified-Since: \xff\xfe",
            b"If-Modified-Since: Mon, 99 Foo 99999999999 99:99:99 GMT",
            b"If-Modified-Since: " + b"9" * 5000,
            b"If-Range: \xff",
            b"If-None-Match: \xff",
            b"Host: \xff",
            b"Accept-Encoding: gzip;q=\xff",
            b"Cookie: " + b"a=b;" * 2000,
        ]:
            for path in [b"/outbox/" + digest, b"/pubkey", b"/outbox/msglist"]:
                status, _, _ = _parse((yield self.raw(_get(path, header))))
                self.assertIn(status, (200, 304, 400), (path, header[:40]))


class ChannelClockTests(SynchronousTestCase):
    """
    The request and stall clocks, with a clock the test controls.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def connect(self, **limits):
        site = makeSite(
            _EmptyOutbox(),
            lambda: KEY,
            logPath=lambda line: None,
            reactor=self.clock,
            **limits,
        )
        proto = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto.makeConnection(transport)
        self.addCleanup(
            lambda: (
                transport.disconnected
                or proto.connectionLost(Failure(ConnectionDone()))
            )
        )
        return site, proto, transport

    def test_requestTimeout(self):
        """
        A request still incomplete C{requestTimeout} seconds after its first
        byte is answered 408 and closed, however steadily bytes come.
        """
        _, proto, transport = self.connect(requestTimeout=30, timeout=60)
        proto.dataReceived(b"GET /pubkey HTTP/1.1\r\n")
        for _ in range(29):
            self.clock.advance(1)
            proto.dataReceived(b"X: y\r\n")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        # And aborted if the client does not close after Twisted's grace.
        self.clock.advance(15)
        self.assertTrue(transport.disconnected)

    def test_requestTimeoutRestarts(self):
        """
        Each request of a persistent connection gets its own time.
        """
        _, proto, transport = self.connect(requestTimeout=30, timeout=600)
        for _ in range(3):
            proto.dataReceived(b"GET /pubkey HTTP/1.1\r\nHost: h\r\n\r\n")
            self.clock.advance(25)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 3)

    def test_stallTimeout(self):
        """
        A transport whose buffer stays full for C{stallTimeout} seconds is
        aborted; one that drains in time is not.
        """
        _, proto, transport = self.connect(stallTimeout=60, timeout=None)
        proto.dataReceived(b"GET /pubkey HTTP/1.1\r\nHost: h\r\n\r\n")
        proto.pauseProducing()
        self.clock.advance(59)
        proto.resumeProducing()
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        proto.pauseProducing()
        self.clock.advance(61)
        self.assertTrue(transport.disconnected)

    def test_noLimits(self):
        """
        With the clocks off (L{None}), nothing is timed but the idle
        timeout.
        """
        _, proto, transport = self.connect(
            requestTimeout=None, stallTimeout=None, timeout=None
        )
        proto.dataReceived(b"GET /pubkey HTTP/1.1\r\n")
        proto.pauseProducing()
        self.clock.advance(10**6)
        self.assertFalse(transport.disconnecting)

    def test_clientKey(self):
        """
        Limits count an IPv4 address, an IPv6 /64, IPv4-mapped addresses as
        IPv4, and every UNIX-socket client as one.
        """
        self.assertEqual(clientKey(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        self.assertEqual(
            clientKey(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)),
            clientKey(IPv6Address("TCP", "2001:db8:1:2:bbbb::2", 1)),
        )
        self.assertNotEqual(
            clientKey(IPv6Address("TCP", "2001:db8:1:2::1", 1)),
            clientKey(IPv6Address("TCP", "2001:db8:1:3::1", 1)),
        )
        self.assertEqual(
            clientKey(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7"
        )
        self.assertEqual(clientKey(IPv6Address("TCP", "fe80::1%eth0", 1)), "fe80::/64")
        self.assertEqual(clientKey(UNIXAddress(b"/tmp/s")), "local")


class _EmptyOutbox:
    """An outbox holding nothing, for in-memory requests."""

    def path(self, digest):
        return None

    def digests(self):
        return []


# -- 3. our fetcher against hostile servers ----------------------------------


class _Scripted(Protocol):
    """
    A server that, once a request arrives, plays C{script(self)}.
    """

    def __init__(self, script) -> None:
        self.script = script
        self.started = False
        self.calls: list[LoopingCall] = []
        self.sent = 0

    def dataReceived(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.script(self)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def drip(self, data: bytes, interval: float, size: int = 1) -> None:
        """Send C{data} C{size} bytes every C{interval} seconds."""
        pending = [data]

        def step() -> None:
            if not pending[0]:
                call.stop()
                return
            self.send(pending[0][:size])
            pending[0] = pending[0][size:]

        call = LoopingCall(step)
        call.clock = reactor
        self.calls.append(call)
        call.start(interval)

    def flood(self, make, limit: int = 200 * 1024 * 1024) -> None:
        """
        Send C{make()} whenever the transport can take more, up to
        C{limit} bytes.
        """
        server = self

        class Producer:
            def resumeProducing(self) -> None:
                if server.sent >= limit:
                    server.transport.unregisterProducer()
                    return
                server.send(make())

            def stopProducing(self) -> None:
                pass

        self.transport.registerProducer(Producer(), False)

    def connectionLost(self, reason) -> None:
        for call in self.calls:
            if call.running:
                call.stop()


class FetchTests(TestCase):
    """
    L{fetchInto} against servers that never answer, answer slowly, or
    answer too much: a L{FetchError} in bounded time, no more than the
    expected size read, and no connection left open.
    """

    timeout = 60

    def serve(self, script) -> str:
        self.servers: list[_Scripted] = []

        def build() -> _Scripted:
            server = _Scripted(script)
            self.servers.append(server)
            return server

        factory = _Tracking(Factory.forProtocol(build))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.closeAll)
        self.addCleanup(port.stopListening)
        self.serverFactory = factory
        return f"http://127.0.0.1:{port.getHost().port}/outbox/" + "0" * 64

    def agent(self) -> Agent:
        agent, pool = makeAgent(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return agent

    async def fails(
        self, url: str, maxSize: int, within: float, **kwargs
    ) -> tuple[FetchError, bytes]:
        """
        Fetch C{url}; it must fail with L{FetchError} within C{within}
        seconds, having passed on at most C{maxSize} bytes.
        """
        got: list[bytes] = []
        started = time.monotonic()
        try:
            await fetchInto(self.agent(), url, got.append, maxSize, reactor, **kwargs)
        except FetchError as e:
            error = e
        else:
            self.fail("the fetch succeeded")
        self.assertLess(time.monotonic() - started, within)
        body = b"".join(got)
        self.assertLessEqual(len(body), maxSize)
        # Its connection is gone (or going) on our side.
        self.assertTrue(
            await _until(lambda: not self.serverFactory.protocols, timeout=5)
        )
        return error, body

    def test_neverAccepts(self):
        """
        A listening socket that never accepts (the kernel completes the
        handshake, nobody answers) is a FetchError after C{timeout}.
        """

        async def run():
            s = socket.socket()
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            url = f"http://127.0.0.1:{s.getsockname()[1]}/pubkey"
            started = time.monotonic()
            with self.assertRaises(FetchError) as caught:
                await fetchBytes(self.agent(), url, 1000, reactor, timeout=0.5)
            self.assertLess(time.monotonic() - started, 3)
            self.assertIn("no answer within 0.5s", str(caught.exception))

        return Deferred.fromCoroutine(run())

    def test_neverAnswers(self):
        """
        A server that accepts and reads the request but says nothing.
        """

        async def run():
            url = self.serve(lambda server: None)
            error, _ = await self.fails(url, 1000, 3, timeout=0.5)
            self.assertIn("no answer", str(error))

        return Deferred.fromCoroutine(run())

    def test_byteASecondHeaders(self):
        """
        A server sending its status line and headers one byte a second.
        """

        async def run():
            url = self.serve(
                lambda server: server.drip(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1.0
                )
            )
            await self.fails(url, 1000, 4, timeout=1.5)

        return Deferred.fromCoroutine(run())

    def test_slowBody(self):
        """
        A body that keeps coming, a little at a time, but too slowly for
        its size: it must be whole C{timeout + maxSize / minRate} seconds
        after the headers.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                server.drip(b"x" * 1000, 0.1)

            url = self.serve(script)
            error, body = await self.fails(url, 1000, 4, timeout=0.5, minRate=500)
            self.assertIn("body not received within 2.5s", str(error))
            self.assertLess(len(body), 1000)

        return Deferred.fromCoroutine(run())

    def test_silentBody(self):
        """
        Headers, then silence: a FetchError after C{timeout} seconds without
        a byte.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")

            url = self.serve(script)
            error, body = await self.fails(url, 1000, 3, timeout=0.5)
            self.assertIn("nothing received for 0.5s", str(error))
            self.assertEqual(body, b"abc")

        return Deferred.fromCoroutine(run())

    def test_moreThanExpectedUndelimited(self):
        """
        A body without a length that goes on past the expected size: the
        fetch fails at the first byte too many, and no byte past the size
        reaches the sink.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                server.flood(lambda: b"y" * 65536)

            url = self.serve(script)
            error, _ = await self.fails(url, 100_000, 5)
            self.assertIn("larger than expected", str(error))
            self.assertLess(self.servers[0].sent, 50 * 1024 * 1024)

        return Deferred.fromCoroutine(run())

    def test_moreThanExpectedChunked(self):
        """
        An endless chunked body fails the same way.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                server.flood(lambda: b"10000\r\n" + b"z" * 65536 + b"\r\n")

            url = self.serve(script)
            error, _ = await self.fails(url, 100_000, 5)
            self.assertIn("larger than expected", str(error))

        return Deferred.fromCoroutine(run())

    def test_hugeContentLength(self):
        """
        A C{Content-Length} over the expected size fails before any of the
        body is read, and the connection is dropped.
        """

        async def run():
            for length in [b"1001", b"99999999999999999999999999"]:

                def script(server, length=length):
                    server.send(
                        b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n"
                    )
                    server.flood(lambda: b"w" * 65536)

                url = self.serve(script)
                error, body = await self.fails(url, 1000, 5)
                self.assertEqual(body, b"")
                self.assertIn("more than 1000", str(error))

        return Deferred.fromCoroutine(run())

    def test_badContentLength(self):
        """
        A malformed C{Content-Length} is a FetchError.
        """

        async def run():
            for length in [b"-5", b"abc", b"1, 2", b"0x10"]:

                def script(server, length=length):
                    server.send(
                        b"HTTP/1.1 200 OK\r\nContent-Length: "
                        + length
                        + b"\r\n\r\nhello"
                    )

                url = self.serve(script)
                await self.fails(url, 1000, 5, timeout=1)

        return Deferred.fromCoroutine(run())

    def test_chunkedGarbage(self):
        """
        Garbage where chunk sizes should be is a FetchError.
        """

        async def run():
            for garbage in [
                b"zz\r\n",
                b"5\r\nabcdefgh\r\n",
                b"-1\r\n",
                b"1" * 5000,
                b"5;" + b"x" * 5000,
            ]:

                def script(server, garbage=garbage):
                    server.send(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + garbage
                    )

                url = self.serve(script)
                await self.fails(url, 1000, 5, timeout=1)

        return Deferred.fromCoroutine(run())

    def test_endlessHeaders(self):
        """
        A server sending header lines without end: the fetch fails once
        they pass L{MAX_HEADER_BYTES}, long before the timeout.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\n")
                server.flood(
                    lambda: b"X-Filler: " + b"f" * 100 + b"\r\n" * 1,
                    limit=50 * 1024 * 1024,
                )

            url = self.serve(script)
            await self.fails(url, 1000, 5, timeout=30)
            # What the server got out before we hung up: our limit, plus
            # what sat in the kernel's buffers.
            self.assertLess(self.servers[0].sent, MAX_HEADER_BYTES + 16 * 1024 * 1024)

        return Deferred.fromCoroutine(run())

    def test_longHeaderLine(self):
        """
        One header line longer than Twisted's line limit is a FetchError.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nX-Long: ")
                server.flood(lambda: b"l" * 65536, limit=10 * 1024 * 1024)

            url = self.serve(script)
            await self.fails(url, 1000, 5, timeout=30)

        return Deferred.fromCoroutine(run())

    def test_errorStatusNotRead(self):
        """
        An error status fails at once; its body (here endless) is not read.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 404 Not Found\r\n\r\n")
                server.flood(lambda: b"e" * 65536)

            url = self.serve(script)
            error, body = await self.fails(url, 1000, 5)
            self.assertIn("HTTP 404", str(error))
            self.assertEqual(body, b"")

        return Deferred.fromCoroutine(run())

    def test_notHTTP(self):
        """
        A server answering something other than HTTP.
        """

        async def run():
            url = self.serve(
                lambda server: server.send(b"SSH-2.0-OpenSSH_9.2\r\n" + b"\x00" * 100)
            )
            await self.fails(url, 1000, 5, timeout=1)

        return Deferred.fromCoroutine(run())

    def test_honestServer(self):
        """
        An honest answer of exactly the expected size is fetched whole,
        over a connection that is kept for the next fetch.
        """

        async def run():
            def script(server):
                server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

            url = self.serve(script)
            agent = self.agent()
            self.assertEqual(
                await fetchBytes(agent, url, 5, reactor, timeout=2), b"hello"
            )

        return Deferred.fromCoroutine(run())

    def test_againstOurOutbox(self):
        """
        Our fetcher and our outbox together: a ciphertext comes whole; a
        size smaller than the stored one is a FetchError (Content-Length).
        """

        async def run():
            pool = ThreadPool(minthreads=1, maxthreads=2, name="test-fetch")
            pool.start()
            self.addCleanup(pool.stop)
            outbox = Outbox(reactor, os.path.abspath(self.mktemp()), pool)
            data = os.urandom(300_000)
            digest = await outbox.add(data)
            factory = _Tracking(
                makeSite(outbox, lambda: KEY, logPath=lambda line: None)
            )
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(factory.closeAll)
            self.addCleanup(port.stopListening)
            url = f"http://127.0.0.1:{port.getHost().port}/outbox/{digest}"
            self.assertEqual(
                await fetchBytes(self.agent(), url, len(data), reactor), data
            )
            with self.assertRaises(FetchError):
                await fetchBytes(self.agent(), url, len(data) - 1, reactor)

        return Deferred.fromCoroutine(run())

    def test_plainAgentStillWorks(self):
        """
        L{fetchInto} keeps working with a plain L{Agent} (what callers made
        before L{makeAgent}); only the header limit is missing then.
        """

        async def run():
            url = self.serve(
                lambda server: server.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                )
            )
            pool = HTTPConnectionPool(reactor, persistent=False)
            self.assertEqual(
                await fetchBytes(Agent(reactor, pool=pool), url, 2, reactor), b"ok"
            )

        return Deferred.fromCoroutine(run())
