# -*- test-case-name: tests.test_mailflow -*-
"""
Send notifications (paper, section 4.3 step 5), batched per recipient.

One notification (a I{notice}) tells a recipient of every message waiting
for it at that moment, up to L{MAX_BATCH}: under load, one signature, one
encryption and one DHT value serve many messages.  The notice itself waits
in the outbox, replicated like a ciphertext; the DHT carries only a small
signed, encrypted I{doorbell} under C{ns:<recipient>} that points to it.
A notice is recorded as C{preparing} before it is stored and rung, C{live}
once its messages are marked as told of, and C{retired} (its file gone)
once no recipient waits on it.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL, entry
from p2pmta.errors import P2PMTAError, ValueTooLarge
from p2pmta.notification import MAX_BATCH, MAX_NOTICE_SIZE, Doorbell, SendNotification, encodeBatch, wrapSigned
from p2pmta.rounds import Coalescing
from p2pmta.store import sha256Hex


class Notices:
    """
    The notices of a peer's sent messages: told of soon after the messages
    leave the sending pipeline, in as few notices as a burst allows.
    """

    log = Logger()

    #: How long a message waits for others to share its notice (each notice
    #: costs its recipient DHT traffic from every node that stores it); not
    #: once none can come: no SMTP session is open and the pipeline is empty.
    notifyDelay = 0.1

    #: In a burst (at least C{burst} messages waiting for their notices),
    #: they wait C{burstDelay} more, once, for the rest of the burst (or
    #: less: until the pipeline has none left): a single message is told
    #: of after L{notifyDelay}; a thousand go in a few large notices, not
    #: in one per pipeline batch.
    burst = 8
    burstDelay = 0.2

    def __init__(self, peer, pipeline) -> None:
        """
        @param peer: the L{p2pmta.service.Peer}, for its address, DHT,
            keyring, outbox, ledger and directory.
        @param pipeline: the sending pipeline (L{p2pmta.sending.Sender}):
            its C{busy()} says whether messages are on their way through
            it, C{idle(timeout)} fires when none are left (or after
            C{timeout} seconds), and C{quiet(timeout)} when no more can come
            (none left, and no SMTP session open).
        """
        self._peer = peer
        self._pipeline = pipeline
        self._encoded: dict[str, dict] = {}  # live notice id -> its msglist entry
        self._preparing: set[str] = set()  # notices being stored and rung now
        self._notifier = Coalescing(
            peer.reactor,
            self.notifyDelay,
            self._notifyPending,
            "notifying recipients failed; will retry",
            peer.track,
            pause=pipeline.quiet,
        )

    @property
    def address(self) -> Address:
        return self._peer.config.address

    def notifyPending(self) -> Deferred:
        """
        Soon notify the recipients of every message sent and not yet
        announced (see L{Coalescing}: messages sent meanwhile share the
        notice).
        """
        return self._notifier()

    async def _notifyPending(self) -> None:
        peer = self._peer
        pending = (
            "SELECT d.outgoing, d.recipient, d.password, o.sender, o.digest, o.ciphertext_size, o.size,"
            " o.headers, o.created, o.attachments, o.session_key FROM deliveries d"
            " JOIN outgoing o ON o.id = d.outgoing WHERE d.state = 'pending' AND o.state = 'sent'"
            " ORDER BY o.created LIMIT 10000"
        )
        rows = await peer.ledger.query(pending)
        if self.burst <= len(rows) < MAX_BATCH and self._pipeline.busy():
            # More are on their way through the pipeline: wait for them, but
            # not past the moment it has none left (the burst is over).
            await self._pipeline.idle(self.burstDelay)
            rows = await peer.ledger.query(pending)
        byRecipient: dict[str, list] = {}
        for row in rows:
            byRecipient.setdefault(row["recipient"], []).append(row)
        for name, items in byRecipient.items():
            recipient = Address.parse(name)
            try:
                await peer.directory.lookup(recipient)  # pins its key if new
            except P2PMTAError as e:
                # The others still go; the poll round tries this one again.
                self.log.warn("cannot notify {recipient} yet: {e}", recipient=name, e=e)
                continue
            for start in range(0, len(items), MAX_BATCH):
                try:
                    await self._notifyBatch(recipient, items[start : start + MAX_BATCH])
                except P2PMTAError as e:
                    self.log.warn("cannot notify {recipient} yet: {e}", recipient=name, e=e)
                    break
        await self.refreshNotifications()

    async def _notifyBatch(self, recipient: Address, items: list) -> None:
        """Tell C{recipient} of C{items} in one notice (or more, if too large)."""
        peer = self._peer
        notifications = [
            SendNotification(
                sender=Address.parse(row["sender"]),
                recipient=recipient,
                digest=row["digest"],
                ciphertextSize=row["ciphertext_size"],
                size=row["size"],
                headers=row["headers"],
                password=row["password"],
                sent=row["created"],
                attachments=tuple(json.loads(row["attachments"] or "[]")),
                sessionKey=row["session_key"] or b"",
            )
            for row in items
        ]
        password = secrets.token_bytes(32)
        body = encodeBatch(notifications, password)
        signature = await peer.keyring.sign(body)
        sealed = await peer.keyring.encrypt(wrapSigned(body, signature), [str(recipient)], compress=6, toSelf=False)
        if len(sealed) > MAX_NOTICE_SIZE and len(items) > 1:
            half = len(items) // 2
            await self._notifyBatch(recipient, items[:half])
            await self._notifyBatch(recipient, items[half:])
            return
        if len(sealed) > MAX_NOTICE_SIZE:
            raise ValueTooLarge(f"the notification of {items[0]['outgoing']} alone takes {len(sealed)} bytes")
        # The notice waits in the outbox (replicated like a ciphertext);
        # the DHT carries only its doorbell.  Recorded as 'preparing'
        # first: should storing or ringing fail, or a crash come, before
        # the messages are marked as told of, a round takes both back.
        digest = sha256Hex(sealed)
        bell = Doorbell(self.address, digest, len(sealed)).encode()
        value = await peer.keyring.encrypt(
            wrapSigned(bell, await peer.keyring.sign(bell)), [str(recipient)], compress=False, toSelf=False
        )
        notice = uuid.uuid4().hex
        self._preparing.add(notice)
        try:
            await peer.ledger.query(
                "INSERT INTO notices (id, recipient, value, password, created, state, body)"
                " VALUES (?, ?, ?, ?, ?, 'preparing', ?)",
                notice,
                str(recipient),
                value,
                password,
                peer.clock.seconds(),
                digest,
            )
            await peer.outbox.add(sealed)
            await peer.dht.put(recipient.sendKey, value, password, NOTIFICATION_TTL)
            await self._tell(notice, recipient, items)
        finally:
            self._preparing.discard(notice)
        self.log.info(
            "notified {recipient} of {n} messages in one notice ({size} bytes; doorbell {bell} bytes)",
            recipient=str(recipient),
            n=len(items),
            size=len(sealed),
            bell=len(value),
        )

    async def _tell(self, notice: str, recipient: Address, items: list) -> None:
        """Mark C{items} as told of by C{notice}, which goes live."""
        statements = [("UPDATE notices SET state = 'live' WHERE id = ?", (notice,))]
        statements += [
            (
                "UPDATE deliveries SET state = 'notified', notice = ? WHERE outgoing = ? AND recipient = ?"
                " AND state = 'pending'",
                (notice, row["outgoing"], str(recipient)),
            )
            for row in items
        ]
        await self._peer.ledger.transaction(statements)

    async def abandonUnfinished(self) -> None:
        """
        Take back the notices whose preparation failed or was cut short by
        a crash: their doorbell (if it was put) and their file.  Their
        messages are still pending, and go in a new notice.
        """
        peer = self._peer
        for row in await peer.ledger.query("SELECT * FROM notices WHERE state = 'preparing'"):
            if row["id"] in self._preparing:
                continue
            try:
                # No look-up first: reading the recipient's key costs all its values.
                await peer.dht.retract(
                    Address.parse(row["recipient"]).sendKey, row["value"], row["password"], NOTIFICATION_TTL
                )
            except P2PMTAError as e:
                self.log.info("could not take back an unfinished notice's doorbell yet: {e}", e=e)
                continue
            await self.retire([row])

    def notifications(self) -> list[dict]:
        """
        The send notifications still waiting for their recipients, as
        C{{"key": "hash:<sha1 of ns:recipient>", "entry": <base64>}}: opaque
        DHT entries that group members re-publish while this peer is away
        (recipients' names stay out of the list).
        """
        return list(self._encoded.values())

    async def refreshNotifications(self) -> None:
        """Retire notices no recipient waits on; recompute L{notifications}."""
        peer = self._peer
        done = await peer.ledger.query(
            "SELECT id, body FROM notices WHERE state = 'live' AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.notice = notices.id AND d.state = 'notified')"
        )
        await self.retire(done)
        rows = await peer.ledger.query(
            "SELECT id, recipient, value, password, created FROM notices WHERE state = 'live'"
        )
        encoded = {}
        for row in rows:
            known = self._encoded.get(row["id"])
            if known is None:
                stored = entry.PutEntry(
                    row["value"], entry.passwordHash(row["password"]), row["created"] + NOTIFICATION_TTL
                )
                known = {
                    "key": "hash:" + entry.keyHash(Address.parse(row["recipient"]).sendKey),
                    "entry": base64.b64encode(stored.encode()).decode("ascii"),
                }
            encoded[row["id"]] = known
        self._encoded = encoded

    async def retire(self, notices) -> None:
        """
        Retire C{notices} (rows with C{id} and C{body}): their notices
        leave the outbox first, so that a crash in between retires them
        again.
        """
        peer = self._peer
        await peer.outbox.removeMany([notice["body"] for notice in notices if notice["body"]])
        if notices:
            await peer.ledger.transaction(
                [("UPDATE notices SET state = 'retired' WHERE id = ?", (notice["id"],)) for notice in notices]
            )
