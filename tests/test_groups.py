"""
Peer groups: the signed group descriptor, outbox replication, and pulling
mail from a group member while its sender is offline.
"""

from __future__ import annotations

import os

from twisted.internet.defer import ensureDeferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta.address import Address
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
        if str(event.get("log_format", "")).startswith("pulled {digest} from {url}"):
            self.urls.append(event["url"])


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

    async def _offlineSender(self):
        h = await self.startFour()
        pulled = PulledLog()
        globalLogPublisher.addObserver(pulled)
        self.addCleanup(globalLogPublisher.removeObserver, pulled)
        message = makeMessage("alice@g", ["bob@h"], "while you were away", os.urandom(30_000))
        await h.send("alice", ["bob@h"], message)

        async def listed():
            return await h.imap("bob", uids)

        [uid] = await eventually(listed)
        [digest] = h.outboxDigests("alice")
        dave = h.running["dave"]

        async def replicated():
            return digest in dave.replicas.digests()

        await eventually(replicated)
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
            return not alice.outbox.digests()

        await eventually(aliceEmptied, timeout=30)

        async def replicaGone():
            return digest not in dave.replicas.digests()

        await eventually(replicaGone, timeout=30)

    def test_pullFromMemberWhileSenderOffline(self):
        """
        alice sends to bob; dave replicates; alice stops; bob still opens the
        message, byte for byte, from dave.  When alice returns she sees bob's
        receipt and deletes the ciphertext; dave's replica goes next.
        """
        return ensureDeferred(self._offlineSender())

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
