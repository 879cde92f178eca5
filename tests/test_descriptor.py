"""
Peer descriptors: published, renewed and replaced by their owner; found,
checked against the owner's key and pinned by others.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from p2pmta.address import Address
from p2pmta.crypto import Keyring
from p2pmta.descriptor import LONELY_RETRY, Descriptor, DescriptorPublisher, PeerDirectory, decodeSigned, encodeSigned
from p2pmta.dht import DESCRIPTOR_TTL
from p2pmta.dht.memory import MemoryDHT, MemoryNetwork
from p2pmta.errors import BadDescriptor, UnknownPeer
from p2pmta.store import Outbox
from p2pmta.web import makeSite


class DescriptorTests(TestCase):
    timeout = 60

    async def _setUp(self):
        self.pool = ThreadPool(minthreads=0, maxthreads=4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.network = MemoryNetwork(self.clock)
        self.dht = MemoryDHT(self.network, "n")
        self.dht.startService()
        # A second node, so that puts reach another node and publishers do
        # not schedule their early retry for a lone node.
        MemoryDHT(self.network, "other").startService()
        self.alice = await self.keyring("alice@demo")
        self.bob = await self.keyring("bob@demo")
        self.url = await self.serve(self.alice)

    def setUp(self):
        return ensureDeferred(self._setUp())

    async def keyring(self, address):
        home = tempfile.mkdtemp(prefix="p2k", dir="/tmp")
        self.addCleanup(shutil.rmtree, home, True)
        keyring = await Keyring.open(reactor, home, Address.parse(address), self.pool)
        self.addCleanup(keyring.close)
        return keyring

    async def serve(self, keyring) -> str:
        folder = tempfile.mkdtemp(prefix="p2o", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder, True)
        site = makeSite(Outbox(reactor, os.path.join(folder, "outbox"), self.pool), keyring.publicKey)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def publisher(self, keyring, url):
        publisher = DescriptorPublisher(self.clock, self.dht, keyring, lambda: succeed(url[0]), b"secret")
        return publisher

    def directory(self, keyring):
        agent = Agent(reactor)
        return PeerDirectory(reactor, self.dht, keyring, agent, clock=self.clock)

    async def _publishAndFind(self):
        url = [self.url]
        publisher = self.publisher(self.alice, url)
        first = await publisher.publish()
        self.assertEqual(first.address, Address("alice", "demo"))
        self.assertEqual(first.expires - first.issued, DESCRIPTOR_TTL)
        found = await self.directory(self.bob).lookup(Address("alice", "demo"))
        self.assertEqual(found, first)
        self.assertEqual(await self.bob.pinned("alice@demo"), self.alice.fingerprint)

    def test_publishAndFind(self):
        """
        Another peer finds the descriptor, fetches the key from /pubkey,
        checks the announced fingerprint and pins it.
        """
        return ensureDeferred(self._publishAndFind())

    async def _renew(self):
        url = [self.url]
        publisher = self.publisher(self.alice, url)
        publisher.startService()
        self.addCleanup(publisher.stopService)
        await self.eventuallyPublished(publisher)
        first = publisher.published
        self.clock.advance(DESCRIPTOR_TTL / 4)
        await self.eventuallyPublished(publisher, after=first)
        values = await self.dht.get("alice@demo")
        self.assertEqual(len(values), 1)
        self.assertGreater(decodeSigned(values[0])[0].issued, first.issued)
        # Without renewals it would have expired by now.
        self.clock.advance(DESCRIPTOR_TTL * 0.74)
        await self.eventuallyPublished(publisher, after=publisher.published)
        found = await self.directory(self.bob).lookup(Address("alice", "demo"))
        self.assertEqual(found, publisher.published)

    async def eventuallyPublished(self, publisher, after=None):
        for _ in range(200):
            if publisher.published is not None and publisher.published != after:
                return
            await deferLaterReal(0.02)
        self.fail("not published")

    def test_renew(self):
        """The owner renews its descriptor before it expires and deletes the old one."""
        return ensureDeferred(self._renew())

    async def _replace(self):
        url = [self.url]
        publisher = self.publisher(self.alice, url)
        await publisher.publish()
        bobs = self.directory(self.bob)
        await bobs.lookup(Address("alice", "demo"))
        self.clock.advance(1)
        url[0] = await self.serve(self.alice)
        await publisher.publish()
        values = await self.dht.get("alice@demo")
        self.assertEqual([decodeSigned(v)[0].url for v in values], [url[0]])
        found = await bobs.lookup(Address("alice", "demo"), fresh=True)
        self.assertEqual(found.url, url[0])

    def test_replace(self):
        """A new URL replaces the old descriptor, which is deleted."""
        return ensureDeferred(self._replace())

    async def _forged(self):
        # Bob pins Alice's real key first.
        await self.publisher(self.alice, [self.url]).publish()
        bobs = self.directory(self.bob)
        await bobs.lookup(Address("alice", "demo"))
        # Mallory publishes a newer descriptor for alice@demo, pointing at
        # her own outbox and key.
        mallory = await self.keyring("alice@demo")
        malloryURL = await self.serve(mallory)
        self.clock.advance(5)
        now = self.clock.seconds()
        fake = Descriptor(Address("alice", "demo"), malloryURL, mallory.fingerprint, now, now + 3600)
        await self.dht.put("alice@demo", encodeSigned(fake, await mallory.sign(fake.body())), b"x", 3600)
        found = await bobs.lookup(Address("alice", "demo"), fresh=True)
        self.assertEqual(found.fingerprint, self.alice.fingerprint)
        # A descriptor signed by the wrong key is refused too.
        self.clock.advance(5)
        now = self.clock.seconds()
        wrongSig = Descriptor(Address("alice", "demo"), self.url, self.alice.fingerprint, now, now + 3600)
        await self.dht.put("alice@demo", encodeSigned(wrongSig, await mallory.sign(wrongSig.body())), b"x", 3600)
        found = await bobs.lookup(Address("alice", "demo"), fresh=True)
        self.assertLess(found.issued, now)

    def test_forgedIgnored(self):
        """Descriptors with another key or signature than the pinned one are ignored."""
        return ensureDeferred(self._forged())

    async def _unknown(self):
        await self.dht.put("carol@demo", b"garbage", b"x", 3600)
        with self.assertRaises(UnknownPeer):
            await self.directory(self.bob).lookup(Address("carol", "demo"))
        publisher = self.publisher(self.alice, [self.url])
        await publisher.publish()
        self.clock.advance(DESCRIPTOR_TTL + 1)
        with self.assertRaises(UnknownPeer):
            await self.directory(self.bob).lookup(Address("alice", "demo"))

    def test_unknownAndExpired(self):
        """No descriptor, garbage, or only an expired one: UnknownPeer."""
        return ensureDeferred(self._unknown())

    async def _lonely(self):
        network = MemoryNetwork(self.clock)
        alone = MemoryDHT(network, "alone")
        alone.startService()
        publisher = DescriptorPublisher(self.clock, alone, self.alice, lambda: succeed(self.url), b"secret")
        publisher.startService()
        self.addCleanup(publisher.stopService)
        await self.eventuallyPublished(publisher)
        first = publisher.published
        MemoryDHT(network, "newcomer").startService()
        self.clock.advance(LONELY_RETRY)
        await self.eventuallyPublished(publisher, after=first)
        self.assertGreater(publisher.published.issued, first.issued)

    def test_lonelyPublisherRetriesSoon(self):
        """A descriptor put that reached no other node is put again within seconds, not hours."""
        return ensureDeferred(self._lonely())

    def test_malformed(self):
        """Malformed descriptor values raise BadDescriptor."""
        for value in [b"", b"{}", b'{"descriptor": "{}", "signature": ""}', b"\xff" * 10]:
            self.assertRaises(BadDescriptor, decodeSigned, value)
        good = Descriptor(Address("a", "b"), "ftp://x", "AB", 1.0, 2.0)
        self.assertRaises(BadDescriptor, decodeSigned, encodeSigned(good, b"sig"))


def deferLaterReal(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
