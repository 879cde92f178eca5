# -*- test-case-name: tests.test_groups -*-
"""
Outbox replication among the members of a group (paper, section 4.5), so
that mail can be pulled while its sender is offline.

Every member reads each other member's C{/outbox/msglist}, downloads the
ciphertexts it lacks (checking each one's SHA-256) into its replica area,
and deletes the replicas their owner no longer lists.  Replicas are served
at the same C{/outbox/<hash>} URL as the member's own ciphertexts.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.internet.defer import DeferredSemaphore, gatherResults
from twisted.logger import Logger

from p2pmta.address import Address, groupKey
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.errors import BodyUnavailable, P2PMTAError
from p2pmta.fileutil import AtomicFile
from p2pmta.groups import UnknownGroup
from p2pmta.httpclient import fetchBytes, fetchIntoFile
from p2pmta.rounds import RoundService
from p2pmta.store import isDigest

#: The largest msglist read from a member.
MAX_MSGLIST_SIZE = 16 * 1024 * 1024

#: The largest ciphertext replicated.
MAX_REPLICA_SIZE = 512 * 1024 * 1024


class ServedOutbox:
    """
    What the public outbox serves: this peer's own ciphertexts and its
    replicas at C{/outbox/<hash>}; C{msglist} names only its own, so members
    never replicate replicas.
    """

    def __init__(self, own, replicas, notifications=lambda: []) -> None:
        """
        @param notifications: returns this peer's pending send
            notifications, listed in C{msglist} for group members.
        """
        self._own = own
        self._replicas = replicas
        self.notifications = notifications

    def path(self, digest: str):
        return self._own.path(digest) or self._replicas.path(digest)

    def digests(self) -> list[str]:
        return self._own.digests()


class Replicator(RoundService):
    """
    One member's replication: a round every C{interval} seconds.
    """

    log = Logger()
    roundName = "a replication round"

    def __init__(self, peer, interval: float, concurrency: int = 4) -> None:
        RoundService.__init__(self, peer.reactor, interval)
        self._peer = peer
        self._semaphore = DeferredSemaphore(concurrency)

    @property
    def address(self) -> Address:
        return self._peer.config.address

    async def round(self) -> None:
        try:
            await self._replicateGroup()
        finally:
            await self._reportDiskUse()

    async def _replicateGroup(self) -> None:
        peer = self._peer
        try:
            group = await peer.groups.lookup(self.address.group)
        except UnknownGroup:
            return
        if self.address not in group.members:
            return
        await self._keepGroupAlive(group)
        for member in group.members:
            if member == self.address:
                continue
            try:
                listed, notifications = await peer.directory.withPeer(member, self._msglist)
            except (P2PMTAError, ValueError, KeyError, TypeError) as e:
                self.log.info("group member {member} skipped this round: {e}", member=str(member), e=e)
                await self._standIn(member)
                await self._expireAbsent(member)
                continue
            await self._keepNotifications(member, notifications)
            await self._mirror(member, listed)

    async def _msglist(self, descriptor) -> tuple[set[str], set[tuple[str, bytes]]]:
        raw = await fetchBytes(self._peer.agent, descriptor.link("outbox/msglist"), MAX_MSGLIST_SIZE, self._peer.reactor)
        doc = json.loads(raw)
        digests = {d for d in doc["messages"] if isDigest(d)}
        notifications = set()
        for item in doc.get("notifications", ()):
            key = str(item["key"])
            if key.startswith("hash:") and len(key) == 45:
                notifications.add((key, base64.b64decode(item["entry"], validate=True)))
        return digests, notifications

    async def _keepGroupAlive(self, group) -> None:
        """
        Store the group descriptor again: it must outlive a master that is
        away as long as the members' mail does.
        """
        peer = self._peer
        for raw in await peer.dht.liveEntries(groupKey(group.group)):
            await peer.dht.republish(groupKey(group.group), raw)

    async def _keepNotifications(self, member: Address, notifications) -> None:
        """Remember what C{member} lists as pending, to stand in for it."""
        statements = [("DELETE FROM republish WHERE owner = ?", (str(member),))]
        statements += [
            ("INSERT OR IGNORE INTO republish (owner, key, entry) VALUES (?, ?, ?)", (str(member), key, raw))
            for key, raw in notifications
        ]
        await self._peer.ledger.transaction(statements)

    async def _standIn(self, member: Address) -> None:
        """
        C{member} is away: put its pending notifications again, so that
        they outlive the DHT nodes that stored them, until they expire.
        """
        peer = self._peer
        republished = 0
        for row in await peer.ledger.query("SELECT key, entry FROM republish WHERE owner = ?", str(member)):
            try:
                if await peer.dht.deleted(row["key"], row["entry"]):
                    # Its recipient is done with it (it deleted it, proving
                    # the password): nothing more to keep alive.
                    raise P2PMTAError("deleted by its recipient")
                await peer.dht.republish(row["key"], row["entry"])
                republished += 1
            except P2PMTAError:
                await peer.ledger.query(
                    "DELETE FROM republish WHERE owner = ? AND key = ? AND entry = ?", str(member), row["key"], row["entry"]
                )
        if republished:
            self.log.info("re-published {n} notifications of {member}, who is away", n=republished, member=str(member))

    async def _mirror(self, member: Address, listed: set[str]) -> None:
        peer = self._peer
        held = {
            row["digest"]
            for row in await peer.ledger.query("SELECT digest FROM replicas WHERE owner = ?", str(member))
        }
        for digest in held - listed:
            await self._drop(member, digest, "its owner no longer lists it")
        wanted = sorted(listed - held - set(peer.outbox.digests()))
        results = await gatherResults(
            [self._semaphore.run(self._replicate, member, digest) for digest in wanted], consumeErrors=True
        ) if wanted else []
        if wanted:
            self.log.info(
                "replicated {n} of {wanted} new ciphertexts from {member}",
                n=sum(1 for ok in results if ok),
                wanted=len(wanted),
                member=str(member),
            )

    async def _replicate(self, member: Address, digest: str) -> bool:
        peer = self._peer
        try:
            await peer.directory.withPeer(member, lambda d: self._download(d, digest))
        except (P2PMTAError, OSError) as e:
            self.log.info("cannot replicate {digest} from {member}: {e}", digest=digest, member=str(member), e=e)
            return False
        await peer.ledger.query(
            "INSERT OR REPLACE INTO replicas (owner, digest, added) VALUES (?, ?, ?)",
            str(member),
            digest,
            self._peer.clock.seconds(),
        )
        return True

    async def _download(self, descriptor, digest: str) -> None:
        peer = self._peer
        replicas = peer.replicas
        target = await peer.inThreads(AtomicFile, replicas.directory, 0o600)
        try:
            url = descriptor.link("outbox/" + digest)
            got = await fetchIntoFile(peer.agent, url, target, MAX_REPLICA_SIZE, peer.reactor, peer.inThreads)
            if got != digest:
                raise BodyUnavailable(f"{descriptor.url} served bytes that do not match {digest}")
            await peer.inThreads(target.commit, os.path.join(replicas.directory, digest))
        except BaseException:
            await peer.inThreads(target.abort)
            raise

    async def _drop(self, member: Address, digest: str, why: str) -> None:
        peer = self._peer
        await peer.replicas.remove(digest)
        await peer.ledger.query("DELETE FROM replicas WHERE owner = ? AND digest = ?", str(member), digest)
        self.log.info("dropped replica {digest} of {member}: {why}", digest=digest, member=str(member), why=why)

    async def _expireAbsent(self, member: Address) -> None:
        """
        An owner that stays away: its replicas go once every notification
        that could name them has expired.
        """
        cutoff = self._peer.clock.seconds() - NOTIFICATION_TTL
        for row in await self._peer.ledger.query(
            "SELECT digest FROM replicas WHERE owner = ? AND added < ?", str(member), cutoff
        ):
            await self._drop(member, row["digest"], "expired while its owner stayed away")

    async def _reportDiskUse(self) -> None:
        peer = self._peer

        def measure():
            return (
                len(peer.outbox.digests()),
                peer.outbox.totalBytes(),
                len(peer.replicas.digests()),
                peer.replicas.totalBytes(),
            )

        own, ownBytes, replicas, replicaBytes = await peer.inThreads(measure)
        self.log.info(
            "disk use: outbox {own} ciphertexts, {ownBytes} bytes; replicas {replicas}, {replicaBytes} bytes",
            own=own,
            ownBytes=ownBytes,
            replicas=replicas,
            replicaBytes=replicaBytes,
        )
