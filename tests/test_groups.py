"""
Peer groups: the signed group descriptor, outbox replication, and pulling
mail from a group member while its sender is offline.
"""

from __future__ import annotations

import os

from twisted.internet.defer import ensureDeferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta import receiving
from p2pmta.address import Address
from p2pmta.errors import BodyUnavailable
from p2pmta.groups import GroupDescriptor, UnknownGroup
from p2pmta.notification import BadNotification, wrapSigned
from tests.peers import PeerHarness, eventually
from tests.test_mailflow import fetchOne, makeMessage, stripAdded, uids

G = [Address("alice", "g"), Address("dave", "g")]


class GroupDescriptorTests(SynchronousTestCase):
    def test_roundTrip(self):
        """A group descriptor survives its canonical encoding."""
        descriptor = GroupDescriptor("g", G[0], tuple(G), 1.0, 2.0)
        self.assertEqual(GroupDescriptor.fromBody(descriptor.body()), descriptor)

    def test_incoherent(self):
        """A master outside the members, or a member of another group, is refused."""
        for bad in (
            GroupDescriptor("g", Address("eve", "g"), tuple(G), 1.0, 2.0),
            GroupDescriptor("g", G[0], (G[0], Address("bob", "h")), 1.0, 2.0),
        ):
            self.assertRaises(BadNotification, GroupDescriptor.fromBody, bad.body())
        self.assertRaises(BadNotification, GroupDescriptor.fromBody, b"{}")


class PulledLog:
    """Where each body was pulled from, from the receivers' log events."""

    def __init__(self):
        self.urls = []

    def __call__(self, event):
        format = str(event.get("log_format", ""))
        if format.startswith("pulled {digest} from {url}"):
            self.urls.append(event["url"])
        elif format.startswith("pulled {n} ciphertexts from {url}"):
            self.urls += [event["url"]] * event["n"]


class GroupTests(TestCase):
    timeout = 240

    async def startFour(self):
        h = self.harness = PeerHarness(self)
        # dave seeds the DHT network, so that alice's entries are stored on
        # other nodes too when she leaves (a node alone in its network keeps
        # its entries only while it runs).
        await h.start("dave", "g", replicationInterval=0.5)
        await h.start("alice", "g", groupMembers=tuple(G), replicationInterval=0.5)
        await h.start("bob", "h")
        await h.start("carol", "h")
        return h

    def pulledLog(self) -> PulledLog:
        pulled = PulledLog()
        globalLogPublisher.addObserver(pulled)
        self.addCleanup(globalLogPublisher.removeObserver, pulled)
        return pulled

    async def sentAndReplicated(self, message: bytes) -> tuple[int, str]:
        """
        alice sends C{message} to bob; wait until bob lists it and dave
        holds a replica of its ciphertext.

        @return: its UID at bob, and its ciphertext's digest.
        """
        h = self.harness
        known = set(h.outboxDigests("alice"))
        listed = set(await h.imap("bob", uids))
        await h.send("alice", ["bob@h"], message)
        [uid] = set(await h.listed("bob", len(listed) + 1)) - listed
        [digest] = set(h.outboxDigests("alice")) - known
        dave = h.running["dave"]

        async def replicated():
            return digest in h.messageDigests(dave.replicas.digests())

        await eventually(replicated)
        return uid, digest

    async def _offlineSender(self):
        h = await self.startFour()
        pulled = self.pulledLog()
        message = makeMessage("alice@g", ["bob@h"], "while you were away", os.urandom(30_000))
        uid, digest = await self.sentAndReplicated(message)
        dave = h.running["dave"]
        with open(dave.replicas.path(digest).path, "rb") as f, open(h.running["alice"].outbox.path(digest).path, "rb") as g:
            self.assertEqual(f.read(), g.read())

        await h.stop("alice")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK", data)
        self.assertEqual(stripAdded(data[0][1]), message)
        self.assertEqual(pulled.urls, [dave.publicURL + "/outbox/" + digest])

        # alice returns: she reads bob's receipt, drops the ciphertext, and
        # dave's replica goes at a following round.
        alice = await h.start("alice")

        async def aliceEmptied():
            return not h.messageDigests(alice.outbox.digests())

        await eventually(aliceEmptied, timeout=30)

        async def replicaGone():
            return digest not in h.messageDigests(dave.replicas.digests())

        await eventually(replicaGone, timeout=30)

    def test_pullFromMemberWhileSenderOffline(self):
        """
        alice sends to bob; dave replicates; alice stops; bob still opens the
        message, byte for byte, from dave.  When alice returns she sees bob's
        receipt and deletes the ciphertext; dave's replica goes next.
        """
        return ensureDeferred(self._offlineSender())

    async def _wrongBytes(self):
        h = await self.startFour()
        pulled = self.pulledLog()
        # Pulled alone, into memory, hashed and opened by one thread call.
        size = receiving.BATCH_ITEM + 1000
        message = makeMessage("alice@g", ["bob@h"], "from a replica", os.urandom(size))
        uid, digest = await self.sentAndReplicated(message)
        dave = h.running["dave"]
        path = h.running["alice"].outbox.path(digest).path
        with open(path, "rb") as f:
            original = f.read()
        self.assertGreater(len(original), receiving.INLINE_DECRYPTION)
        with open(path, "wb") as f:
            f.write(original[:-1] + bytes([original[-1] ^ 1]))
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK", data)
        self.assertEqual(stripAdded(data[0][1]), message)
        self.assertEqual(pulled.urls, [dave.publicURL + "/outbox/" + digest])

        # The very bytes notified, that do not open: no other copy would.
        bob = h.running["bob"]
        uid, _ = await self.sentAndReplicated(makeMessage("alice@g", ["bob@h"], "does not open", os.urandom(size)))
        checked = []
        checkedAndOpened = bob.receiver._checkedAndOpened

        def opened(url, *args):
            checked.append(url)
            return checkedAndOpened(url, *args)

        def refuse(*args):
            raise BodyUnavailable("the message does not match its notification")

        self.patch(bob.receiver, "_checkedAndOpened", opened)
        self.patch(bob.receiver, "_openPulled", refuse)
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "NO", data)
        self.assertEqual([url.split("/outbox/")[0] for url in checked], [h.running["alice"].publicURL])

    def test_pullFromMemberWhenSenderServesWrongBytes(self):
        """
        The sender's outbox serves a large ciphertext that is not the one
        notified: bob pulls it again from a member of the sender's group,
        which replicated it, and opens it.  One that is the one notified
        but does not open is not pulled again from the group.
        """
        return ensureDeferred(self._wrongBytes())

    async def _forged(self):
        h = await self.startFour()
        carol = h.running["carol"]
        bob = h.running["bob"]
        group = await eventually(lambda: _lookup(bob, "g"))
        self.assertEqual(group.master, G[0])
        # carol, no member of g, signs a descriptor naming alice as master
        # and herself... and another naming herself as master.
        now = bob.reactor.seconds() + 10
        for master, members in ((G[0], (*G, Address("carol", "g"))), (Address("carol", "g"), (Address("carol", "g"),))):
            fake = GroupDescriptor("g", master, members, now, now + 3600)
            await carol.dht.put("group:g", wrapSigned(fake.body(), await carol.keyring.sign(fake.body())), b"x", 3600)
        found = await bob.groups.lookup("g")
        self.assertEqual(found.members, tuple(G))
        self.assertLess(found.issued, now)
        with self.assertRaises(UnknownGroup):
            await bob.groups.lookup("nosuchgroup")

    def test_forgedGroupDescriptorIgnored(self):
        """A group descriptor not signed by the group's master is ignored."""
        return ensureDeferred(self._forged())


async def _lookup(peer, group):
    try:
        return await peer.groups.lookup(group)
    except UnknownGroup:
        return None


class AbsentSenderTests(TestCase):
    """
    Against the in-memory DHT, whose nodes keep a value only for a short
    storage period unless it is put again: mail outlives its sender.
    """

    timeout = 240

    async def _outlives(self):
        from p2pmta.dht.memory import MemoryDHT, MemoryNetwork
        from tests.peers import sleep
        from tests.test_dht import ShiftedClock

        clock = ShiftedClock()
        period = 60.0
        network = MemoryNetwork(clock, storagePeriod=period)
        h = PeerHarness(self)
        fast = dict(replicationInterval=0.3, pollInterval=0.3)
        await h.start("dave", "g", dht=MemoryDHT(network, "dave"), **fast)
        alice = await h.start("alice", "g", dht=MemoryDHT(network, "alice"), groupMembers=tuple(G), **fast)
        # bob has been around once: alice knows his key and may mail him.
        await h.start("bob", "h", dht=MemoryDHT(network, "bob-1"), **fast)
        await alice.directory.lookup(Address("bob", "h"))
        await h.stop("bob")

        message = makeMessage("alice@g", ["bob@h"], "outlives its sender", os.urandom(20_000))
        await h.send("alice", ["bob@h"], message)
        dave = h.running["dave"]

        async def replicated():
            # The ciphertext and the notice: bob will need both from dave.
            held = alice.outbox.digests()
            kept = await dave.ledger.query("SELECT COUNT(*) AS n FROM republish WHERE owner = 'alice@g'")
            return len(held) == 2 and set(held) <= set(dave.replicas.digests()) and kept[0]["n"] == 1

        await eventually(replicated)
        await h.stop("alice")

        # Several storage periods pass: only what dave keeps putting lives.
        # The DHT's clock runs ahead of the reactor here, so dave's own
        # renewal (due every period / 2) is run at each step by hand;
        # replication rounds (0.3 s) keep up by themselves.
        for _ in range(8):
            clock.advance(period / 2)
            await dave.getServiceNamed("descriptor").runNow()
            await sleep(1.0)
        self.assertEqual(await dave.dht.get("alice@g"), [], "alice's own descriptor is long gone")
        self.assertTrue(await dave.dht.get("ns:bob@h"))

        bob = await h.start("bob", "h", dht=MemoryDHT(network, "bob-2"), **fast)

        [uid] = await h.listed("bob", timeout=30)
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK", data)
        self.assertEqual(stripAdded(data[0][1]), message)
        self.assertIn(alice.keyring.fingerprint.encode(), data[0][1])
        del bob

        # bob deleted the notification (proving its password): dave stops
        # keeping it alive.
        async def letGo():
            rows = await dave.ledger.query("SELECT COUNT(*) AS n FROM republish WHERE owner = 'alice@g'")
            return rows[0]["n"] == 0

        await eventually(letGo)

    def test_mailOutlivesItsSender(self):
        """
        alice stops; several storage periods later bob starts for the first
        time since, and still sees the message and reads it through dave.
        """
        return ensureDeferred(self._outlives())


class GarbageCollectionTests(TestCase):
    """
    Each garbage-collection rule (paper, section 4.6), with the peers'
    clocks moved forward by hand.
    """

    timeout = 180

    async def _notificationExpired(self):
        from p2pmta.dht import NOTIFICATION_TTL
        from tests.test_dht import ShiftedClock

        h = PeerHarness(self)
        clock = ShiftedClock()
        alice = await h.start("alice", clock=clock)
        await h.start("bob")
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "never read"))

        async def filed():
            return h.messageDigests(alice.outbox.digests()) and await h.imap("alice", lambda c: uids(c, "Outbox"))

        await eventually(filed)
        await alice.getServiceNamed("mailflow").runNow()
        self.assertEqual(len(h.messageDigests(alice.outbox.digests())), 1, "kept while bob may still fetch it")
        clock.advance(NOTIFICATION_TTL + 1)
        await alice.getServiceNamed("mailflow").runNow()
        self.assertEqual(h.messageDigests(alice.outbox.digests()), [])
        self.assertEqual(await h.imap("alice", lambda c: uids(c, "Outbox")), [])
        rows = await alice.ledger.query("SELECT state FROM deliveries")
        self.assertEqual([r["state"] for r in rows], ["expired"])
        self.assertEqual(alice.sender.notices.notifications(), [], "an expired notice is no longer re-published")

    def test_ciphertextGoesWhenNotificationsExpire(self):
        """A ciphertext nobody fetched leaves the outbox once its notifications expired, not before."""
        return ensureDeferred(self._notificationExpired())

    async def _replicaExpired(self):
        from p2pmta.dht import NOTIFICATION_TTL
        from tests.test_dht import ShiftedClock

        h = PeerHarness(self)
        clock = ShiftedClock()
        dave = await h.start("dave", "g", clock=clock, replicationInterval=0.3)
        alice = await h.start("alice", "g", groupMembers=tuple(G), replicationInterval=0.3)
        await h.start("bob", "h")
        await h.send("alice", ["bob@h"], makeMessage("alice@g", ["bob@h"], "replicated", os.urandom(1000)))

        async def replicated():
            return h.messageDigests(alice.outbox.digests()) and set(h.messageDigests(alice.outbox.digests())) <= set(h.messageDigests(dave.replicas.digests()))

        await eventually(replicated)
        await h.stop("alice")
        replication = dave.getServiceNamed("replication")
        await replication.runNow()
        self.assertEqual(len(h.messageDigests(dave.replicas.digests())), 1, "kept while its owner may come back")
        clock.advance(NOTIFICATION_TTL + 1)
        await replication.runNow()
        self.assertEqual(h.messageDigests(dave.replicas.digests()), [])

    def test_replicaGoesAtExpiryWhileOwnerAway(self):
        """A replica whose owner stays away goes once no notification can name it."""
        return ensureDeferred(self._replicaExpired())


class KeyPruningTests(TestCase):
    timeout = 120

    async def _pruned(self):
        from p2pmta.sending import KEY_RETENTION
        from tests.test_dht import ShiftedClock

        h = PeerHarness(self)
        clock = ShiftedClock()
        alice = await h.start("alice", clock=clock)
        await h.start("bob")
        await alice.directory.lookup(Address("bob", "demo"))
        self.assertIsNotNone(await alice.keyring.pinned("bob@demo"))
        await alice.getServiceNamed("mailflow").runNow()
        self.assertIsNotNone(await alice.keyring.pinned("bob@demo"), "seen recently: kept")
        alice.sender._lastKeyPrune = float("-inf")
        clock.advance(KEY_RETENTION + 1)
        await alice.getServiceNamed("mailflow").runNow()
        self.assertIsNone(await alice.keyring.pinned("bob@demo"))
        self.assertEqual(await alice.keyring.pinned("alice@demo"), alice.keyring.fingerprint)

    def test_keysOfPeersUnseenForLongArePruned(self):
        """The key cache forgets peers unseen for KEY_RETENTION; a poll round does it."""
        return ensureDeferred(self._pruned())
