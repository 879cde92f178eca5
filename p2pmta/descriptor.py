# -*- test-case-name: tests.test_descriptor -*-
"""
Peer descriptors (paper, section 4.2): where a peer's outbox is and which
OpenPGP key speaks for it, signed by that key, kept in the DHT under the
peer's bare address.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2pmta.address import Address
from p2pmta.dht import DESCRIPTOR_TTL
from p2pmta.errors import BadAddress, BadDescriptor, CryptoError, FetchError, P2PMTAError, UnknownPeer
from p2pmta.httpclient import fetchBytes
from p2pmta.rounds import RoundService

_KIND = "p2pmta-descriptor"
#: How soon a publisher puts again after a put that reached no other node.
LONELY_RETRY = 5.0

#: The largest public key p2pmta fetches from another peer.
MAX_PUBLIC_KEY_SIZE = 64 * 1024


@dataclass(frozen=True)
class Descriptor:
    """
    A peer descriptor.

    @ivar address: whose it is.
    @ivar url: base URL of the peer's public outbox (C{/pubkey},
        C{/outbox/...} below it).
    @ivar fingerprint: the peer's OpenPGP key fingerprint.
    @ivar issued: POSIX time it was made; the newest live one wins.
    @ivar expires: POSIX time after which it is void.
    """

    address: Address
    url: str
    fingerprint: str
    issued: float
    expires: float

    def body(self) -> bytes:
        """The canonical bytes that are signed."""
        return json.dumps(
            {
                "kind": _KIND,
                "address": str(self.address),
                "url": self.url,
                "fingerprint": self.fingerprint,
                "issued": self.issued,
                "expires": self.expires,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    def link(self, path: str) -> str:
        """
        @return: the URL of C{path} (e.g. C{"pubkey"}) on the peer's outbox.
        """
        return self.url.rstrip("/") + "/" + path


def encodeSigned(descriptor: Descriptor, signature: bytes) -> bytes:
    """
    @return: the DHT value carrying C{descriptor} and its detached signature.
    """
    return json.dumps(
        {"descriptor": descriptor.body().decode("ascii"), "signature": signature.decode("ascii")},
        separators=(",", ":"),
    ).encode("ascii")


def decodeSigned(value: bytes) -> tuple[Descriptor, bytes, bytes]:
    """
    Parse a DHT value into a descriptor, the signed bytes and the signature;
    nothing is verified yet.

    @raise BadDescriptor: if C{value} is not a well-formed descriptor.
    """
    try:
        outer = json.loads(value)
        body = outer["descriptor"].encode("ascii")
        signature = outer["signature"].encode("ascii")
        doc = json.loads(body)
        if doc["kind"] != _KIND:
            raise BadDescriptor("not a descriptor")
        descriptor = Descriptor(
            address=Address.parse(doc["address"]),
            url=str(doc["url"]),
            fingerprint=str(doc["fingerprint"]).upper(),
            issued=float(doc["issued"]),
            expires=float(doc["expires"]),
        )
    except BadDescriptor:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, BadAddress) as e:
        raise BadDescriptor(str(e)) from None
    if not descriptor.url.startswith(("http://", "https://")):
        raise BadDescriptor(f"outbox URL {descriptor.url!r}")
    if descriptor.body() != body:
        raise BadDescriptor("not in canonical form")
    return descriptor, body, signature


async def deleteReplaced(dht, key: str, current: bytes, password: bytes, replaced) -> int:
    """
    Delete, with C{password}, the values under C{key} that C{current}
    replaces (those for which C{replaced(value)} is true); one that cannot
    be deleted is left to expire.

    @return: how many were deleted.
    """
    deleted = 0
    for old in await dht.get(key):
        if old == current or not replaced(old):
            continue
        try:
            await dht.delete(key, old, password)
        except P2PMTAError:
            continue
        deleted += 1
    return deleted


class DescriptorPublisher(RoundService):
    """
    Keeps this peer's descriptor in the DHT while the peer runs: publishes it
    at start, renews it every quarter of its life, and deletes the ones it
    replaces (an older one, or one with another URL).
    """

    log = Logger()
    roundName = "publishing the peer descriptor"

    def __init__(self, clock, dht, keyring, url, password: bytes, ttl: float = DESCRIPTOR_TTL, interval=None) -> None:
        """
        @param url: a callable returning a Deferred that fires with the
            outbox's public URL, once it is known.
        @param password: this peer's DHT password for its own descriptors.
        @param interval: seconds between renewals (default: C{ttl / 4}).
        """
        RoundService.__init__(self, clock, interval or ttl / 4)
        self._dht = dht
        self._keyring = keyring
        self._url = url
        self._password = password
        self._ttl = ttl
        self.published: Descriptor | None = None

    async def round(self) -> None:
        await self.publish()

    async def publish(self) -> Descriptor:
        """
        Put a fresh descriptor, then delete this peer's older ones.
        """
        url = await self._url()
        now = self._clock.seconds()
        descriptor = Descriptor(Address.parse(self._keyring.address), url, self._keyring.fingerprint, now, now + self._ttl)
        signature = await self._keyring.sign(descriptor.body())
        value = encodeSigned(descriptor, signature)
        reached = await self._dht.put(descriptor.address.descriptorKey, value, self._password, self._ttl)
        if not reached:
            # Alone in the network so far: put it again once others joined.
            self.retryIn(LONELY_RETRY)
        self.published = descriptor
        self.log.info(
            "published descriptor of {address}: {url}, key {fingerprint}, until {expires:.0f}",
            address=str(descriptor.address),
            url=url,
            fingerprint=descriptor.fingerprint,
            expires=descriptor.expires,
        )
        def replaced(old: bytes) -> bool:
            try:
                found, _, _ = decodeSigned(old)
            except BadDescriptor:
                return False
            return found.fingerprint == descriptor.fingerprint and found.issued < descriptor.issued

        deleted = await deleteReplaced(self._dht, descriptor.address.descriptorKey, value, self._password, replaced)
        if deleted:
            self.log.info("deleted {n} older descriptors", n=deleted)
        return descriptor


class PeerDirectory:
    """
    Finds other peers: their live descriptor, verified against their key,
    which is fetched from their outbox on first contact and pinned.
    """

    log = Logger()

    def __init__(self, reactor, dht, keyring, agent, clock=None) -> None:
        """
        @param clock: what decides expiry (default: C{reactor}).
        """
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._dht = dht
        self._keyring = keyring
        self._agent = agent
        self._cache: dict[Address, Descriptor] = {}

    def lookup(self, address: Address, fresh: bool = False) -> Deferred:
        """
        @return: a Deferred firing with the newest verified, live
            L{Descriptor} of C{address}, or failing with L{UnknownPeer}.
            Cached until it expires, unless C{fresh}.
        """
        return Deferred.fromCoroutine(self._lookup(address, fresh))

    async def _lookup(self, address: Address, fresh: bool) -> Descriptor:
        now = self._clock.seconds()
        cached = self._cache.get(address)
        if cached is not None and cached.expires > now and not fresh:
            return cached
        candidates = []
        for value in await self._dht.get(address.descriptorKey):
            try:
                descriptor, body, signature = decodeSigned(value)
            except BadDescriptor as e:
                self.log.warn("ignoring a malformed descriptor under {address}: {e}", address=str(address), e=e)
                continue
            if descriptor.address == address and descriptor.expires > now:
                candidates.append((descriptor, body, signature))
        candidates.sort(key=lambda c: c[0].issued, reverse=True)
        for descriptor, body, signature in candidates:
            try:
                await self._verify(descriptor, body, signature)
            except (P2PMTAError, CryptoError) as e:
                self.log.warn(
                    "ignoring a descriptor of {address} ({url}): {e}",
                    address=str(address),
                    url=descriptor.url,
                    e=e,
                )
                continue
            self._cache[address] = descriptor
            return descriptor
        raise UnknownPeer(str(address))

    async def withPeer(self, address: Address, attempt):
        """
        Call C{await attempt(descriptor)} with the peer's descriptor; if it
        fails with L{FetchError} and a fresh look-up finds the peer at
        another URL (it restarted elsewhere), try once more there.
        """
        descriptor = await self.lookup(address)
        try:
            return await attempt(descriptor)
        except FetchError:
            fresh = await self.lookup(address, fresh=True)
            if fresh.url == descriptor.url:
                raise
            return await attempt(fresh)

    async def _verify(self, descriptor: Descriptor, body: bytes, signature: bytes) -> None:
        pinned = await self._keyring.pinned(str(descriptor.address))
        if pinned is None:
            key = await fetchBytes(self._agent, descriptor.link("pubkey"), MAX_PUBLIC_KEY_SIZE, self._reactor)
            await self._keyring.pin(str(descriptor.address), key, descriptor.fingerprint)
        elif pinned.upper() != descriptor.fingerprint:
            raise BadDescriptor(f"announces key {descriptor.fingerprint}, pinned {pinned}")
        await self._keyring.verify(body, signature, str(descriptor.address))
