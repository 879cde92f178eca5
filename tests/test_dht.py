"""
The DHT contract (paper, section 4.1), run against both providers: the
in-memory network and real OpenDHT nodes on 127.0.0.1.
"""

from __future__ import annotations

import threading

import opendht
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from p2pmta.dht import NETWORK_ID, entry
from p2pmta.dht.memory import MemoryDHT, MemoryNetwork
from p2pmta.dht.node import OpenDHTNode, infoHash, valueTypeFor
from p2pmta.errors import DHTError, NotFound, ValueTooLarge, WrongPassword
from p2pmta.interfaces import IDHT
from tests.peers import eventually, sleep


class ShiftedClock:
    """
    The real reactor's clock, moved forward on demand: entry expiry is
    enforced by the reader's clock, so tests need not wait for it.
    """

    def __init__(self) -> None:
        self.shift = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.shift

    def callLater(self, delay, f, *args, **kw):
        return reactor.callLater(delay, f, *args, **kw)

    def advance(self, seconds: float) -> None:
        self.shift += seconds


class DHTContractMixin:
    """
    What every L{IDHT} provider must do.  Subclasses build C{self.nodes}
    (at least three nodes of one network) and C{self.clock}, and may
    override L{settle} to wait for propagation.
    """

    async def settle(self) -> None:
        """Let a put reach the other nodes."""

    async def getFrom(self, node, key, want=lambda values: True):
        """
        Read C{key} at C{node} until C{want(values)} holds.
        """

        async def probe():
            values = await node.get(key)
            return (values,) if want(values) else None

        return (await eventually(probe))[0]

    def test_interface(self):
        """Every node provides IDHT."""
        for node in self.nodes:
            self.assertTrue(verifyObject(IDHT, node))

    async def _putGet(self):
        a, b, c = self.nodes[:3]
        await a.put("k:putget", b"hello", b"pw", 3600)
        values = await self.getFrom(c, "k:putget", lambda v: b"hello" in v)
        self.assertEqual(values, [b"hello"])

    def test_putGet(self):
        """A value put at one node is read at another."""
        return ensureDeferred(self._putGet())

    async def _multiValue(self):
        a, b, c = self.nodes[:3]
        await a.put("k:multi", b"one", b"p1", 3600)
        await b.put("k:multi", b"two", b"p2", 3600)
        await b.put("k:multi", b"one", b"p1", 3600)
        values = await self.getFrom(c, "k:multi", lambda v: len(v) == 2)
        self.assertEqual(sorted(values), [b"one", b"two"])

    def test_multiValue(self):
        """Several values share a key; the same value put twice reads once."""
        return ensureDeferred(self._multiValue())

    async def _deleteWithPassword(self):
        a, b, c = self.nodes[:3]
        await a.put("k:del", b"gone", b"secret", 3600)
        await a.put("k:del", b"kept", b"other", 3600)
        await self.getFrom(b, "k:del", lambda v: len(v) == 2)
        await b.delete("k:del", b"gone", b"secret")
        values = await self.getFrom(c, "k:del", lambda v: b"gone" not in v)
        self.assertEqual(values, [b"kept"])

    def test_deleteWithPassword(self):
        """Delete with the put's password hides that value from every node."""
        return ensureDeferred(self._deleteWithPassword())

    async def _retract(self):
        a, b, c = self.nodes[:3]
        await a.put("k:retract", b"gone", b"secret", 3600)
        await a.put("k:retract", b"kept", b"other", 3600)
        await self.getFrom(b, "k:retract", lambda v: len(v) == 2)
        await b.retract("k:retract", b"gone", b"secret", 3600)
        values = await self.getFrom(c, "k:retract", lambda v: b"gone" not in v)
        self.assertEqual(values, [b"kept"])
        # A retraction without the password hides nothing.
        await b.retract("k:retract", b"kept", b"guess", 3600)
        await self.settle()
        self.assertEqual(await c.get("k:retract"), [b"kept"])

    def test_retract(self):
        """Retracting with the put's password, unread, hides the value from every node."""
        return ensureDeferred(self._retract())

    async def _deleteWrongPassword(self):
        a, b, c = self.nodes[:3]
        await a.put("k:wrong", b"value", b"right", 3600)
        await self.getFrom(b, "k:wrong", lambda v: v == [b"value"])
        with self.assertRaises(WrongPassword):
            await b.delete("k:wrong", b"value", b"wrong")
        await self.settle()
        self.assertEqual(await c.get("k:wrong"), [b"value"])

    def test_deleteWrongPassword(self):
        """Delete with another password is refused and the value stays."""
        return ensureDeferred(self._deleteWrongPassword())

    async def _deleteAbsent(self):
        with self.assertRaises(NotFound):
            await self.nodes[0].delete("k:absent", b"value", b"pw")

    def test_deleteAbsent(self):
        """Deleting a value that is not there says so."""
        return ensureDeferred(self._deleteAbsent())

    async def _forgedTombstone(self):
        a, b, c = self.nodes[:3]
        await a.put("k:forged", b"value", b"right", 3600)
        forged = entry.Tombstone(
            entry.valueHash(b"value"), b"guess", self.clock.seconds() + 3600
        )
        await b._putRaw("k:forged", forged.encode(), 3600)
        await b._putRaw("k:forged", b"\x00garbage{", 3600)
        await self.settle()
        self.assertEqual(
            await self.getFrom(c, "k:forged", lambda v: v), [b"value"]
        )

    def test_forgedTombstone(self):
        """A tombstone without the password, or garbage, hides nothing."""
        return ensureDeferred(self._forgedTombstone())

    async def _expiry(self):
        a, b, c = self.nodes[:3]
        await a.put("k:exp", b"short", b"pw", 60)
        await a.put("k:exp", b"long", b"pw", 3600)
        await self.getFrom(c, "k:exp", lambda v: len(v) == 2)
        self.clock.advance(61)
        self.assertEqual(await c.get("k:exp"), [b"long"])

    def test_expiry(self):
        """A value is gone once its time to live has passed."""
        return ensureDeferred(self._expiry())

    async def _refresh(self):
        a, b, c = self.nodes[:3]
        await a.put("k:refresh", b"kept", b"pw", 60)
        await self.getFrom(c, "k:refresh", lambda v: v)
        self.clock.advance(50)
        await a.put("k:refresh", b"kept", b"pw", 60)
        await self.settle()
        self.clock.advance(20)
        self.assertEqual(
            await self.getFrom(c, "k:refresh", lambda v: v), [b"kept"]
        )

    def test_refresh(self):
        """Putting a value again extends its life; it still reads once."""
        return ensureDeferred(self._refresh())

    async def _tombstoneOutlivesNothing(self):
        a, b, c = self.nodes[:3]
        await a.put("k:stone", b"v", b"pw", 60)
        await self.getFrom(b, "k:stone", lambda v: v)
        await b.delete("k:stone", b"v", b"pw")
        await self.getFrom(c, "k:stone", lambda v: not v)
        raws = await c._getRaw("k:stone")
        stones = [e for e in map(entry.decode, raws) if isinstance(e, entry.Tombstone)]
        puts = [e for e in map(entry.decode, raws) if isinstance(e, entry.PutEntry)]
        self.assertTrue(stones)
        self.assertEqual(stones[0].expires, puts[0].expires)

    def test_tombstoneLivesAsLongAsTarget(self):
        """A tombstone expires with the entry it deletes."""
        return ensureDeferred(self._tombstoneOutlivesNothing())

    async def _listen(self):
        a, b, c = self.nodes[:3]
        heard = []
        await c.listen("k:listen", heard.append)
        await self.settle()
        await a.put("k:listen", b"first", b"pw", 3600)
        await b.put("k:listen", b"second", b"pw", 3600)
        await a._putRaw("k:listen", b"not an entry", 3600)

        async def both():
            return sorted(heard) == [b"first", b"second"]

        await eventually(both)
        self.assertEqual(sorted(heard), [b"first", b"second"])

    def test_listen(self):
        """A listener hears values put later, from any node, each once."""
        return ensureDeferred(self._listen())

    async def _republish(self):
        a, b, c = self.nodes[:3]
        await a.put("k:re", b"kept", b"pw", 3600)
        await self.getFrom(b, "k:re", lambda v: v)
        [raw] = await b.liveEntries("k:re")
        await c.republish("hash:" + entry.keyHash("k:re"), raw)
        self.assertEqual(await self.getFrom(c, "k:re", lambda v: v), [b"kept"])
        with self.assertRaises(DHTError):
            await c.republish("k:re", b"garbage")
        # Deleting with the password deletes the republished copy too.
        self.assertFalse(await c.deleted("k:re", raw))
        await c.delete("k:re", b"kept", b"pw")
        self.assertEqual(await self.getFrom(a, "k:re", lambda v: not v), [])
        self.assertTrue(await b.deleted("hash:" + entry.keyHash("k:re"), raw))

    def test_republish(self):
        """An entry stored again unchanged, by key hash, reads once and deletes as one."""
        return ensureDeferred(self._republish())

    async def _tooLarge(self):
        with self.assertRaises(ValueTooLarge):
            await self.nodes[0].put("k:big", b"x" * (entry.MAX_VALUE_SIZE + 1), b"p", 60)
        await self.nodes[0].put("k:big", b"x" * entry.MAX_VALUE_SIZE, b"p", 60)
        values = await self.getFrom(self.nodes[1], "k:big", lambda v: v)
        self.assertEqual(len(values[0]), entry.MAX_VALUE_SIZE)

    def test_valueTooLarge(self):
        """The largest value is stored whole; one byte more is refused."""
        return ensureDeferred(self._tooLarge())


class MemoryDHTTests(DHTContractMixin, TestCase):
    """The in-memory provider keeps the contract."""

    def setUp(self):
        self.clock = ShiftedClock()
        self.network = MemoryNetwork(self.clock)
        self.nodes = [MemoryDHT(self.network, f"n{i}") for i in range(3)]
        for node in self.nodes:
            node.startService()

    async def settle(self):
        await sleep(0.01)

    def test_goneWhenHoldersLeave(self):
        """A value whose storing nodes have all left is gone, as in OpenDHT."""
        network = MemoryNetwork(self.clock, replicas=1)
        a, b = MemoryDHT(network, "a"), MemoryDHT(network, "b")
        a.startService()
        b.startService()
        a.put("k", b"v", b"pw", 3600)
        self.assertEqual(self.successResultOf(b.get("k")), [b"v"])
        a.stopService()
        self.assertEqual(self.successResultOf(b.get("k")), [])

    def test_replicasKeepValue(self):
        """A value stays while any node that stored it is online."""
        network = MemoryNetwork(self.clock, replicas=2)
        a, b = MemoryDHT(network, "a"), MemoryDHT(network, "b")
        a.startService()
        b.startService()
        a.put("k", b"v", b"pw", 3600)
        a.stopService()
        self.assertEqual(self.successResultOf(b.get("k")), [b"v"])

    def test_storagePeriod(self):
        """Storing nodes drop a value after the storage period unless re-put."""
        network = MemoryNetwork(self.clock, storagePeriod=600)
        a = MemoryDHT(network, "a")
        a.startService()
        a.put("k", b"v", b"pw", 7 * 86400)
        self.clock.advance(500)
        a.put("k", b"v", b"pw", 7 * 86400)
        self.clock.advance(500)
        self.assertEqual(self.successResultOf(a.get("k")), [b"v"])
        self.clock.advance(101)
        self.assertEqual(self.successResultOf(a.get("k")), [])

    def test_offlineNodeFails(self):
        """A node that is not running refuses operations."""
        node = MemoryDHT(self.network, "off")
        self.failureResultOf(node.get("k"), DHTError)


class OpenDHTTests(DHTContractMixin, TestCase):
    """Three real OpenDHT nodes on 127.0.0.1 keep the contract."""

    timeout = 120

    async def _start(self):
        self.clock = ShiftedClock()
        first = OpenDHTNode(reactor, interface="127.0.0.1", clock=self.clock)
        first.startService()
        self.addCleanup(first.stopService)
        self.nodes = [first]
        for _ in range(2):
            node = OpenDHTNode(
                reactor,
                interface="127.0.0.1",
                bootstrap=[("127.0.0.1", first.port)],
                clock=self.clock,
            )
            node.startService()
            self.addCleanup(node.stopService)
            self.nodes.append(node)
        await sleep(0.5)

    def setUp(self):
        return ensureDeferred(self._start())

    async def settle(self):
        await sleep(0.3)

    def test_bareOpenDHTNodeReads(self):
        """
        A plain OpenDHT node on p2pmta's network id reads p2pmta entries at
        C{InfoHash.get(key)}.
        """

        async def run():
            await self.nodes[0].put("alice@demo", b"descriptor", b"pw", 3600)
            runner = opendht.DhtRunner()
            config = opendht.DhtConfig()
            config.setNetwork(NETWORK_ID)
            config.setPeerDiscovery(False, False)
            runner.run(port=0, ipv4="127.0.0.1", config=config)
            runner.bootstrap("127.0.0.1", str(self.nodes[0].port))
            try:

                def blockingGet():
                    return [v.data for v in runner.get(opendht.InfoHash.get("alice@demo"))]

                from twisted.internet.threads import deferToThread

                async def probe():
                    return await deferToThread(blockingGet)

                raws = await eventually(probe)
                self.assertEqual(entry.liveValues(raws, self.clock.seconds()), [b"descriptor"])
            finally:
                done = threading.Event()
                runner.shutdown(done.set)
                from twisted.internet.threads import deferToThread

                await deferToThread(done.wait, 10)
                await deferToThread(runner.join)

        return ensureDeferred(run())

    def test_valueTypes(self):
        """Each time to live maps to the shortest type that keeps it."""
        self.assertEqual(valueTypeFor(60), 0x7031)
        self.assertEqual(valueTypeFor(86400), 0x7032)
        self.assertEqual(valueTypeFor(7 * 86400), 0x7033)
        self.assertRaises(DHTError, valueTypeFor, 8 * 86400)

    def test_infoHash(self):
        """The OpenDHT key of a text key is InfoHash.get of it."""
        self.assertEqual(infoHash("ns:bob@demo"), opendht.InfoHash.get("ns:bob@demo"))

    def test_stoppedNodeFails(self):
        """A node that has stopped refuses operations cleanly."""
        node = OpenDHTNode(reactor, interface="127.0.0.1")
        self.failureResultOf(node.get("k"), DHTError)
