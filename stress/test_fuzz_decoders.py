"""
Fuzzing what strangers hand us: DHT entries, HTTP requests to the outbox,
and notifications.

About a minute at C{P2PMTA_STRESS_SCALE=1}; the scale multiplies the number
of examples of every test.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta.address import Address
from p2pmta.dht import entry
from p2pmta.notification import (
    BadNotification,
    Doorbell,
    ReceiveNotification,
    SendNotification,
    unwrapSigned,
    wrapSigned,
)
from p2pmta.store import Outbox
from p2pmta.web import makeSite

SCALE = float(os.environ.get("P2PMTA_STRESS_SCALE", "1"))


def scaled(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


# -- JSON that is almost what a decoder wants -------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.sampled_from(
        [
            "",
            "a" * 40,
            "b" * 64,
            "\u0663" * 40,
            "+" + "a" * 39,
            "YWJj",
            "a@b",
            "<a@b>",
            "a@",
        ]
    )
)

_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _dumps(doc) -> bytes:
    # allow_nan: NaN and Infinity, which Python's json reads back.
    return json.dumps(doc, allow_nan=True).encode()


def _mutations(valid: dict):
    """
    A strategy of documents like C{valid} with one field replaced, removed
    or added, or the whole replaced by arbitrary JSON.
    """
    keys = sorted(valid)

    @st.composite
    def mutate(draw):
        doc = dict(valid)
        how = draw(st.sampled_from(["replace", "remove", "add", "whole"]))
        if how == "replace":
            doc[draw(st.sampled_from(keys))] = draw(_json)
        elif how == "remove":
            doc.pop(draw(st.sampled_from(keys)))
        elif how == "add":
            doc[draw(st.text(max_size=10))] = draw(_json)
        else:
            return _dumps(draw(_json))
        return _dumps(doc)

    return mutate()


def _edits(valid: bytes):
    """
    A strategy of byte strings like C{valid} with up to 8 bytes cut at
    some place and up to 8 arbitrary bytes put there instead.
    """
    return st.builds(
        lambda at, cut, insert: valid[:at] + insert + valid[at + cut :],
        st.integers(0, len(valid)),
        st.integers(0, 8),
        st.binary(max_size=8),
    )


# -- DHT entries -------------------------------------------------------------

_PUT = json.loads(entry.makePut(b"value", b"pw", 60, 1000).encode())
_STONE = json.loads(entry.Tombstone(entry.valueHash(b"value"), b"pw", 1060).encode())


class EntryDecoderFuzz(SynchronousTestCase):
    """
    L{entry.parse}: an entry or L{entry.BadEntry}, nothing else, and an
    entry re-encodes to one that decodes to itself.
    """

    def check(self, raw: bytes) -> None:
        try:
            found = entry.parse(raw)
        except entry.BadEntry:
            self.assertIsNone(entry.decode(raw))
            return
        self.assertIsInstance(found, (entry.PutEntry, entry.Tombstone))
        self.assertEqual(entry.parse(found.encode()), found)
        entry.liveValues([raw, found.encode()], 1000.0)

    @scaled(3000)
    @given(st.binary(max_size=2000))
    @example(_deep(100_000))
    @example(_deep(30_000))
    def test_bytes(self, raw):
        """Arbitrary bytes."""
        self.check(raw)

    @scaled(3000)
    @given(_mutations(_PUT) | _mutations(_STONE))
    @example(
        b'{"p2pmta":1,"kind":"put","value":"","pwhash":"'
        + b"a" * 40
        + b'","expires":1'
        + b"0" * 400
        + b"}"
    )
    def test_nearlyEntries(self, raw):
        """Entries with one field wrong."""
        self.check(raw)


# -- notifications --------------------------------------------------------------

_SEND = json.loads(
    SendNotification(
        Address.parse("alice@demo"),
        Address.parse("bob@demo"),
        "c" * 64,
        100,
        50,
        b"Subject: x\r\n\r\n",
        b"p" * 16,
        1.0,
    ).encode()
)
_MESSAGE = _SEND["messages"][0]
_RECEIVE = ReceiveNotification.make(Address.parse("bob@demo"), [(b"p" * 16, "c" * 64), (b"q" * 16, "d" * 64)]).encode()
_SIGNED = wrapSigned(b'{"kind":"p2pmta-bell"}', b"\x88" * 119)
_BELL = json.loads(Doorbell(Address.parse("alice@demo"), "ab" * 32, 100).encode())


class NotificationDecoderFuzz(SynchronousTestCase):
    """
    L{SendNotification.decode}, L{ReceiveNotification.decode},
    L{Doorbell.decode} and L{unwrapSigned}: a value or L{BadNotification},
    nothing else.
    """

    def check(self, decoder, raw: bytes) -> None:
        try:
            decoder(raw)
        except BadNotification:
            pass

    @scaled(1500)
    @given(st.binary(max_size=2000), st.sampled_from([0, 1, 2, 3]))
    def test_bytes(self, raw, which):
        """Arbitrary bytes, to each decoder."""
        self.check(
            [SendNotification.decode, ReceiveNotification.decode, Doorbell.decode, unwrapSigned][which],
            raw,
        )

    @scaled(2000)
    @given(_mutations(_SEND) | _mutations(_MESSAGE).map(lambda m: _dumps(dict(_SEND, messages=[json.loads(m)]))))
    @example(_deep(100_000))
    @example(_dumps(dict(_SEND, messages=[dict(_MESSAGE, sent=10**400)])))
    @example(_dumps(dict(_SEND, messages=[dict(_MESSAGE, sent=float("nan"))])))
    @example(_dumps(dict(_SEND, **{"from": 5})))
    @example(_dumps(dict(_SEND, messages=[dict(_MESSAGE, ciphertextSize=float("inf"))])))
    @example(_dumps(dict(_SEND, messages=[_MESSAGE, _MESSAGE])))
    def test_nearlySendNotifications(self, raw):
        """Send notifications with one field wrong, at the top or in a message."""
        self.check(SendNotification.decode, raw)

    @scaled(1500)
    @given(_edits(_RECEIVE))
    @example(_RECEIVE[:4] + b"\xff" + _RECEIVE[5:])
    @example(_RECEIVE[:4] + b"\x00" + _RECEIVE[5:])
    @example(_RECEIVE[:5] + b"\xff" * 8 + _RECEIVE[13:])
    def test_nearlyReceiveNotifications(self, raw):
        """Receive notifications with bytes cut, changed or added anywhere."""
        self.check(ReceiveNotification.decode, raw)

    @scaled(1500)
    @given(_mutations(_BELL))
    @example(_deep(100_000))
    @example(_dumps(dict(_BELL, size=10**400)))
    @example(_dumps(dict(_BELL, size=float("nan"))))
    def test_nearlyDoorbells(self, raw):
        """Doorbells with one field wrong."""
        self.check(Doorbell.decode, raw)

    @scaled(1500)
    @given(_edits(_SIGNED))
    @example(_SIGNED[:4] + b"\xff\xff" + _SIGNED[6:])
    @example(_SIGNED[:4] + b"\x00\x00" + _SIGNED[6:])
    def test_nearlySigned(self, raw):
        """Signed values with bytes cut, changed or added anywhere."""
        self.check(unwrapSigned, raw)


# -- HTTP requests to the outbox ---------------------------------------------

#: What the outbox may answer a stranger's whole request.
ALLOWED = {200, 206, 304, 400, 404, 405, 416, 429}

#: ... and a request that promises a body it never sends (a random
#: C{Content-Length}): 408, after the site's request timeout.
ALLOWED_INCOMPLETE = ALLOWED | {408}


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(request)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _status(response: bytes) -> int:
    try:
        return int(response.split(b"\r\n", 1)[0].split(b" ")[1])
    except (IndexError, ValueError):
        return 0


def _servedPath(request: bytes):
    """
    The path of C{request}'s target, as the segments the server resolves
    (or L{None} if the target is not a path).
    """
    line = request.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    path = parts[1].split(b"?", 1)[0]
    return [unquote_to_bytes(segment) for segment in path[1:].split(b"/")]


class _Counting(WrappingFactory):
    def closeAll(self) -> None:
        for p in list(self.protocols):
            p.transport.abortConnection()


class RequestFuzz(TestCase):
    """
    Arbitrary request lines and headers sent to a real outbox on
    127.0.0.1: only the answers in L{ALLOWED}, never a 500, never a byte of
    the files beside the outbox or in its parent, 200 only for what is
    served.
    """

    timeout = 600

    def setUp(self) -> Deferred:
        pool = ThreadPool(minthreads=1, maxthreads=2, name="fuzz-web")
        pool.start()
        self.addCleanup(pool.stop)
        parent = os.path.abspath(self.mktemp())
        peer = os.path.join(parent, "peer")
        os.makedirs(peer)
        self.canaries = []
        self.names = [b"canary", b"..", b".", b"", b"outbox", b"msglist", b"pubkey"]
        for where in (parent, peer):
            canary = b"CANARY" + os.urandom(8).hex().encode()
            self.canaries.append(canary)
            digest = hashlib.sha256(canary).hexdigest()
            self.names.append(digest.encode())
            for name in ("canary", digest):
                with open(os.path.join(where, name), "wb") as f:
                    f.write(canary)
        self.outbox = Outbox(reactor, os.path.join(peer, "outbox"), pool)
        self.key = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nfuzz\n-----END PGP PUBLIC KEY BLOCK-----\n"
        factory = _Counting(
            makeSite(
                self.outbox,
                lambda: succeed(self.key),
                logPath=lambda line: None,
                # A request that promises more than it sends gets 408 soon.
                requestTimeout=1,
            )
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.closeAll)
        self.port = port.getHost().port

        def held(digest: str) -> None:
            self.held = digest.encode()
            self.names.append(self.held)

        return self.outbox.add(b"held ciphertext " * 100).addCallback(held)

    def check(self, request: bytes, servable: bool = False) -> None:
        response = _exchange(self.port, request)
        status = _status(response)
        allowed = ALLOWED_INCOMPLETE if servable else ALLOWED
        self.assertIn(status, allowed, (request[:200], response[:200]))
        for canary in self.canaries:
            self.assertNotIn(canary, response, request[:200])
        if status in (200, 206, 304) and not servable:
            self.assertIn(
                _servedPath(request),
                ([b"pubkey"], [b"outbox", b"msglist"], [b"outbox", self.held]),
            )

    def paths(self):
        segment = st.sampled_from(self.names) | st.sampled_from(
            [
                b"%2e%2e",
                b"%2e",
                b"..%2f",
                b"%2f",
                b"%5c",
                b"%00",
                b"%252e%252e%252f",
                b"\\",
                b";",
                b"?",
                b"#",
            ]
        )
        separator = st.sampled_from([b"/", b"//", b"%2f", b"%2F", b"/./", b"\\"])

        @st.composite
        def joined(draw):
            parts = draw(st.lists(segment, min_size=1, max_size=6))
            seps = draw(st.lists(separator, min_size=len(parts), max_size=len(parts)))
            return b"".join(sep + part for sep, part in zip(seps, parts))

        return (
            joined()
            | st.binary(max_size=300).map(lambda b: b"/" + b)
            | st.binary(max_size=100)
            | st.sampled_from(
                [
                    b"\\pubkey",
                    b"xpubkey",
                    b"*",
                    b"http://h/pubkey",
                    b"/%70ubkey",
                    b"/pubkey?x=1",
                ]
            )
        )

    def test_paths(self):
        """Arbitrary path bytes, and paths made of the outbox's own names."""

        @scaled(5000)
        @given(self.paths(), st.sampled_from([b"GET", b"HEAD"]))
        def run(path, method):
            self.check(
                method
                + b" "
                + path
                + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )

        return deferToThread(run)

    def test_headers(self):
        """
        Arbitrary C{Range}, C{If-Modified-Since} and other header values on
        the served paths, and arbitrary methods.
        """
        header = st.sampled_from(
            [
                b"Range",
                b"If-Modified-Since",
                b"If-Range",
                b"If-None-Match",
                b"Content-Length",
                b"Transfer-Encoding",
                b"Expect",
                b"Connection",
                b"Host",
                b"Accept-Encoding",
                b"Cookie",
            ]
        )
        value = st.binary(max_size=200) | st.from_regex(
            rb"\Abytes ?= ?[0-9]{0,25} ?- ?[0-9]{0,25}(,[0-9]{0,5}-[0-9]{0,5}){0,5}\Z"
        )
        method = st.sampled_from(
            [b"GET", b"HEAD", b"POST", b"OPTIONS", b"get"]
        ) | st.binary(min_size=1, max_size=10)

        @scaled(5000)
        @given(
            method,
            st.sampled_from([b"/pubkey", b"/outbox/msglist", b"/outbox/" + self.held]),
            st.lists(st.tuples(header, value), max_size=4),
        )
        def run(verb, path, headers):
            lines = b"".join(name + b": " + v + b"\r\n" for name, v in headers)
            self.check(
                verb
                + b" "
                + path
                + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                + lines
                + b"\r\n",
                servable=True,
            )

        return deferToThread(run)
