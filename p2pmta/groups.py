# -*- test-case-name: tests.test_groups -*-
"""
Peer groups (paper, section 4.5): the group descriptor under
C{group:<gname>}, listing the members, put and renewed by the group master
and signed with its key.

A peer C{name@g} belongs to group C{g} only if g's descriptor lists it.  The
first master whose signed descriptor a peer verifies for a group is pinned
for that group; descriptors naming another master, or not signed by the
pinned one, are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2pmta.address import Address, groupKey
from p2pmta.descriptor import LONELY_RETRY, deleteReplaced
from p2pmta.dht import DESCRIPTOR_TTL
from p2pmta.errors import BadAddress, P2PMTAError
from p2pmta.notification import BadNotification, unwrapSigned, wrapSigned
from p2pmta.rounds import RoundService

_KIND = "p2pmta-group"


class UnknownGroup(P2PMTAError):
    """No live group descriptor signed by the group's master was found."""


@dataclass(frozen=True)
class GroupDescriptor:
    """
    @ivar group: the group's name.
    @ivar master: the member that publishes and signs this descriptor.
    @ivar members: every member's address, the master's included.
    @ivar issued: POSIX time it was made; the newest valid one wins.
    @ivar expires: POSIX time after which it is void.
    @ivar keys: C{(address, fingerprint, armored public key)} of members,
        so that a receiver can check a member's mail while that member and
        its descriptor are gone.
    """

    group: str
    master: Address
    members: tuple[Address, ...]
    issued: float
    expires: float
    keys: tuple = ()

    def body(self) -> bytes:
        return json.dumps(
            {
                "kind": _KIND,
                "group": self.group,
                "master": str(self.master),
                "members": [str(m) for m in self.members],
                "issued": self.issued,
                "expires": self.expires,
                "keys": {str(a): {"fingerprint": f, "key": k} for a, f, k in self.keys},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def fromBody(cls, body: bytes) -> GroupDescriptor:
        """
        @raise BadNotification: if C{body} is not a well-formed, coherent
            group descriptor (its master a member, every member in the group).
        """
        try:
            doc = json.loads(body)
            if doc["kind"] != _KIND:
                raise BadNotification("not a group descriptor")
            descriptor = cls(
                group=str(doc["group"]).lower(),
                master=Address.parse(doc["master"]),
                members=tuple(Address.parse(m) for m in doc["members"]),
                issued=float(doc["issued"]),
                expires=float(doc["expires"]),
                keys=tuple(
                    (Address.parse(a), str(v["fingerprint"]), str(v["key"]))
                    for a, v in sorted(doc.get("keys", {}).items())
                ),
            )
        except BadNotification:
            raise
        except (ValueError, KeyError, TypeError, BadAddress) as e:
            raise BadNotification(str(e)) from None
        if descriptor.master not in descriptor.members:
            raise BadNotification("the master is not a member")
        if any(m.group != descriptor.group for m in descriptor.members):
            raise BadNotification("a member of another group")
        if descriptor.body() != body:
            raise BadNotification("not in canonical form")
        return descriptor


class GroupPublisher(RoundService):
    """
    The group master's service: keeps the group descriptor in the DHT,
    renewed every quarter of its life.
    """

    log = Logger()
    roundName = "publishing the group descriptor"

    def __init__(
        self, clock, dht, keyring, members, password: bytes, peers, ttl: float = DESCRIPTOR_TTL, interval=None
    ) -> None:
        """
        @param peers: the L{p2pmta.descriptor.PeerDirectory}, to find and
            pin the members' keys.
        """
        RoundService.__init__(self, clock, interval or ttl / 4)
        self._peers = peers
        self._dht = dht
        self._keyring = keyring
        self._members = tuple(members)
        self._password = password
        self._ttl = ttl
        self.published: GroupDescriptor | None = None

    async def round(self) -> None:
        master = Address.parse(self._keyring.address)
        keys = []
        for member in self._members:
            try:
                if await self._keyring.pinned(str(member)) is None:
                    await self._peers.lookup(member)
                fingerprint = await self._keyring.pinned(str(member))
                keys.append((member, fingerprint, (await self._keyring.exportKey(str(member))).decode("ascii")))
            except P2PMTAError as e:
                self.log.info("no key of member {member} yet: {e}", member=str(member), e=e)
        now = self._clock.seconds()
        descriptor = GroupDescriptor(master.group, master, self._members, now, now + self._ttl, tuple(keys))
        signature = await self._keyring.sign(descriptor.body())
        value = wrapSigned(descriptor.body(), signature)
        key = groupKey(master.group)
        if not await self._dht.put(key, value, self._password, self._ttl):
            self.retryIn(LONELY_RETRY)
        self.published = descriptor
        self.log.info(
            "published group {group}: {members}",
            group=master.group,
            members=", ".join(str(m) for m in self._members),
        )

        def replaced(old: bytes) -> bool:
            try:
                found = GroupDescriptor.fromBody(unwrapSigned(old)[0])
            except BadNotification:
                return False
            return found.master == master and found.issued < descriptor.issued

        await deleteReplaced(self._dht, key, value, self._password, replaced)


class GroupDirectory:
    """
    Reads group descriptors and checks them against the group master's key.
    """

    log = Logger()

    def __init__(self, clock, dht, keyring, peers) -> None:
        """
        @param peers: the L{p2pmta.descriptor.PeerDirectory}, to find and pin
            the master's key.
        """
        self._clock = clock
        self._dht = dht
        self._keyring = keyring
        self._peers = peers
        self._masters: dict[str, Address] = {}

    def lookup(self, group: str) -> Deferred:
        """
        @return: a Deferred firing with the newest valid L{GroupDescriptor}
            of C{group}, or failing with L{UnknownGroup}.
        """
        return Deferred.fromCoroutine(self._lookup(group.lower()))

    async def _lookup(self, group: str) -> GroupDescriptor:
        now = self._clock.seconds()
        candidates = []
        for value in await self._dht.get(groupKey(group)):
            try:
                body, signature = unwrapSigned(value)
                descriptor = GroupDescriptor.fromBody(body)
            except BadNotification as e:
                self.log.warn("ignoring a malformed descriptor of group {group}: {e}", group=group, e=e)
                continue
            if descriptor.group == group and descriptor.expires > now:
                candidates.append((descriptor, body, signature))
        candidates.sort(key=lambda c: c[0].issued, reverse=True)
        for descriptor, body, signature in candidates:
            pinned = self._masters.get(group)
            if pinned is not None and descriptor.master != pinned:
                self.log.warn(
                    "ignoring a descriptor of group {group} by {master}: its master is {pinned}",
                    group=group,
                    master=str(descriptor.master),
                    pinned=str(pinned),
                )
                continue
            try:
                if await self._keyring.pinned(str(descriptor.master)) is None:
                    await self._pinMaster(descriptor)
                await self._keyring.verify(body, signature, str(descriptor.master))
            except P2PMTAError as e:
                self.log.warn(
                    "ignoring a descriptor of group {group}: not signed by {master} ({e})",
                    group=group,
                    master=str(descriptor.master),
                    e=e,
                )
                continue
            self._masters.setdefault(group, descriptor.master)
            await self._pinMembers(descriptor)
            return descriptor
        raise UnknownGroup(group)

    async def _pinMaster(self, descriptor: GroupDescriptor) -> None:
        """
        Pin the master's key: from its peer descriptor if it is around,
        else from the key the group descriptor carries (first use).
        """
        try:
            await self._peers.lookup(descriptor.master)
            return
        except P2PMTAError:
            pass
        for address, fingerprint, key in descriptor.keys:
            if address == descriptor.master:
                await self._keyring.pin(str(address), key.encode("ascii"), fingerprint)

    async def _pinMembers(self, descriptor: GroupDescriptor) -> None:
        """Pin, on first use, the members' keys the master vouches for."""
        for address, fingerprint, key in descriptor.keys:
            if address in descriptor.members and await self._keyring.pinned(str(address)) is None:
                try:
                    await self._keyring.pin(str(address), key.encode("ascii"), fingerprint)
                except P2PMTAError as e:
                    self.log.warn("key of {member} in group {group} refused: {e}", member=str(address), group=descriptor.group, e=e)
