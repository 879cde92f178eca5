# -*- test-case-name: tests.test_mailflow -*-
"""
The receiving pipeline (paper, section 4.3 steps 6-10).

Send notifications under C{ns:<self>} are decrypted, their signature
verified against the sender's pinned key, and shown in C{INBOX} at once with
the message's real header section and size.  The body is pulled from the
sender's outbox only when the mail client asks for it; then, or when the
user expunges a message never opened, the send notification is deleted and
a receive notification is posted to the sender.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.errors import (
    BodyUnavailable,
    CryptoError,
    DecryptionFailed,
    FetchError,
    P2PMTAError,
    UnknownPeer,
)
from p2pmta.groups import UnknownGroup
from p2pmta.httpclient import fetchInto
from p2pmta.logs import logFailure
from p2pmta.notification import (
    BadNotification,
    ReceiveNotification,
    SendNotification,
    splitHeaders,
    unwrapSigned,
)

#: The largest send notification p2pmta decrypts.
MAX_NOTIFICATION_SIZE = 64 * 1024


def authenticationResults(receiver: Address, sender: Address, fingerprint: str) -> bytes:
    """
    @return: the C{Authentication-Results:} header field (RFC 8601) a
        delivered message carries: which sender key was verified.
    """
    return (
        f"Authentication-Results: {receiver.group}.p2pmta; x-p2pmta-openpgp=pass"
        f" (signed notification, sender key {fingerprint}) smtp.mailfrom={sender}\r\n"
    ).encode("ascii")


class Receiver:
    """
    The receiving side of a peer.
    """

    log = Logger()

    def __init__(self, peer) -> None:
        self._peer = peer
        self._inFlight: set = set()
        self.pullDirectory = os.path.join(peer.dataDir.path, "pulls")

    @property
    def address(self) -> Address:
        return self._peer.config.address

    # Step 6-7: notifications

    async def handleNotification(self, raw: bytes) -> None:
        """
        Act on one value found under C{ns:<self>}: show it in INBOX if it is
        a genuine notification not seen before; drop and log it otherwise.
        """
        peer = self._peer
        key = hashlib.sha256(raw).hexdigest()
        if key in self._inFlight:
            return
        self._inFlight.add(key)
        try:
            if await peer.ledger.query("SELECT hash FROM incoming WHERE hash = ?", key):
                return
            try:
                notification, fingerprint = await self._open(raw)
            except (BadNotification, DecryptionFailed) as e:
                self.log.warn("dropped a notification that is not genuine: {e}", e=e)
                await peer.ledger.query(
                    "INSERT OR IGNORE INTO incoming (hash, state, received, reason) VALUES (?, 'bad', ?, ?)",
                    key,
                    self._peer.clock.seconds(),
                    str(e)[:200],
                )
                return
            except (UnknownPeer, FetchError, CryptoError) as e:
                # Perhaps the sender is away: the next poll tries again.
                self.log.info("cannot check a notification yet: {e}", e=e)
                return
            await self._show(key, raw, notification, fingerprint)
        finally:
            self._inFlight.discard(key)

    async def _open(self, raw: bytes) -> tuple[SendNotification, str]:
        peer = self._peer
        if len(raw) > MAX_NOTIFICATION_SIZE:
            raise BadNotification("too large")
        wrapped = await peer.keyring.decrypt(raw, MAX_NOTIFICATION_SIZE)
        body, signature = unwrapSigned(wrapped)
        notification = SendNotification.decode(body)
        if notification.recipient != self.address:
            raise BadNotification(f"addressed to {notification.recipient}")
        await self._knowKeyOf(notification.sender)
        try:
            fingerprint = await peer.keyring.verify(body, signature, str(notification.sender))
        except CryptoError as e:
            raise BadNotification(f"signature of {notification.sender}: {e}") from None
        return notification, fingerprint

    async def _knowKeyOf(self, sender: Address) -> None:
        """
        Have C{sender}'s key pinned: from its descriptor, or, while it and
        its descriptor are away, from its group's descriptor.
        """
        peer = self._peer
        if await peer.keyring.pinned(str(sender)) is not None:
            return
        try:
            await peer.directory.lookup(sender)
        except UnknownPeer:
            try:
                await peer.groups.lookup(sender.group)
            except UnknownGroup:
                raise UnknownPeer(str(sender)) from None
            if await peer.keyring.pinned(str(sender)) is None:
                raise

    async def _show(self, key: str, raw: bytes, n: SendNotification, fingerprint: str) -> None:
        peer = self._peer
        known = await peer.ledger.query(
            "SELECT hash FROM incoming WHERE sender = ? AND digest = ? AND state != 'bad'", str(n.sender), n.digest
        )
        state = "duplicate" if known else "shown"
        await peer.ledger.query(
            "INSERT OR IGNORE INTO incoming (hash, state, received, sender, digest, password, ciphertext_size,"
            " size, headers, raw, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            key,
            state,
            self._peer.clock.seconds(),
            str(n.sender),
            n.digest,
            n.password,
            n.ciphertextSize,
            n.size,
            n.headers,
            raw,
            fingerprint,
        )
        if known:
            # The same message announced again (a sender that resumed after
            # a crash): one copy is shown; this value is deleted as well.
            await self._deleteNotification(raw, n.password)
            return
        extra = authenticationResults(self.address, n.sender, fingerprint)
        await peer.mailStore.deliver(
            "INBOX",
            extra + n.headers,
            len(extra) + n.size,
            {"incoming": key, "sender": str(n.sender), "digest": n.digest},
            date=n.sent,
        )
        self.log.info(
            "new message from {sender}: {digest}, {size} bytes (not pulled)",
            sender=str(n.sender),
            digest=n.digest,
            size=n.size,
        )

    # Step 9: pull on open

    def fetchBody(self, mailbox: str, record) -> Deferred:
        """
        The mail store's C{bodyFetcher}: pull, check, decrypt and return the
        path of the complete message.
        """
        return Deferred.fromCoroutine(self._fetchBody(record))

    async def _fetchBody(self, record) -> str:
        peer = self._peer
        key = record.meta.get("incoming")
        rows = await peer.ledger.query("SELECT * FROM incoming WHERE hash = ?", key) if key else []
        if not rows:
            raise BodyUnavailable("no notification is known for this message")
        row = rows[0]
        sender = Address.parse(row["sender"])
        await peer.inThreads(os.makedirs, self.pullDirectory, 0o700, True)
        base = os.path.join(self.pullDirectory, uuid.uuid4().hex)
        try:
            path = await self._pull(row, sender, base)
        except (P2PMTAError, OSError) as e:
            self.log.warn("cannot pull {digest} from {sender}: {e}", digest=row["digest"], sender=str(sender), e=e)
            for suffix in (".gpg", ".plain", ".eml"):
                await peer.inThreads(_removeIfThere, base + suffix)
            if isinstance(e, BodyUnavailable):
                raise
            raise BodyUnavailable(str(e)) from None
        await peer.ledger.query("UPDATE incoming SET state = 'pulled' WHERE hash = ? AND state = 'shown'", key)
        self._peer.track(Deferred.fromCoroutine(self._sendReceipt(key))).addErrback(
            logFailure(self.log, "posting a receive notification failed; will retry")
        )
        return path

    async def _pull(self, row, sender: Address, base: str) -> str:
        peer = self._peer
        started = time.monotonic()
        try:
            url = await peer.directory.withPeer(sender, lambda d: self._download(d, row, base))
        except (FetchError, UnknownPeer, BodyUnavailable) as e:
            url = await self._downloadFromGroup(sender, row, base, e)
        await peer.keyring.decryptFile(base + ".gpg", base + ".plain", row["size"])
        extra = authenticationResults(self.address, sender, row["reason"])

        def assemble() -> str:
            # Streamed: a 50 MB message is never held in memory.
            notified = row["headers"]
            with open(base + ".plain", "rb") as plain:
                size = os.fstat(plain.fileno()).st_size
                if size > len(notified):
                    # The notified section ends at the message's first blank line.
                    matches = plain.read(len(notified)) == notified
                else:
                    # A message without a body: compare as the sender split it.
                    matches = splitHeaders(plain.read())[0] == notified
                if size != row["size"] or not matches:
                    raise BodyUnavailable("the message does not match its notification")
                plain.seek(0)
                with open(base + ".eml", "wb") as out:
                    out.write(extra)
                    shutil.copyfileobj(plain, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
            os.remove(base + ".plain")
            os.remove(base + ".gpg")
            return base + ".eml"

        path = await peer.inThreads(assemble)
        self.log.info(
            "pulled {digest} from {url}: {size} bytes in {seconds:.3f}s",
            digest=row["digest"],
            url=url,
            size=row["size"],
            seconds=time.monotonic() - started,
        )
        return path

    async def _downloadFromGroup(self, sender: Address, row, base: str, why: Exception) -> str:
        """
        The sender's outbox failed us (C{why}): try the other members of the
        sender's group, which replicate its outbox (paper, section 4.5).
        """
        peer = self._peer
        try:
            group = await peer.groups.lookup(sender.group)
        except UnknownGroup:
            raise why from None
        if sender not in group.members:
            raise why
        for member in group.members:
            if member in (sender, self.address):
                continue
            try:
                return await peer.directory.withPeer(member, lambda d: self._download(d, row, base))
            except (FetchError, UnknownPeer, BodyUnavailable) as e:
                self.log.info("group member {member} cannot serve {digest}: {e}", member=str(member), digest=row["digest"], e=e)
        raise why

    async def _download(self, descriptor, row, base: str) -> str:
        """
        Download the ciphertext into C{base}.gpg and check its hash.

        @return: the URL it came from.
        """
        url = descriptor.link("outbox/" + row["digest"])
        hasher = hashlib.sha256()
        with open(base + ".gpg", "wb") as f:

            def sink(chunk: bytes) -> None:
                hasher.update(chunk)
                f.write(chunk)

            await fetchInto(self._peer.agent, url, sink, row["ciphertext_size"], self._peer.reactor)
        if hasher.hexdigest() != row["digest"]:
            raise BodyUnavailable(f"{url} served bytes that do not match the notified hash")
        return url

    # Step 10: receive notifications

    async def inboxExpunged(self, records) -> None:
        """The INBOX hook: a message expunged unread is rejected."""
        peer = self._peer
        for record in records:
            key = record.meta.get("incoming")
            if not key:
                continue
            await peer.ledger.query("UPDATE incoming SET state = 'rejected' WHERE hash = ? AND state = 'shown'", key)
            await self._sendReceipt(key)

    async def _sendReceipt(self, key: str) -> None:
        if ("receipt", key) in self._inFlight:
            return
        self._inFlight.add(("receipt", key))
        try:
            await self._postReceipt(key)
        finally:
            self._inFlight.discard(("receipt", key))

    async def _postReceipt(self, key: str) -> None:
        peer = self._peer
        rows = await peer.ledger.query(
            "SELECT * FROM incoming WHERE hash = ? AND state IN ('pulled', 'rejected')", key
        )
        if not rows:
            return
        row = rows[0]
        sender = Address.parse(row["sender"])
        receipt = ReceiveNotification.make(row["password"], row["digest"], self.address)
        await peer.dht.put(sender.receiveKey, receipt.encode(), row["password"], NOTIFICATION_TTL)
        await self._deleteNotification(row["raw"], row["password"])
        await peer.ledger.query("UPDATE incoming SET state = 'receipted', raw = NULL WHERE hash = ?", key)
        self.log.info("told {sender} we are done with {digest}", sender=str(sender), digest=row["digest"])

    async def _deleteNotification(self, raw: bytes, password: bytes) -> None:
        try:
            await self._peer.dht.delete(self.address.sendKey, raw, password)
        except P2PMTAError as e:
            self.log.debug("send notification not deleted: {e}", e=e)

    async def round(self) -> None:
        """
        One periodic poll: new notifications, and receipts not yet posted.
        """
        peer = self._peer
        for raw in await peer.dht.get(self.address.sendKey):
            await self.handleNotification(raw)
        for row in await peer.ledger.query("SELECT hash FROM incoming WHERE state IN ('pulled', 'rejected')"):
            await self._sendReceipt(row["hash"])
        await peer.ledger.query(
            "DELETE FROM incoming WHERE state IN ('bad', 'receipted', 'duplicate') AND received < ?",
            self._peer.clock.seconds() - NOTIFICATION_TTL - 86400,
        )


def _removeIfThere(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
