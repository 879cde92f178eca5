"""
Hostile values under our own keys (C{ns:<self>}, C{nr:<self>}), as our
entry codec (L{p2pmta.dht.entry}) and L{p2pmta.dht.base.EntryDHT} see them,
with the in-memory DHT and with real OpenDHT nodes on 127.0.0.1.

Anyone may store anything under any key.  What must hold: the decoder
rejects garbage with its own error; expired entries, forged tombstones and
replays of deleted values stay hidden; a flood under one key costs bounded
time and memory; and each kind of bad input is logged once, not once per
value.  (L{tests.test_dht} already proves, for both providers, that a
tombstone without the password and plain garbage hide nothing
(C{test_forgedTombstone}) and that values expire (C{test_expiry}).)
"""

from __future__ import annotations

import base64
import json
import time
import tracemalloc

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta.dht import entry
from p2pmta.dht.memory import MemoryDHT, MemoryNetwork
from p2pmta.dht.node import OpenDHTNode
from p2pmta.errors import WrongPassword
from tests.peers import eventually, sleep
from tests.test_dht import ShiftedClock

INBOX = "ns:bob@demo"
RECEIPTS = "nr:bob@demo"

PWHASH = "a" * 40
TARGET = "b" * 64


def _doc(**fields) -> bytes:
    doc = {
        "p2pmta": 1,
        "kind": "put",
        "value": "",
        "pwhash": PWHASH,
        "expires": 10.0**10,
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def _withExpires(expires: str) -> bytes:
    """A put entry whose expiry is the JSON number C{expires}, as written."""
    return _doc(expires=0).replace(b'"expires": 0', b'"expires": ' + expires.encode())


#: Values that are not p2pmta entries, with what the decoder must say of
#: them.
GARBAGE = [
    (b"", "not JSON"),
    (b"\x00garbage{", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[" * 100_000, "at most"),
    (b"[" * 60_000, "not JSON"),
    (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "not JSON"),
    (b"null", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
    (b'"p2pmta"', "not a JSON object"),
    (_doc(p2pmta=2), "version"),
    (_doc(p2pmta=True), "version"),
    (_doc(p2pmta=1.0), "version"),
    (_doc(p2pmta="1"), "version"),
    (_doc(expires="1e10"), "expiry"),
    (_doc(expires=True), "expiry"),
    (_doc(expires=None), "expiry"),
    (_withExpires("1e400"), "range"),
    (_withExpires("-1e400"), "range"),
    (_withExpires("NaN"), "range"),
    (_withExpires("Infinity"), "range"),
    (_withExpires("1" + "0" * 400), "range"),
    (_doc(kind="rm"), "kind"),
    (_doc(kind=None), "kind"),
    (_doc(pwhash="a" * 39), "password hash"),
    (_doc(pwhash="+" + "a" * 39), "password hash"),
    (_doc(pwhash="a_" * 20), "password hash"),
    (_doc(pwhash="\u0663" * 40), "password hash"),
    (_doc(pwhash=["a" * 40]), "password hash"),
    (_doc(value="not base64!"), "base64"),
    (_doc(value=5), "base64"),
    (_doc(value="\u00e9"), "base64"),
    (_doc(kind="del", target="b" * 63, password=""), "target"),
    (_doc(kind="del", target="+" + "b" * 63, password=""), "target"),
    (_doc(kind="del", target=TARGET, password="%%%"), "base64"),
    (_doc(kind="del", target=TARGET), "base64"),
    (_doc(value=base64.b64encode(b"x" * 50_000).decode()), "at most"),
]


class DecoderTests(SynchronousTestCase):
    """
    L{entry.parse} says why a value is not an entry, with its own error;
    L{entry.decode} turns that into L{None}.
    """

    def test_garbageRejected(self):
        """
        Each malformed value raises L{entry.BadEntry} (a L{DHTError}), never
        anything else (before, deep nesting raised L{RecursionError}, a huge
        expiry L{OverflowError}, and C{Infinity}, C{NaN}, a boolean version
        and non-ASCII hex digits were accepted).
        """
        for raw, reason in GARBAGE:
            with self.assertRaises(entry.BadEntry, msg=raw[:60]) as caught:
                entry.parse(raw)
            self.assertIn(reason, str(caught.exception), raw[:60])
            self.assertIsNone(entry.decode(raw))

    def test_notBytes(self):
        """A value that is not L{bytes} is rejected the same way."""
        for raw in ["{}", None, 5, bytearray(b"{}")]:
            self.assertRaises(entry.BadEntry, entry.parse, raw)

    def test_wellFormed(self):
        """The two kinds of entry still decode."""
        put = entry.makePut(b"v", b"pw", 60, 0)
        self.assertEqual(entry.parse(put.encode()), put)
        stone = entry.makeTombstone([put.encode()], b"v", b"pw", 0)
        self.assertEqual(entry.parse(stone.encode()), stone)
        upper = put.encode().replace(
            put.passwordHash.encode(), put.passwordHash.upper().encode()
        )
        self.assertEqual(entry.parse(upper), put)

    def test_rejectedReported(self):
        """
        L{entry.liveValues} reports each value it skips to C{rejected}.
        """
        said = []
        good = entry.makePut(b"good", b"pw", 60, 0).encode()
        values = entry.liveValues([raw for raw, _ in GARBAGE] + [good], 0, said.append)
        self.assertEqual(values, [b"good"])
        self.assertEqual(len(said), len(GARBAGE))
        self.assertTrue(all(isinstance(e, entry.BadEntry) for e in said))

    def test_tombstonesLinear(self):
        """
        Reading thousands of entries and as many tombstones takes time
        linear in their number (each tombstone used to be tried against
        every entry, hashing the entry's value each time: minutes).
        """
        puts = [
            entry.makePut(b"value %d" % i, b"pw%d" % i, 600, 0) for i in range(5000)
        ]
        stones = [
            entry.Tombstone(entry.valueHash(b"other %d" % i), b"x", 600)
            for i in range(5000)
        ]
        stones.append(entry.makeTombstone([puts[7].encode()], b"value 7", b"pw7", 0))
        raws = [p.encode() for p in puts] + [s.encode() for s in stones]
        started = time.process_time()
        values = entry.liveValues(raws, 0)
        self.assertLess(time.process_time() - started, 2.0)
        self.assertEqual(len(values), 4999)
        self.assertNotIn(b"value 7", values)


class _Events:
    """The warnings a DHT node logs about one key."""

    def __init__(self, testCase, key: str) -> None:
        self.key = key
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def about(self, what: str = "") -> list[dict]:
        return [
            e
            for e in self.events
            if e.get("key") == self.key
            and "under {key}" in e.get("log_format", "")
            and what in e.get("log_format", "")
        ]


class HostileDHTMixin:
    """
    Hostile values through an L{IDHT} provider.  Subclasses set
    C{self.nodes} (two nodes of one network: the attacker's and ours),
    C{self.clock} and C{self.flood} (how many bogus values to flood with).
    """

    async def settle(self) -> None:
        """Let a put reach the other nodes."""

    async def getFrom(self, node, key, want):
        async def probe():
            values = await node.get(key)
            return (values,) if want(values) else None

        return (await eventually(probe))[0]

    def test_garbageUnderOwnKeys(self):
        """
        Garbage beside a genuine entry under C{ns:} and C{nr:}: C{get},
        C{liveEntries} and C{delete} see only the entry, and the garbage is
        logged in one line per key.
        """

        async def run():
            attacker, us = self.nodes
            events = {key: _Events(self, key) for key in (INBOX, RECEIPTS)}
            for key in (INBOX, RECEIPTS):
                for raw, _ in GARBAGE:
                    if len(raw) <= self.largestRaw:
                        await attacker._putRaw(key, raw, 3600)
                await attacker.put(key, b"genuine", b"pw", 3600)
            await self.settle()
            for key in (INBOX, RECEIPTS):
                self.assertEqual(await self.getFrom(us, key, lambda v: v), [b"genuine"])
                [live] = await us.liveEntries(key)
                self.assertEqual(entry.parse(live).value, b"genuine")
                self.assertEqual(len(events[key].about("not p2pmta entries")), 1)
                await us.delete(key, b"genuine", b"pw")
                self.assertEqual(await self.getFrom(us, key, lambda v: not v), [])

        return Deferred.fromCoroutine(run())

    def test_oversize(self):
        """
        A value over 64 KiB is never decoded, and said once; what else is
        under the key reads as usual.  (OpenDHT refuses to store one on
        other nodes, after some 9 seconds, but the putter keeps it.)
        """

        async def run():
            attacker = self.nodes[0]
            events = _Events(self, INBOX)
            huge = _doc(value=base64.b64encode(b"h" * 60_000).decode())
            self.assertGreater(len(huge), entry.MAX_ENTRY_SIZE)
            await attacker._putRaw(INBOX, huge, 3600)
            await attacker.put(INBOX, b"genuine", b"pw", 3600)
            await self.settle()
            holders = 0
            for node in self.nodes:
                for _ in range(2):
                    self.assertEqual(
                        await self.getFrom(node, INBOX, lambda v: v), [b"genuine"]
                    )
                holders += huge in await node._getRaw(INBOX)
            self.assertGreaterEqual(holders, 1)
            self.assertEqual(len(events.about("values over {limit} bytes")), holders)

        return Deferred.fromCoroutine(run())

    def test_expiredIgnored(self):
        """
        Entries written to have expired already, or that expire later, are
        ignored, as are tombstones that expired.
        """

        async def run():
            attacker, us = self.nodes
            now = self.clock.seconds()
            stale = entry.PutEntry(b"stale", PWHASH, now - 1)
            await attacker._putRaw(INBOX, stale.encode(), 3600)
            await attacker.put(INBOX, b"brief", b"pw", 60)
            await attacker.put(INBOX, b"lasting", b"pw", 3600)
            await self.settle()
            self.assertEqual(
                sorted(await self.getFrom(us, INBOX, lambda v: len(v) == 2)),
                [b"brief", b"lasting"],
            )
            self.clock.advance(61)
            self.assertEqual(await us.get(INBOX), [b"lasting"])
            # A tombstone already expired deletes nothing.
            late = entry.Tombstone(
                entry.valueHash(b"lasting"), b"pw", self.clock.seconds() - 1
            )
            await attacker._putRaw(INBOX, late.encode(), 3600)
            await self.settle()
            self.assertEqual(await us.get(INBOX), [b"lasting"])

        return Deferred.fromCoroutine(run())

    def test_wrongPasswordTombstones(self):
        """
        Tombstones that guess the password, or reveal the password of
        another value, hide nothing.
        """

        async def run():
            attacker, us = self.nodes
            await attacker.put(RECEIPTS, b"mine", b"secret", 3600)
            await attacker.put(RECEIPTS, b"theirs", b"known", 3600)
            await self.settle()
            await self.getFrom(us, RECEIPTS, lambda v: len(v) == 2)
            expires = self.clock.seconds() + 3600
            for password in [b"guess", b"", b"secret" + b"\x00", b"known"]:
                stone = entry.Tombstone(entry.valueHash(b"mine"), password, expires)
                await attacker._putRaw(RECEIPTS, stone.encode(), 3600)
            await self.settle()
            self.assertEqual(sorted(await us.get(RECEIPTS)), [b"mine", b"theirs"])
            with self.assertRaises(WrongPassword):
                await attacker.delete(RECEIPTS, b"mine", b"known")
            self.assertEqual(sorted(await us.get(RECEIPTS)), [b"mine", b"theirs"])

        return Deferred.fromCoroutine(run())

    def test_replayStaysDeleted(self):
        """
        Once deleted, a value stays deleted when its entry is replayed as
        it was, or with a later expiry, for as long as the tombstone lives
        (which is as long as the entry it deleted).
        """

        async def run():
            attacker, us = self.nodes
            await us.put(INBOX, b"notification", b"pw", 3600)
            await self.settle()
            [raw] = await attacker.liveEntries(INBOX)
            await us.delete(INBOX, b"notification", b"pw")
            await self.getFrom(us, INBOX, lambda v: not v)
            original = entry.parse(raw)
            later = entry.PutEntry(
                original.value, original.passwordHash, original.expires + 86400
            )
            for replay in [raw, raw, later.encode()]:
                await attacker._putRaw(INBOX, replay, 3600)
            await attacker.republish(INBOX, raw)
            await self.settle()
            self.assertEqual(await us.get(INBOX), [])
            self.assertEqual(await us.liveEntries(INBOX), [])
            self.assertTrue(await us.deleted(INBOX, raw))
            self.clock.advance(3000)
            self.assertEqual(await us.get(INBOX), [])

        return Deferred.fromCoroutine(run())

    def test_listenHearsNoGarbage(self):
        """
        A listener on C{ns:<self>} hears genuine values once each, never
        garbage or expired entries, and logs garbage in one line.
        """

        async def run():
            attacker, us = self.nodes
            events = _Events(self, INBOX)
            heard = []
            await us.listen(INBOX, heard.append)
            await self.settle()
            for raw, _ in GARBAGE[:12]:
                if len(raw) <= self.largestRaw:
                    await attacker._putRaw(INBOX, raw, 3600)
            await attacker._putRaw(
                INBOX, entry.PutEntry(b"stale", PWHASH, 1.0).encode(), 3600
            )
            await attacker.put(INBOX, b"genuine", b"pw", 3600)
            await attacker.put(INBOX, b"genuine", b"pw", 3600)

            async def heardIt():
                return heard == [b"genuine"]

            await eventually(heardIt)
            await self.settle()
            self.assertEqual(heard, [b"genuine"])
            self.assertEqual(len(events.about("not p2pmta entries")), 1)

        return Deferred.fromCoroutine(run())

    def test_flood(self):
        """
        A flood of bogus values under one key: C{get} still finds the
        genuine value, in bounded time, and says so in one log line (two if
        the flood also passes C{maxValuesPerKey}), not one per value; the
        next read within the complaint interval says nothing more.
        """

        async def run():
            attacker, us = self.nodes
            events = _Events(self, INBOX)
            await attacker.put(INBOX, b"genuine", b"pw", 3600)
            await self.fill(attacker, INBOX, self.flood, lambda i: b"bogus %d" % i)
            await self.settle()
            started = time.process_time()
            values = await self.getFrom(us, INBOX, lambda v: v)
            self.assertLess(time.process_time() - started, self.floodBudget)
            self.assertEqual(values, [b"genuine"])
            said = len(events.about())
            self.assertEqual(len(events.about("not p2pmta entries")), 1)
            self.assertEqual(said, 1 + (self.flood > us.maxValuesPerKey))
            await us.get(INBOX)
            self.assertEqual(len(events.about()), said)
            self.clock.advance(us.complaintInterval + 1)
            await us.get(INBOX)
            self.assertEqual(len(events.about()), 2 * said)

        return Deferred.fromCoroutine(run())

    def test_floodOfEntries(self):
        """
        A flood of well-formed entries is cut at C{maxValuesPerKey} values
        read, and said once.
        """

        async def run():
            attacker, us = self.nodes
            us.maxValuesPerKey = 100
            events = _Events(self, RECEIPTS)
            now = self.clock.seconds()
            await self.fill(
                attacker,
                RECEIPTS,
                self.flood,
                lambda i: entry.PutEntry(b"junk %d" % i, PWHASH, now + 3600).encode(),
            )
            await self.settle()
            values = await us.get(RECEIPTS)
            self.assertLessEqual(len(values), 100)
            self.assertEqual(len(events.about("flooding")), 1)
            await us.get(RECEIPTS)
            self.assertEqual(len(events.about("flooding")), 1)

        return Deferred.fromCoroutine(run())

    async def fill(self, node, key: str, count: int, make) -> None:
        pending = []
        for i in range(count):
            pending.append(node._putRaw(key, make(i), 3600))
            if len(pending) >= 200:
                for d in pending:
                    await d
                pending = []
        for d in pending:
            await d


class MemoryHostileTests(HostileDHTMixin, TestCase):
    """Hostile values through the in-memory DHT."""

    flood = 10_000
    floodBudget = 5.0
    largestRaw = 10**9

    def setUp(self) -> None:
        self.clock = ShiftedClock()
        self.network = MemoryNetwork(self.clock)
        self.nodes = [MemoryDHT(self.network, name) for name in ("mallory", "bob")]
        for node in self.nodes:
            node.startService()

    async def settle(self) -> None:
        await sleep(0.01)

    def test_floodMemoryBounded(self):
        """
        However much is stored under a key, a read holds at most
        C{maxBytesPerKey} of it: values past the budget are not even
        decoded.
        """

        async def run():
            attacker, us = self.nodes
            us.maxBytesPerKey = 1024 * 1024
            for i in range(300):
                value = (b"%06d" % i) * 7000
                attacker.put(INBOX, value, b"pw", 3600)
            tracemalloc.start()
            try:
                values = await us.get(INBOX)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertLess(len(values), 300)
            self.assertLess(peak, 4 * 1024 * 1024)
            self.assertLess(sum(map(len, values)), us.maxBytesPerKey)

        return Deferred.fromCoroutine(run())

    def test_listenFloodBounded(self):
        """
        A listener remembers what it heard by digest, at most
        C{maxValuesPerKey} of them: a flood of large values costs it little.
        """

        async def run():
            attacker, us = self.nodes
            us.maxValuesPerKey = 50
            heard = []
            await us.listen(INBOX, lambda value: heard.append(len(value)))
            tracemalloc.start()
            try:
                for i in range(200):
                    attacker.put(INBOX, (b"%06d" % i) * 7000, b"pw", 3600)
                await self.settle()
                current, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertEqual(len(heard), 200)
            # The network itself holds the 8 MB; what the listener keeps is
            # small.
            self.assertLess(current, 12 * 1024 * 1024)

        return Deferred.fromCoroutine(run())


class OpenDHTHostileTests(HostileDHTMixin, TestCase):
    """Hostile values through two real OpenDHT nodes on 127.0.0.1."""

    timeout = 180
    flood = 1000
    floodBudget = 5.0
    # OpenDHT refuses values over 64 KiB.
    largestRaw = 60 * 1024

    async def _start(self):
        self.clock = ShiftedClock()
        first = OpenDHTNode(reactor, interface="127.0.0.1", clock=self.clock)
        first.startService()
        self.addCleanup(first.stopService)
        second = OpenDHTNode(
            reactor,
            interface="127.0.0.1",
            bootstrap=[("127.0.0.1", first.port)],
            clock=self.clock,
        )
        second.startService()
        self.addCleanup(second.stopService)
        self.nodes = [first, second]
        await sleep(0.5)

    def setUp(self):
        return Deferred.fromCoroutine(self._start())

    async def settle(self) -> None:
        await sleep(0.3)
