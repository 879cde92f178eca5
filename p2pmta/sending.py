# -*- test-case-name: tests.test_mailflow -*-
"""
The sending pipeline (paper, section 4.3 steps 1-5 and 11; 4.4).

A message accepted over SMTP is spooled durably, encrypted once for all its
recipients into the outbox under the SHA-256 of the ciphertext, filed in
C{Sent} and C{Outbox}, and announced to each recipient by a signed,
encrypted send notification under C{ns:<recipient>} (L{p2pmta.notices}:
under load, one notice tells of many messages).  Receive notifications under C{nr:<self>} mark
recipients done; once all are done (or their notifications expired) the
ciphertext leaves the outbox.  Deleting a message from C{Outbox} cancels it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.errors import NotFound, P2PMTAError, SealingFailed
from p2pmta.fileutil import removeIfThere
from p2pmta.interfaces import ISubmission
from p2pmta.logs import logFailure
from p2pmta.notices import Notices
from p2pmta.notification import BadNotification, ReceiveNotification
from p2pmta.sealing import LANES, sealSpooled
from p2pmta.spool import sizeAndCrc

#: How long the key of a peer not seen (no mail to or from it) is kept.
KEY_RETENTION = 90 * 86400.0

#: How many messages go through the pipeline's steps together.
PIPELINE_BATCH = 64


@implementer(ISubmission)
class Sender:
    """
    The sending side of a peer.  Also the SMTP server's L{ISubmission}.
    """

    log = Logger()

    #: When messages arrive while a pipeline batch goes through, the next
    #: batch waits this long for more of them: a single message goes at
    #: once, a burst in batches of tens, not of a few (each batch costs
    #: some ten thread calls and ledger statements whatever its size).
    #: Not while no SMTP session is open: then none is on its way.
    gatherDelay = 0.05

    def __init__(self, peer, maxMessageSize: int, keepsEnvelopes: bool = False) -> None:
        """
        @param peer: the L{p2pmta.service.Peer}, for its address, DHT,
            keyring, outbox, mail store, ledger, directory and threads.
        @param keepsEnvelopes: see L{keepsEnvelopes}.
        """
        self._peer = peer
        self.maxMessageSize = maxMessageSize
        self.spoolDirectory = peer.dataDir.spool
        #: Whether a spool file keeps its envelope (L{p2pmta.spool.Envelope}):
        #: then the file's flush alone makes a message ours, and its record
        #: need not wait for a flush of its own before the 250.
        self.keepsEnvelopes = keepsEnvelopes
        self._queue: dict[str, list[Deferred]] = {}  # message id -> waiters
        self._draining = False
        self._gathering = False  # in a burst: see gatherDelay
        self._sessions = 0  # SMTP sessions open
        self._gatherWaiters: list[Deferred] = []  # fired when no SMTP session is open
        self._idleWaiters: list[Deferred] = []  # fired when the pipeline runs dry
        self._quietWaiters: list[Deferred] = []  # fired when neither a session nor the pipeline has any
        self._lastKeyPrune = float("-inf")
        self.notices = Notices(peer, self)  # step 5: telling recipients

    @property
    def address(self) -> Address:
        return self._peer.config.address

    # ISubmission

    def sessions(self, count: int) -> None:
        self._sessions = count
        if not count:
            self._wake(self._gatherWaiters)
        if self._noneComing():
            self._wake(self._quietWaiters)

    def checkRecipient(self, address: Address) -> Deferred:
        return self._peer.directory.lookup(address).addCallback(lambda _: None)

    def accept(self, sender: Address, recipients, path: str, flushing: Deferred, check: tuple) -> Deferred:
        return Deferred.fromCoroutine(self._accept(sender, list(recipients), path, flushing, check))

    def _record(self, messageId: str, sender: str, recipients, created: float, path: str, size: int, crc: int) -> list:
        """The ledger's statements recording a spooled message."""
        statements = [
            (
                "INSERT INTO outgoing (id, sender, created, state, spool, spool_size, spool_crc)"
                " VALUES (?, ?, ?, 'spooled', ?, ?, ?)",
                (messageId, sender, created, path, size, crc),
            )
        ]
        for recipient in dict.fromkeys(recipients):
            statements.append(
                (
                    "INSERT INTO deliveries (outgoing, recipient, password, state) VALUES (?, ?, ?, 'pending')",
                    (messageId, recipient, secrets.token_bytes(16)),
                )
            )
        return statements

    async def _accept(self, sender: Address, recipients: list, path: str, flushing: Deferred, check: tuple) -> str:
        messageId = uuid.uuid4().hex
        # The SMTP server's file stays where it is, under its name: the
        # ledger says it is ours (see cleanAfterCrash).
        size, crc = check
        statements = self._record(
            messageId, str(sender), [str(r) for r in recipients], self._peer.clock.seconds(), path, size, crc
        )
        # The file, its name and the ledger's record on disk before the
        # 250: from then on the message is ours.  Side by side, as neither
        # needs the other: should a crash come between, no 250 was given,
        # and a record whose file is gone or torn (its size and CRC-32 are
        # recorded) is dropped at the next start (forgetUnspooled).  Where
        # the file keeps its envelope, its flush alone keeps the message:
        # the record is committed, not flushed (one flush fewer per
        # message), and made again from the file should a power cut take
        # it (recoverUnrecorded).  A full disk is an OSError (ENOSPC): the
        # SMTP server answers 452.
        ledger = self._peer.ledger
        results = await DeferredList(
            [flushing, ledger.transaction(statements, durable=not self.keepsEnvelopes)],
            consumeErrors=True,
        )
        failures = [result for ok, result in results if not ok]
        if not failures and self.keepsEnvelopes and results[0][1] is not True:
            # This file's envelope was refused (a list of recipients too
            # long for an attribute, say): the record is flushed after all.
            try:
                await ledger.transaction([("UPDATE outgoing SET state = state WHERE id = ?", (messageId,))], durable=True)
            except Exception:
                failures.append(Failure())
        if failures:
            if results[1][0]:
                # Recorded, but the name may not last: not accepted.
                await ledger.transaction(
                    [
                        ("DELETE FROM deliveries WHERE outgoing = ?", (messageId,)),
                        ("DELETE FROM outgoing WHERE id = ?", (messageId,)),
                    ]
                )
            failures[0].raiseException()
        # On the reactor's next turn: after the 250 has gone out, which
        # waits for what this turn still does.  Tracked, so that a peer
        # stopping meanwhile waits for it.
        self._peer.track(deferLater(self._peer.reactor, 0, self.process, messageId)).addErrback(
            logFailure(self.log, "the sending pipeline failed; will retry")
        )
        return messageId

    async def recoverUnrecorded(self, found) -> None:
        """
        Record again the accepted messages whose records a power cut took
        (at start, before the pipeline runs): their files are whole in the
        spool, with their envelopes (L{p2pmta.spool.findUnrecorded}).

        @param found: C{(path, envelope)} pairs.
        """
        if not found:
            return
        statements = []
        for path, envelope in found:
            statements.extend(
                self._record(
                    uuid.uuid4().hex, envelope.sender, envelope.recipients, envelope.created, path,
                    envelope.size, envelope.crc,
                )
            )
        await self._peer.ledger.transaction(statements, durable=True)
        self.log.warn(
            "recorded again {n} accepted messages whose records a crash took, from their spool files", n=len(found)
        )

    async def forgetUnspooled(self) -> None:
        """
        Drop the records of messages whose spool file is gone or torn (at
        start, before the pipeline runs), and the torn files: a crash came
        after the record and before the file was on disk, so no 250 was
        given for them.
        """
        peer = self._peer
        rows = await peer.ledger.query("SELECT id, spool, spool_size, spool_crc FROM outgoing WHERE state = 'spooled'")
        missing = await peer.inThreads(lambda: [row["id"] for row in rows if not _spooledWhole(row)])
        if missing:
            statements = []
            for messageId in missing:
                statements.append(("DELETE FROM deliveries WHERE outgoing = ?", (messageId,)))
                statements.append(("DELETE FROM outgoing WHERE id = ?", (messageId,)))
            await peer.ledger.transaction(statements)
            self.log.warn(
                "forgot {n} messages whose spool file a crash took before their 250", n=len(missing)
            )

    async def dropUnrecorded(self) -> None:
        """
        Remove from the outbox the files no live record names (at start,
        before the pipeline runs): ciphertexts that a crash cut off before
        the ledger recorded them (their messages are sealed again) or after
        their messages were finished or cancelled, and notices retired.
        Left there, they would be served, replicated and listed for ever.
        """
        peer = self._peer
        rows = await peer.ledger.query(
            "SELECT digest AS name FROM outgoing WHERE digest IS NOT NULL"
            " AND state IN ('encrypted', 'sent', 'finishing')"
            " UNION SELECT body FROM notices WHERE body IS NOT NULL AND state IN ('preparing', 'live')"
        )
        named = {row["name"] for row in rows}
        stray = [digest for digest in await peer.inThreads(peer.outbox.digests) if digest not in named]
        if stray:
            await peer.outbox.removeMany(stray)
            self.log.warn("removed {n} files from the outbox that no record names (a crash's)", n=len(stray))

    # The pipeline

    def process(self, messageId: str) -> Deferred:
        """
        Take message C{messageId} as far as it can go now.  Safe to call
        again: every step is recorded, and a step already done is skipped.
        Messages queued together go through each step together (one ledger
        transaction, one notification per recipient for all of them).

        @return: a Deferred firing once the message's pass is over.
        """
        waiter: Deferred = Deferred()
        self._queue.setdefault(messageId, []).append(waiter)
        if not self._draining:
            self._draining = True
            d = Deferred.fromCoroutine(self._drain())
            d.addErrback(logFailure(self.log, "the sending pipeline failed; will retry"))
            self._peer.track(d)
        return self._peer.track(waiter)

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self._gathering and self._sessions and len(self._queue) < PIPELINE_BATCH:
                    # More came while the last batch went through: a burst,
                    # whose next messages share the next batch's work.
                    await self._wait(self._gatherWaiters, self.gatherDelay)
                ids = list(self._queue)[:PIPELINE_BATCH]
                waiters = [w for i in ids for w in self._queue.pop(i)]
                try:
                    await self._processBatch(ids)
                except Exception:
                    self.log.failure("sending {ids} failed; will retry", ids=ids)
                for waiter in waiters:
                    waiter.callback(None)
                self._gathering = bool(self._queue)
        finally:
            self._draining = False
            self._gathering = False
            self._wake(self._idleWaiters)
            if self._noneComing():
                self._wake(self._quietWaiters)

    def _wait(self, waiters: list, timeout: float) -> Deferred:
        """
        A Deferred firing after C{timeout} seconds, or sooner when
        L{_wake} is called with C{waiters}; it leaves C{waiters} once fired.
        """
        d: Deferred = Deferred()
        waiters.append(d)

        def left(result):
            if d in waiters:
                waiters.remove(d)
            return result

        d.addTimeout(timeout, self._peer.reactor, onTimeoutCancel=lambda result, timeout: None)
        return d.addBoth(left)

    @staticmethod
    def _wake(waiters: list) -> None:
        """Fire the waits of C{waiters} (see L{_wait}) now."""
        for waiter in list(waiters):
            if not waiter.called:
                waiter.callback(None)

    def busy(self) -> bool:
        """Whether messages are on their way through the pipeline."""
        return bool(self._queue or self._draining)

    def idle(self, timeout: float) -> Deferred:
        """A Deferred firing once the pipeline has none left, or after C{timeout} seconds."""
        return self._wait(self._idleWaiters, timeout)

    def quiet(self, timeout: float) -> Deferred:
        """
        A Deferred firing after C{timeout} seconds, or as soon as no message
        can be on its way: no SMTP session is open and the pipeline has none
        left (at once if that is so now).
        """
        if self._noneComing():
            return succeed(None)
        return self._wait(self._quietWaiters, timeout)

    def _noneComing(self) -> bool:
        """Whether no SMTP session is open and the pipeline has none left."""
        return not self._sessions and not self.busy()

    async def _processBatch(self, ids: list) -> None:
        peer = self._peer
        marks = ",".join("?" * len(ids))
        rows = await peer.ledger.query(
            "SELECT o.*, (SELECT group_concat(d.recipient, char(10)) FROM deliveries d WHERE d.outgoing = o.id)"
            f" AS recipients FROM outgoing o WHERE o.id IN ({marks})",
            *ids,
        )
        rows = [row.values for row in rows]
        spooled = [row for row in rows if row["state"] == "spooled"]
        if spooled:
            recipients = {row["id"]: row["recipients"].split("\n") if row["recipients"] else [] for row in spooled}
            results = await self._encryptAll(spooled, recipients)
            columns = ("digest", "ciphertext_size", "size", "headers", "attachments", "session_key")
            statements = []
            for row, result in zip(spooled, results):
                if isinstance(result, Failure):
                    self.log.failure("encrypting {id} failed; will retry", result, id=row["id"])
                    continue
                statements.append(
                    (
                        "UPDATE outgoing SET state = 'encrypted', digest = ?, ciphertext_size = ?, size = ?,"
                        " headers = ?, attachments = ?, session_key = ? WHERE id = ? AND state = 'spooled'",
                        result + (row["id"],),
                    )
                )
                # Nothing else changes a spooled message meanwhile: the
                # pipeline takes one message at a time, and one not yet in
                # Outbox cannot be cancelled.
                row.update(zip(columns, result), state="encrypted")
            if statements:
                await peer.ledger.transaction(statements)
        encrypted = [row for row in rows if row["state"] == "encrypted"]
        if encrypted:
            # Filed in Sent and Outbox first: a recipient whose peer cannot
            # be reached now must not keep the message out of Sent.
            await self._file(encrypted)
        if any(row["state"] in ("encrypted", "sent") for row in rows):
            self.notices.notifyPending()

    async def _encryptAll(self, rows, recipients: dict) -> list:
        """
        Encrypt spooled messages, each once for all its recipients, straight
        into the outbox: a part of the batch in each sealing process (see
        L{_encryptPart}), or a half in each of two threads.

        @return: for each row, the facts to record (digest, ciphertext
            size, size, headers, attachments and session key), or the
            L{Failure} that stopped it.
        """
        started = time.monotonic()
        sealers = getattr(self._peer, "sealers", None)
        count = sealers.count if sealers is not None and sealers.available() else 2
        size = -(-len(rows) // count)
        parts = [rows[start : start + size] for start in range(0, len(rows), size)]
        done = await DeferredList(
            [Deferred.fromCoroutine(self._encryptPart(part, recipients)) for part in parts],
            consumeErrors=True,
        )
        results = []
        for part, (ok, result) in zip(parts, done):
            results.extend(result if ok else [result] * len(part))
        stored = [r for r in results if not isinstance(r, Failure)]
        self.log.info(
            "encrypted {n} messages once each for their recipients: {size} -> {csize} bytes in {seconds:.3f}s",
            n=len(stored),
            size=sum(r[2] for r in stored),
            csize=sum(r[1] for r in stored),
            seconds=time.monotonic() - started,
        )
        return results

    async def _encryptPart(self, rows, recipients: dict) -> list:
        """
        Encrypt some of a batch's rows (see L{_encryptAll}) in a sealing
        process, away from the SMTP sessions' share of the GIL; or in the
        keyring's threads if none can, or a message needs gpg.
        """
        peer = self._peer
        sealers = getattr(peer, "sealers", None)
        if sealers is not None and sealers.available():
            prepared = await peer.keyring.whileShared(self._sealingJobs, rows, recipients)
            if prepared is not None:
                try:
                    return await sealers.seal(peer.outbox, self.maxMessageSize, *prepared, lanes=self._sealingLanes())
                except SealingFailed as e:
                    self.log.warn("sealing {n} messages in threads instead: {e}", n=len(rows), e=e)
        return await peer.keyring.whileShared(self._encryptSome, rows, recipients)

    def _sealingLanes(self) -> int:
        """
        How many messages of a batch its sealing process seals at once
        (L{p2pmta.sealing.LANES}): one while an SMTP session is open, so
        that a core is left to it; as many as there are cores, up to
        L{LANES}, once none is, for the messages that came in while the
        last batch of a burst was sealed.
        """
        return 1 if self._sessions else max(1, min(LANES, os.cpu_count() or 1))

    def _sealingJobs(self, rows, recipients: dict) -> tuple[list, dict] | None:
        """
        The jobs and keys for L{p2pmta.sealers.Sealers.seal} (blocking:
        inside L{p2pmta.crypto.Keyring.whileShared}), or L{None} if a
        message is for a key only gpg takes, or for no known key (its
        failure is then the threads' to report).
        """
        keyring = self._peer.keyring
        jobs, keys = [], {}
        for row in rows:
            try:
                found = keyring.encryptionKeys(recipients.get(row["id"], []), toSelf=False)
            except P2PMTAError:
                return None
            if found is None:
                return None
            jobs.append((row["spool"], list(found)))
            keys.update(found)
        return jobs, keys

    def _encryptSome(self, rows, recipients: dict) -> list:
        """The blocking part of L{_encryptAll}, for some of its rows."""
        results = []
        for row in rows:
            try:
                results.append(self._encryptOne(row, recipients.get(row["id"], [])))
            except Exception:
                results.append(Failure())
        # One flush of the folder makes all the new names durable.
        try:
            self._peer.outbox.syncFolder()
        except BaseException:
            for result in results:
                if not isinstance(result, Failure):
                    removeIfThere(os.path.join(self._peer.outbox.directory, result[0]))
            raise
        return results

    def _encryptOne(self, row, recipients: list) -> tuple:
        keyring, outbox = self._peer.keyring, self._peer.outbox
        return sealSpooled(
            row["spool"],
            self.maxMessageSize,
            lambda produce: outbox.storeWith(produce, syncFolder=False),
            # For the recipients only: we keep the plaintext in Sent.
            lambda f, out, level, strategy: keyring.encryptInto(
                f, out, recipients, compress=level, toSelf=False, strategy=strategy
            ),
        )

    async def _file(self, rows) -> None:
        """File sent messages in Sent and Outbox, then drop their spool files."""
        peer = self._peer
        store = peer.mailStore
        # One pass over each mailbox per batch, not one per message.
        ids = [row["id"] for row in rows]
        filed = {mailbox: store.findAllByMeta(mailbox, "outgoing", ids) for mailbox in ("Sent", "Outbox")}
        copies = [
            (row, mailbox, row["spool"] + "." + mailbox)
            for row in rows
            for mailbox in ("Sent", "Outbox")
            if row["id"] not in filed[mailbox]
        ]

        def link() -> set:
            # A second name for the same bytes, not a copy: the mail store
            # never writes to a message file.  A link is on disk already
            # (SMTP flushed the spooled message before its 250).
            return {path for row, _, path in copies if _linkOrCopy(row["spool"], path)}

        linked = await peer.inThreads(link)
        for mailbox in ("Sent", "Outbox"):
            await store.deliverMany(
                mailbox,
                [
                    {
                        "headers": row["headers"],
                        "size": row["size"],
                        "meta": {"outgoing": row["id"], "digest": row["digest"]},
                        "bodyPath": path,
                        "synced": path in linked,
                        "flags": ("\\Seen",),
                        "date": row["created"],
                    }
                    for row, box, path in copies
                    if box == mailbox
                ],
            )
        await peer.ledger.transaction(
            [("UPDATE outgoing SET state = 'sent' WHERE id = ? AND state = 'encrypted'", (row["id"],)) for row in rows]
        )

        def removeSpools() -> None:
            for row in rows:
                removeIfThere(row["spool"])

        await peer.inThreads(removeSpools)

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
        prefixes = receipt.prefixes
        marks = ",".join("?" * len(prefixes))
        rows = await peer.ledger.query(
            "SELECT d.*, o.digest FROM deliveries d JOIN outgoing o ON o.id = d.outgoing"
            f" WHERE d.recipient = ? AND substr(o.digest, 1, {len(prefixes[0])}) IN ({marks})",
            str(receipt.recipient),
            *prefixes,
        )
        proven = [d for d in rows if receipt.provenBy(d["digest"], d["password"])]
        if len(proven) < len(rows):
            self.log.warn(
                "ignoring {n} forged receipts from {who}", n=len(rows) - len(proven), who=str(receipt.recipient)
            )
        finished = [d for d in proven if d["state"] in ("notified", "pending")]
        if finished:
            await peer.ledger.transaction(
                [
                    (
                        "UPDATE deliveries SET state = 'done' WHERE outgoing = ? AND recipient = ?",
                        (d["outgoing"], d["recipient"]),
                    )
                    for d in finished
                ]
            )
            self.log.info(
                "{recipient} is done with {n} messages", recipient=str(receipt.recipient), n=len(finished)
            )
        first = next((d for d in proven if d["digest"].startswith(prefixes[0])), None)
        if first is not None:
            # The recipient put it with the password of its first message.
            try:
                await peer.dht.retract(self.address.receiveKey, value, first["password"], NOTIFICATION_TTL)
            except P2PMTAError:
                pass
        if finished:
            await self.finishIfDone(*{d["outgoing"] for d in finished})
            await self.notices.refreshNotifications()

    async def finishIfDone(self, *messageIds: str) -> None:
        """
        Remove the ciphertexts and the C{Outbox} copies of the messages no
        recipient may still fetch.
        """
        peer = self._peer
        if not messageIds:
            return
        marks = ",".join("?" * len(messageIds))
        rows = await peer.ledger.query(
            f"SELECT id, digest FROM outgoing WHERE id IN ({marks}) AND state IN ('sent', 'finishing') AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.outgoing = outgoing.id AND d.state IN ('pending', 'notified'))",
            *messageIds,
        )
        if not rows:
            return
        # 'finishing' while the copies go: the Outbox hook must not take
        # the expunge for a cancel, and round() finishes what a crash cut.
        await peer.ledger.transaction(
            [("UPDATE outgoing SET state = 'finishing' WHERE id = ?", (row["id"],)) for row in rows]
        )
        await peer.outbox.removeMany([row["digest"] for row in rows])
        found = peer.mailStore.findAllByMeta("Outbox", "outgoing", [row["id"] for row in rows])
        copies = [record.uid for records in found.values() for record in records]
        if copies:
            await peer.mailStore.expunge("Outbox", copies)
        await peer.ledger.transaction(
            [("UPDATE outgoing SET state = 'finished' WHERE id = ?", (row["id"],)) for row in rows]
        )
        self.log.info("{n} messages fetched by all their recipients: removed from the outbox", n=len(rows))

    async def cancel(self, messageId: str) -> None:
        """
        Cancel a message: delete its pending notifications and ciphertext
        (the paper's cancellation, by deleting it from C{Outbox}).  A notice
        that also told of other messages is withdrawn as a whole and those
        messages are announced again without this one.
        """
        peer = self._peer
        rows = await peer.ledger.query("SELECT * FROM outgoing WHERE id = ?", messageId)
        if not rows or rows[0]["state"] in ("finishing", "finished", "cancelled"):
            return
        notices = await peer.ledger.query(
            "SELECT n.* FROM notices n WHERE n.state = 'live' AND n.id IN"
            " (SELECT notice FROM deliveries WHERE outgoing = ? AND state = 'notified')",
            messageId,
        )
        for notice in notices:
            try:
                await peer.dht.delete(Address.parse(notice["recipient"]).sendKey, notice["value"], notice["password"])
            except NotFound:
                pass
        statements = [
            (
                "UPDATE deliveries SET state = 'cancelled' WHERE outgoing = ? AND state IN ('pending', 'notified')",
                (messageId,),
            ),
            ("UPDATE outgoing SET state = 'cancelled' WHERE id = ?", (messageId,)),
        ]
        for notice in notices:
            statements += [
                (
                    "UPDATE deliveries SET state = 'pending', notice = NULL WHERE notice = ? AND state = 'notified'",
                    (notice["id"],),
                ),
            ]
        await peer.ledger.transaction(statements)
        await self.notices.retire(notices)
        if rows[0]["digest"]:
            await peer.outbox.remove(rows[0]["digest"])
        self.log.info("cancelled {id}", id=messageId)
        if notices:
            self.notices.notifyPending()
        await self.notices.refreshNotifications()

    async def outboxExpunged(self, records) -> None:
        """
        The Outbox hook: deleting a message there cancels it (unless it is
        expunged because every recipient is done with it).
        """
        ids = [record.meta["outgoing"] for record in records if record.meta.get("outgoing")]
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        live = await self._peer.ledger.query(
            f"SELECT id FROM outgoing WHERE id IN ({marks}) AND state NOT IN ('finishing', 'finished', 'cancelled')",
            *ids,
        )
        for row in live:
            await self.cancel(row["id"])

    async def round(self) -> None:
        """
        One periodic round: resume unfinished sends, read receive
        notifications, expire deliveries whose notification expired.
        """
        peer = self._peer
        for row in await peer.ledger.query("SELECT id FROM outgoing WHERE state IN ('spooled', 'encrypted')"):
            self.process(row["id"])
        await self.notices.abandonUnfinished()
        await self.notices.notifyPending()
        for value in await peer.dht.get(self.address.receiveKey):
            await self.handleReceipt(value)
        await peer.ledger.query(
            "UPDATE deliveries SET state = 'expired' WHERE state IN ('pending', 'notified')"
            " AND outgoing IN (SELECT id FROM outgoing WHERE created < ?)",
            self._peer.clock.seconds() - NOTIFICATION_TTL,
        )
        # Every recipient done or expired, or a crash cut the clean-up short.
        unfinished = await peer.ledger.query(
            "SELECT id FROM outgoing WHERE state IN ('sent', 'finishing') AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.outgoing = outgoing.id AND d.state IN ('pending', 'notified'))"
        )
        await self.finishIfDone(*[row["id"] for row in unfinished])
        await self.notices.refreshNotifications()
        now = peer.clock.seconds()
        if now - self._lastKeyPrune >= 86400:
            self._lastKeyPrune = now
            forgotten = await peer.keyring.prune(now - KEY_RETENTION)
            if forgotten:
                self.log.info("forgot the keys of {n} peers unseen for long", n=len(forgotten))


def _spooledWhole(row) -> bool:
    """
    Whether the spool file of the ledger's C{row} is there, with the size
    and CRC-32 recorded for it (blocking); a torn one is removed.
    """
    path, size = row["spool"], row["spool_size"]
    try:
        if size is None:  # recorded by an older p2pmta, which flushed first
            open(path, "rb").close()
            return True
        whole = sizeAndCrc(path) == (size, row["spool_crc"])
    except FileNotFoundError:
        return False
    if not whole:
        removeIfThere(path)
    return whole


def _linkOrCopy(source: str, destination: str) -> bool:
    """@return: whether C{destination} is a link to C{source} (not a copy)."""
    removeIfThere(destination)  # left by a crash: perhaps half copied
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
        return False
    return True

