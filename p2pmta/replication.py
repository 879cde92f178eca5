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

import hashlib
import json
import os
import time

from twisted.internet.defer import DeferredSemaphore, gatherResults
from twisted.logger import Logger

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.errors import BodyUnavailable, P2PMTAError
from p2pmta.fileutil import AtomicFile
from p2pmta.groups import UnknownGroup
from p2pmta.httpclient import fetchBytes, fetchInto
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

    def __init__(self, own, replicas) -> None:
        self._own = own
        self._replicas = replicas

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
        peer = self._peer
        try:
            group = await peer.groups.lookup(self.address.group)
        except UnknownGroup:
            return
        if self.address not in group.members:
            return
        for member in group.members:
            if member == self.address:
                continue
            try:
                listed = await peer.directory.withPeer(member, self._msglist)
            except (P2PMTAError, ValueError) as e:
                self.log.info("group member {member} skipped this round: {e}", member=str(member), e=e)
                await self._expireAbsent(member)
                continue
            await self._mirror(member, listed)
        await self._reportDiskUse()

    async def _msglist(self, descriptor) -> set[str]:
        raw = await fetchBytes(self._peer.agent, descriptor.link("outbox/msglist"), MAX_MSGLIST_SIZE, self._peer.reactor)
        listed = json.loads(raw)["messages"]
        return {d for d in listed if isDigest(d)}

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
            time.time(),
        )
        return True

    async def _download(self, descriptor, digest: str) -> None:
        peer = self._peer
        replicas = peer.replicas
        target = AtomicFile(replicas.directory, mode=0o600)
        hasher = hashlib.sha256()

        def sink(chunk: bytes) -> None:
            hasher.update(chunk)
            target.write(chunk)

        try:
            await fetchInto(peer.agent, descriptor.link("outbox/" + digest), sink, MAX_REPLICA_SIZE, peer.reactor)
            if hasher.hexdigest() != digest:
                raise BodyUnavailable(f"{descriptor.url} served bytes that do not match {digest}")
            await peer.inThreads(target.commit, os.path.join(replicas.directory, digest))
        except BaseException:
            target.abort()
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
        cutoff = time.time() - NOTIFICATION_TTL
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
