# -*- test-case-name: tests.test_mailflow -*-
"""
The sending pipeline (paper, section 4.3 steps 1-5 and 11; 4.4).

A message accepted over SMTP is spooled durably, encrypted once for all its
recipients into the outbox under the SHA-256 of the ciphertext, announced to
each recipient by a signed, encrypted send notification under
C{ns:<recipient>}, and filed in C{Sent} and C{Outbox}.  Receive
notifications under C{nr:<self>} mark recipients done; once all are done
(or their notifications expired) the ciphertext leaves the outbox.
Deleting a message from C{Outbox} cancels it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import time
import uuid

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL, entry
from p2pmta.errors import NotFound, P2PMTAError
from p2pmta.fileutil import fsyncDir
from p2pmta.interfaces import ISubmission
from p2pmta.logs import logFailure
from p2pmta.notification import (
    BadNotification,
    ReceiveNotification,
    SendNotification,
    attachmentsOf,
    splitHeaders,
    wrapSigned,
)

#: How long the key of a peer not seen (no mail to or from it) is kept.
KEY_RETENTION = 90 * 86400.0

#: Content types that are already compressed: gpg's compression only costs
#: time on them.
_COMPRESSED_TYPES = (b"image/jpeg", b"image/png", b"application/zip", b"application/gzip", b"video/", b"audio/")


def _isCompressible(headers: bytes) -> bool:
    lowered = headers.lower()
    return not any(kind in lowered for kind in _COMPRESSED_TYPES)


def _readMessageFacts(path: str) -> tuple[bytes, int, list]:
    """Header section, size and attachments of a spooled message (blocking)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        message = f.read()
    headers, _ = splitHeaders(message)
    return headers, size, attachmentsOf(message)


@implementer(ISubmission)
class Sender:
    """
    The sending side of a peer.  Also the SMTP server's L{ISubmission}.
    """

    log = Logger()

    def __init__(self, peer, maxMessageSize: int, concurrency: int = 4) -> None:
        """
        @param peer: the L{p2pmta.service.Peer}, for its address, DHT,
            keyring, outbox, mail store, ledger, directory and threads.
        """
        self._peer = peer
        self.maxMessageSize = maxMessageSize
        self.spoolDirectory = peer.dataDir.spool
        self._semaphore = DeferredSemaphore(concurrency)
        self._inFlight: dict[str, Deferred] = {}
        self._pending: list[dict] = []
        self._lastKeyPrune = float("-inf")

    @property
    def address(self) -> Address:
        return self._peer.config.address

    # ISubmission

    def checkRecipient(self, address: Address) -> Deferred:
        return self._peer.directory.lookup(address).addCallback(lambda _: None)

    def accept(self, sender: Address, recipients, path: str) -> Deferred:
        return Deferred.fromCoroutine(self._accept(sender, list(recipients), path))

    async def _accept(self, sender: Address, recipients: list, path: str) -> str:
        messageId = uuid.uuid4().hex
        spooled = os.path.join(self.spoolDirectory, messageId + ".eml")

        def moveIn() -> None:
            os.rename(path, spooled)
            fsyncDir(self.spoolDirectory)

        await self._peer.inThreads(moveIn)
        statements = [
            (
                "INSERT INTO outgoing (id, sender, created, state, spool) VALUES (?, ?, ?, 'spooled', ?)",
                (messageId, str(sender), self._peer.clock.seconds(), spooled),
            )
        ]
        for recipient in dict.fromkeys(str(r) for r in recipients):
            statements.append(
                (
                    "INSERT INTO deliveries (outgoing, recipient, password, state) VALUES (?, ?, ?, 'pending')",
                    (messageId, recipient, secrets.token_bytes(32)),
                )
            )
        try:
            await self._peer.ledger.transaction(statements)
        except Exception:
            await self._peer.inThreads(os.rename, spooled, path)
            raise
        self.log.info("spooled {id} for {n} recipients", id=messageId, n=len(statements) - 1)
        self.process(messageId)
        return messageId

    # The pipeline

    def process(self, messageId: str) -> Deferred:
        """
        Take message C{messageId} as far as it can go now.  Safe to call
        again: every step is recorded, and a step already done is skipped.
        """
        running = self._inFlight.get(messageId)
        if running is not None:
            return running
        d = self._semaphore.run(lambda: Deferred.fromCoroutine(self._process(messageId)))

        def done(result):
            self._inFlight.pop(messageId, None)
            return result

        d.addBoth(done)
        d.addErrback(logFailure(self.log, "sending {id} failed; will retry", id=messageId))
        self._inFlight[messageId] = d
        return self._peer.track(d)

    async def _process(self, messageId: str) -> None:
        peer = self._peer
        rows = await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", messageId)
        if not rows:
            return
        row = rows[0]
        if row["state"] == "spooled":
            row = await self._encrypt(row)
        if row["state"] == "encrypted":
            # Filed in Sent and Outbox first: a recipient whose peer cannot
            # be reached now must not keep the message out of Sent.
            row = await self._file(row)
        if row["state"] == "sent":
            await self._notifyAll(row)

    async def _encrypt(self, row):
        peer = self._peer
        recipients = [
            r["recipient"]
            for r in await peer.ledger.query("SELECT recipient FROM deliveries WHERE outgoing = ?", row["id"])
        ]
        headers, size, attachments = await peer.inThreads(_readMessageFacts, row["spool"])
        encrypted = row["spool"] + ".gpg"
        started = time.monotonic()
        await peer.keyring.encryptFile(row["spool"], encrypted, recipients, compress=_isCompressible(headers))
        ciphertextSize = os.path.getsize(encrypted)
        digest = await peer.outbox.addFile(encrypted, move=True)
        await peer.ledger.query(
            "UPDATE outgoing SET state = 'encrypted', digest = ?, ciphertext_size = ?, size = ?, headers = ?,"
            " attachments = ? WHERE id = ?",
            digest,
            ciphertextSize,
            size,
            headers,
            json.dumps(attachments),
            row["id"],
        )
        self.log.info(
            "encrypted {id} once for {n} recipients: {digest}, {size} -> {csize} bytes in {seconds:.3f}s",
            id=row["id"],
            n=len(recipients),
            digest=digest,
            size=size,
            csize=ciphertextSize,
            seconds=time.monotonic() - started,
        )
        return (await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", row["id"]))[0]

    async def _notifyAll(self, row) -> None:
        peer = self._peer
        deliveries = await peer.ledger.query(
            "SELECT * FROM deliveries WHERE outgoing = ? AND state = 'pending'", row["id"]
        )
        for delivery in deliveries:
            recipient = Address.parse(delivery["recipient"])
            notification = SendNotification(
                sender=Address.parse(row["sender"]),
                recipient=recipient,
                digest=row["digest"],
                ciphertextSize=row["ciphertext_size"],
                size=row["size"],
                headers=row["headers"],
                password=delivery["password"],
                sent=row["created"],
                attachments=tuple(json.loads(row["attachments"] or "[]")),
            )
            body = notification.encode()
            try:
                await peer.directory.lookup(recipient)  # pins its key if new
                signature = await peer.keyring.sign(body)
                value = await peer.keyring.encrypt(wrapSigned(body, signature), [str(recipient)])
                await peer.dht.put(recipient.sendKey, value, delivery["password"], NOTIFICATION_TTL)
            except P2PMTAError as e:
                # The others still go; the poll round tries this one again.
                self.log.warn("cannot notify {recipient} yet: {e}", recipient=str(recipient), e=e)
                continue
            await peer.ledger.query(
                "UPDATE deliveries SET state = 'notified', notification = ? WHERE outgoing = ? AND recipient = ?",
                value,
                row["id"],
                delivery["recipient"],
            )
            self.log.info("notified {recipient} of {digest}", recipient=str(recipient), digest=row["digest"])
        await self.refreshNotifications()

    async def _file(self, row):
        """Copy the sent message to Sent and Outbox, then drop the spool file."""
        peer = self._peer
        store = peer.mailStore
        for mailbox, flags in (("Sent", ("\\Seen",)), ("Outbox", ("\\Seen",))):
            if store.findByMeta(mailbox, "outgoing", row["id"]):
                continue
            copy = row["spool"] + "." + mailbox
            await peer.inThreads(shutil.copyfile, row["spool"], copy)
            await store.deliver(
                mailbox,
                row["headers"],
                row["size"],
                {"outgoing": row["id"], "digest": row["digest"]},
                bodyPath=copy,
                flags=flags,
                date=row["created"],
            )
        await peer.ledger.query("UPDATE outgoing SET state = 'sent' WHERE id = ?", row["id"])
        await peer.inThreads(_removeIfThere, row["spool"])
        return (await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", row["id"]))[0]

    def notifications(self) -> list[dict]:
        """
        The send notifications still waiting for their recipients, as
        C{{"key": "hash:<sha1 of ns:recipient>", "entry": <base64>}}: opaque
        DHT entries that group members re-publish while this peer is away
        (recipients' names stay out of the list).
        """
        return list(self._pending)

    async def refreshNotifications(self) -> None:
        """Recompute L{notifications} from the ledger."""
        rows = await self._peer.ledger.query(
            "SELECT d.recipient, d.password, d.notification, o.created FROM deliveries d"
            " JOIN outgoing o ON o.id = d.outgoing WHERE d.state = 'notified' AND d.notification IS NOT NULL"
        )
        pending = []
        for row in rows:
            stored = entry.PutEntry(
                row["notification"], entry.passwordHash(row["password"]), row["created"] + NOTIFICATION_TTL
            )
            pending.append(
                {
                    "key": "hash:" + entry.keyHash(Address.parse(row["recipient"]).sendKey),
                    "entry": base64.b64encode(stored.encode()).decode("ascii"),
                }
            )
        self._pending = pending

    # Receive notifications (step 11) and garbage collection

    async def handleReceipt(self, value: bytes) -> None:
        """
        Act on one value found under C{nr:<self>}.
        """
        peer = self._peer
        try:
            receipt = ReceiveNotification.decode(value)
        except BadNotification as e:
            self.log.warn("ignoring a malformed receive notification: {e}", e=e)
            return
        rows = await peer.ledger.query(
            "SELECT d.*, o.digest FROM deliveries d JOIN outgoing o ON o.id = d.outgoing"
            " WHERE o.digest = ? AND d.recipient = ?",
            receipt.digest,
            str(receipt.recipient),
        )
        if not rows:
            return
        delivery = rows[0]
        if not receipt.provenBy(delivery["password"]):
            self.log.warn("ignoring a forged receive notification for {digest}", digest=receipt.digest)
            return
        if delivery["state"] in ("notified", "pending"):
            # The local copy of the notification is no longer needed.
            await peer.ledger.query(
                "UPDATE deliveries SET state = 'done', notification = NULL WHERE outgoing = ? AND recipient = ?",
                delivery["outgoing"],
                delivery["recipient"],
            )
            self.log.info(
                "{recipient} is done with {digest}", recipient=delivery["recipient"], digest=receipt.digest
            )
        try:
            await peer.dht.delete(self.address.receiveKey, value, delivery["password"])
        except P2PMTAError:
            pass
        await self.finishIfDone(delivery["outgoing"])

    async def finishIfDone(self, messageId: str) -> None:
        """
        Remove the ciphertext and the C{Outbox} copy once no recipient may
        still fetch the message.
        """
        peer = self._peer
        waiting = await peer.ledger.query(
            "SELECT COUNT(*) AS n FROM deliveries WHERE outgoing = ? AND state IN ('pending', 'notified')",
            messageId,
        )
        rows = await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", messageId)
        if waiting[0]["n"] or not rows or rows[0]["state"] != "sent":
            return
        await peer.ledger.query("UPDATE outgoing SET state = 'finished' WHERE id = ?", messageId)
        await peer.outbox.remove(rows[0]["digest"])
        copies = [r.uid for r in peer.mailStore.findByMeta("Outbox", "outgoing", messageId)]
        if copies:
            await peer.mailStore.expunge("Outbox", copies)
        self.log.info("{digest} fetched by all recipients: removed from the outbox", digest=rows[0]["digest"])

    async def cancel(self, messageId: str) -> None:
        """
        Cancel a message: delete its pending notifications and ciphertext
        (the paper's cancellation, by deleting it from C{Outbox}).
        """
        peer = self._peer
        rows = await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", messageId)
        if not rows or rows[0]["state"] in ("finished", "cancelled"):
            return
        for delivery in await peer.ledger.query(
            "SELECT * FROM deliveries WHERE outgoing = ? AND state IN ('pending', 'notified')", messageId
        ):
            if delivery["notification"] is not None:
                try:
                    await peer.dht.delete(
                        Address.parse(delivery["recipient"]).sendKey,
                        delivery["notification"],
                        delivery["password"],
                    )
                except NotFound:
                    pass
            await peer.ledger.query(
                "UPDATE deliveries SET state = 'cancelled', notification = NULL WHERE outgoing = ? AND recipient = ?",
                messageId,
                delivery["recipient"],
            )
        await peer.ledger.query("UPDATE outgoing SET state = 'cancelled' WHERE id = ?", messageId)
        if rows[0]["digest"]:
            await peer.outbox.remove(rows[0]["digest"])
        self.log.info("cancelled {id}", id=messageId)

    async def outboxExpunged(self, records) -> None:
        """The Outbox hook: deleting a message there cancels it."""
        for record in records:
            messageId = record.meta.get("outgoing")
            if messageId:
                await self.cancel(messageId)

    async def round(self) -> None:
        """
        One periodic round: resume unfinished sends, read receive
        notifications, expire deliveries whose notification expired.
        """
        peer = self._peer
        await self.refreshNotifications()
        for row in await peer.ledger.query(
            "SELECT id FROM outgoing WHERE state IN ('spooled', 'encrypted') OR (state = 'sent' AND EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.outgoing = outgoing.id AND d.state = 'pending'))"
        ):
            self.process(row["id"])
        for value in await peer.dht.get(self.address.receiveKey):
            await self.handleReceipt(value)
        cutoff = self._peer.clock.seconds() - NOTIFICATION_TTL
        expired = await peer.ledger.query(
            "SELECT DISTINCT d.outgoing FROM deliveries d JOIN outgoing o ON o.id = d.outgoing"
            " WHERE d.state IN ('pending', 'notified') AND o.created < ?",
            cutoff,
        )
        for row in expired:
            await peer.ledger.query(
                "UPDATE deliveries SET state = 'expired', notification = NULL"
                " WHERE outgoing = ? AND state IN ('pending', 'notified')",
                row["outgoing"],
            )
            await self.finishIfDone(row["outgoing"])
        now = peer.clock.seconds()
        if now - self._lastKeyPrune >= 86400:
            self._lastKeyPrune = now
            forgotten = await peer.keyring.prune(now - KEY_RETENTION)
            if forgotten:
                self.log.info("forgot the keys of {n} peers unseen for long", n=len(forgotten))


def _removeIfThere(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
