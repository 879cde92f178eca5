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
import io
import os
import time
import uuid

from collections import OrderedDict

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.fileutil import removeIfThere
from p2pmta.errors import (
    BodyUnavailable,
    CryptoError,
    DecryptionFailed,
    FetchError,
    P2PMTAError,
    UnknownPeer,
)
from p2pmta.groups import UnknownGroup
from p2pmta.batch import MAX_PULL_BATCH, BatchReader
from p2pmta.httpclient import fetchBytes, fetchInto, fetchIntoFile
from p2pmta.logs import logFailure
from p2pmta.rounds import Coalescing
from p2pmta.web import MAX_DOWNLOADS_PER_CLIENT
from p2pmta.notification import (
    MAX_BATCH,
    BadNotification,
    Doorbell,
    ReceiveNotification,
    decodeBatch,
    splitHeaders,
    unwrapSigned,
)

#: The largest doorbell (a value under C{ns:<self>}) p2pmta decrypts.
MAX_DOORBELL_SIZE = 4096

#: The most plaintext a notice may hold (it is compressed).
MAX_NOTIFICATION_PLAINTEXT = 2 * 1024 * 1024

#: How many bodies are pulled at once (a client fetching many messages):
#: as many as an outbox serves one client at once, more would get 429.
PULL_CONCURRENCY = MAX_DOWNLOADS_PER_CLIENT

#: Ciphertexts up to this size are pulled into memory (at most
#: C{PULL_CONCURRENCY} at once, 16 MiB), not into a file: a 1 MB attachment
#: is then written once, as the plaintext, not also as the ciphertext.
IN_MEMORY_PULL = 2 * 1024 * 1024

#: Ciphertexts up to this size are pulled in batches (see L{Receiver.fetchBody})
#: of up to L{MAX_PULL_BATCH} ciphertexts and L{BATCH_BYTES} bytes.
BATCH_ITEM = 256 * 1024
BATCH_BYTES = 4 * 1024 * 1024

#: Ciphertexts up to this size pulled alone, with the session key their
#: notice gave, are decrypted on the reactor thread (some 0.1 ms for 16
#: KiB); those of a batch go to a thread together (see L{_BatchOpener}).
INLINE_DECRYPTION = 64 * 1024

#: How many notices are remembered in memory as handled, so that values
#: seen again (every poll, and floods) cost no ledger look-up.
_KNOWN_NOTICES = 100_000


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

    #: How long receipts wait to be sent together: one DHT value for all
    #: the messages a user reads or deletes in that time.
    receiptDelay = 1.0

    def __init__(self, peer) -> None:
        self._peer = peer
        self._inFlight: set = set()
        self._known: OrderedDict = OrderedDict()  # notices already handled
        self._filing = DeferredLock()  # see _fileNew
        self._receipts = Coalescing(
            peer.reactor, self.receiptDelay, self._postReceipts, "posting receive notifications failed; will retry",
            peer.track,
        )
        self.pullDirectory = os.path.join(peer.dataDir.path, "pulls")
        self._pulls = DeferredSemaphore(PULL_CONCURRENCY)
        self._batchQueue: dict[str, list] = {}  # sender -> [(row, Deferred)] to pull in batches
        self._batchScheduled = False
        self._pullDirectoryMade = False
        self._stored: list = []  # incoming hashes of bodies stored, to record
        self._wanted: dict[str, list] = {}  # incoming hashes to look up -> waiters
        self._lookUpScheduled = False

    @property
    def address(self) -> Address:
        return self._peer.config.address

    def _remember(self, key: str) -> None:
        self._known[key] = None
        while len(self._known) > _KNOWN_NOTICES:
            self._known.popitem(last=False)

    # Step 6-7: notifications

    async def handleNotification(self, raw: bytes) -> None:
        """
        Act on one value found under C{ns:<self>}: show the messages it
        tells of in INBOX if it is a genuine notification not seen before;
        drop and log it otherwise.
        """
        peer = self._peer
        key = hashlib.sha256(raw).hexdigest()
        if key in self._inFlight or key in self._known:
            return
        self._inFlight.add(key)
        try:
            if await peer.ledger.query("SELECT hash FROM received_notices WHERE hash = ?", key):
                self._remember(key)
                return
            try:
                password, batch, fingerprint = await self._open(raw)
            except (BadNotification, DecryptionFailed) as e:
                self.log.warn("dropped a notification that is not genuine: {e}", e=e)
                await peer.ledger.query(
                    "INSERT OR IGNORE INTO received_notices (hash, state, received, reason) VALUES (?, 'bad', ?, ?)",
                    key,
                    self._peer.clock.seconds(),
                    str(e)[:200],
                )
                self._remember(key)
                return
            except (UnknownPeer, FetchError, BodyUnavailable, CryptoError) as e:
                # Perhaps the sender is away: the next poll tries again.
                self.log.info("cannot check a notification yet: {e}", e=e)
                return
            await self._record(key, raw, password, batch, fingerprint)
            self._remember(key)
            await self._fileNew(key)
        finally:
            self._inFlight.discard(key)

    async def _open(self, raw: bytes) -> tuple[bytes, tuple, str]:
        """
        Open a doorbell: check it, fetch the notice it announces from the
        sender's outbox (or its group's), check and decode that.

        @return: the notice's password, its messages and the sender's key
            fingerprint.
        @raise BadNotification: if the doorbell or its notice is not
            genuine.
        @raise FetchError: if the notice cannot be had now.
        """
        peer = self._peer
        if len(raw) > MAX_DOORBELL_SIZE:
            raise BadNotification("too large")
        body, signature = unwrapSigned(await peer.keyring.decrypt(raw, MAX_DOORBELL_SIZE))
        bell = Doorbell.decode(body)
        await self._verify(body, signature, bell.sender)
        sealed = await self._fromSenderOrGroup(bell.sender, bell.notice, lambda d: self._fetchNotice(d, bell))
        try:
            wrapped = await peer.keyring.decrypt(sealed, MAX_NOTIFICATION_PLAINTEXT)
        except DecryptionFailed as e:
            raise BadNotification(f"the notice of {bell.sender}: {e}") from None
        body, signature = unwrapSigned(wrapped)
        password, batch = decodeBatch(body)
        if batch[0].sender != bell.sender:
            raise BadNotification(f"a notice of {batch[0].sender} announced by {bell.sender}")
        if batch[0].recipient != self.address:
            raise BadNotification(f"addressed to {batch[0].recipient}")
        return password, batch, await self._verify(body, signature, bell.sender)

    async def _verify(self, body: bytes, signature: bytes, sender: Address) -> str:
        """@return: the fingerprint of C{sender}'s key, which signed C{body}."""
        await self._knowKeyOf(sender)
        try:
            return await self._peer.keyring.verify(body, signature, str(sender))
        except CryptoError as e:
            raise BadNotification(f"signature of {sender}: {e}") from None

    async def _fetchNotice(self, descriptor, bell) -> bytes:
        peer = self._peer
        url = descriptor.link("outbox/" + bell.notice)
        sealed = await fetchBytes(peer.agent, url, bell.size, peer.reactor)
        if len(sealed) != bell.size or hashlib.sha256(sealed).hexdigest() != bell.notice:
            raise BodyUnavailable(f"{url} served bytes that do not match the doorbell")
        return sealed

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

    async def _record(self, key: str, raw: bytes, password: bytes, batch, fingerprint: str) -> None:
        """
        Record a genuine notice and its messages: C{new} ones (to be shown),
        and C{duplicate}s of messages already told of (a sender that resumed
        after a crash, or re-announced after a cancellation).
        """
        peer = self._peer
        sender = str(batch[0].sender)
        now = self._peer.clock.seconds()
        statements = [
            (
                "INSERT OR IGNORE INTO received_notices (hash, state, received, sender, password, raw, reason)"
                " VALUES (?, 'open', ?, ?, ?, ?, ?)",
                (key, now, sender, password, raw, fingerprint),
            )
        ]
        marks = ",".join("?" * len(batch))
        known = {
            row["digest"]
            for row in await peer.ledger.query(
                f"SELECT digest FROM incoming WHERE sender = ? AND digest IN ({marks})",
                sender,
                *[n.digest for n in batch],
            )
        }
        for index, n in enumerate(batch):
            statements.append(
                (
                    "INSERT OR IGNORE INTO incoming (hash, state, received, sender, digest, password,"
                    " ciphertext_size, size, headers, reason, notice, session_key, sent)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"{key}:{index}",
                        "duplicate" if n.digest in known else "new",
                        now,
                        sender,
                        n.digest,
                        n.password,
                        n.ciphertextSize,
                        n.size,
                        n.headers,
                        fingerprint,
                        key,
                        n.sessionKey,
                        n.sent,
                    ),
                )
            )
        await peer.ledger.transaction(statements)

    async def _fileNew(self, notice: str | None = None) -> None:
        """
        Show the messages recorded as C{new} in INBOX (of one notice, or
        all: after a crash between recording and filing).
        """
        # One filing at a time: a poll round's (all) and a notice's own
        # would both find the same rows not yet in INBOX, and show them
        # twice.
        await self._filing.run(lambda: Deferred.fromCoroutine(self._file(notice)))
        if notice is not None:
            await self._closeNotices([notice])

    async def _file(self, notice: str | None) -> None:
        peer = self._peer
        if notice is None:
            rows = await peer.ledger.query("SELECT * FROM incoming WHERE state = 'new'")
        else:
            rows = await peer.ledger.query("SELECT * FROM incoming WHERE notice = ? AND state = 'new'", notice)
        filed = peer.mailStore.findAllByMeta("INBOX", "incoming", [row["hash"] for row in rows])
        missing = [row for row in rows if row["hash"] not in filed]
        messages = []
        for row in missing:
            extra = authenticationResults(self.address, Address.parse(row["sender"]), row["reason"])
            messages.append(
                {
                    "headers": extra + row["headers"],
                    "size": len(extra) + row["size"],
                    "meta": {"incoming": row["hash"], "sender": row["sender"], "digest": row["digest"]},
                    "date": row["sent"],
                }
            )
        await peer.mailStore.deliverMany("INBOX", messages)
        if rows:
            await peer.ledger.transaction(
                [("UPDATE incoming SET state = 'shown' WHERE hash = ? AND state = 'new'", (r["hash"],)) for r in rows]
            )
            self.log.info(
                "{n} new messages from {sender} (not pulled)", n=len(rows), sender=rows[0]["sender"]
            )

    # Step 9: pull on open

    def fetchBody(self, mailbox: str, record) -> Deferred:
        """
        The mail store's C{bodyFetcher}: pull, check, decrypt and return the
        complete message (see L{_openPulled}).

        Small ciphertexts asked for in the same turn of the reactor (a FETCH
        of many messages) are pulled from each sender in batches, one
        request for many (see L{p2pmta.webtree.Batch}); what a batch does not
        bring is pulled alone, from the sender or else its group.
        """
        key = record.meta.get("incoming")
        found = self._incomingRow(key) if key else succeed(None)
        return found.addCallback(self._pullRow)

    def _pullRow(self, row) -> Deferred:
        if row is not None and row["ciphertext_size"] <= BATCH_ITEM:
            d: Deferred = Deferred()
            self._batchQueue.setdefault(row["sender"], []).append((row, d))
            if not self._batchScheduled:
                self._batchScheduled = True
                self._peer.reactor.callLater(0, self._sendBatches)
            return d
        return self._pullAlone(row)

    def _pullAlone(self, row) -> Deferred:
        return self._pulls.run(lambda: Deferred.fromCoroutine(self._fetchBody(row)))

    def _sendBatches(self) -> None:
        queue, self._batchQueue = self._batchQueue, {}
        self._batchScheduled = False
        for items in queue.values():
            batch: list = []
            size = 0
            for row, d in items:
                if batch and (len(batch) == MAX_PULL_BATCH or size + row["ciphertext_size"] > BATCH_BYTES):
                    self._sendBatch(batch)
                    batch, size = [], 0
                batch.append((row, d))
                size += row["ciphertext_size"]
            self._sendBatch(batch)

    def _sendBatch(self, items: list) -> None:
        if len(items) == 1:
            row, d = items[0]
            self._pullAlone(row).chainDeferred(d)
            return
        self._pulls.run(lambda: Deferred.fromCoroutine(self._pullBatch(items))).addErrback(
            logFailure(self.log, "a batch pull failed")
        )

    async def _pullBatch(self, items: list) -> None:
        """
        Pull C{items} (C{(row, Deferred)}, all from one sender) in one
        request to the sender's outbox.  Each Deferred fires once its
        ciphertext has arrived and been opened: the ciphertexts arrived so
        far are hashed and opened by one thread call (see L{_BatchOpener})
        while the reactor reads on.  Those the answer does not bring whole
        (not held there, a bad answer, the sender away), or brings wrong,
        are then pulled alone, without holding this batch's place.
        """
        peer = self._peer
        started = time.monotonic()
        sender = Address.parse(items[0][0]["sender"])
        waiting: dict = {}
        alone = []
        for row, d in items:
            if row["digest"] in waiting:
                alone.append((row, d))
            else:
                waiting[row["digest"]] = (row, d)
        url = None
        opener = _BatchOpener(self, sender)
        arrivals: list = []

        def arrived(digest: str, ciphertext: bytes) -> None:
            row, d = waiting.pop(digest)
            arrivals.append((digest, len(ciphertext)))
            opener.open(row, d, ciphertext, url)

        try:
            descriptor = await peer.directory.lookup(sender)
            url = descriptor.link("outbox/batch")
            reader = BatchReader({digest: row["ciphertext_size"] for digest, (row, _) in waiting.items()}, arrived)
            query = "?" + "&".join("d=" + digest for digest in waiting)
            await fetchInto(peer.agent, url + query, reader.write, reader.maxSize, peer.reactor)
            reader.end()
        except (P2PMTAError, OSError) as e:
            self.log.info("batch pull from {sender} fell short: {e}", sender=str(sender), e=e)
        finally:
            if arrivals:
                # One line for the batch: a line per message costs about as
                # much as opening it.
                self.log.info(
                    "pulled {n} ciphertexts from {url} in one request: {size} bytes in {seconds:.3f}s ({digests})",
                    n=len(arrivals),
                    url=url,
                    size=sum(size for _, size in arrivals),
                    seconds=time.monotonic() - started,
                    digests=" ".join(digest for digest, _ in arrivals),
                )
            for row, d in alone + list(waiting.values()):
                self._pullAlone(row).chainDeferred(d)

    def _openBatched(self, jobs: list) -> list:
        """
        Check and open the ciphertexts of a batch C{jobs} (C{(row, extra,
        ciphertext)}; blocking, see L{_BatchOpener}).

        @return: for each, L{None} if its bytes are not the ones notified,
            else the message or the L{Failure} of opening it.
        """
        return [
            self._openedOrFailure(ciphertext, row, extra)
            if hashlib.sha256(ciphertext).hexdigest() == row["digest"]
            else None
            for row, extra, ciphertext in jobs
        ]

    def _openedOrFailure(self, source, row, extra: bytes, base: str = ""):
        """
        L{_openPulled} on a ciphertext whose hash was found to be the
        notified one (blocking).

        @return: the message, or the L{Failure} of opening it.
        """
        try:
            return self._openPulled(source, row, base, extra)
        except Exception:
            return Failure()

    def _incomingRow(self, key: str) -> Deferred:
        """
        The ledger row of the incoming message C{key}, or L{None}: the
        look-ups asked for in one turn of the reactor (a FETCH of many
        messages) share one query.
        """
        d: Deferred = Deferred()
        self._wanted.setdefault(key, []).append(d)
        if not self._lookUpScheduled:
            self._lookUpScheduled = True
            self._peer.reactor.callLater(0, self._lookUpWanted)
        return d

    def _lookUpWanted(self) -> None:
        wanted, self._wanted = self._wanted, {}
        self._lookUpScheduled = False
        keys = list(wanted)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            d = self._peer.ledger.query(f"SELECT * FROM incoming WHERE hash IN ({marks})", *chunk)

            def found(rows, chunk=chunk) -> None:
                byKey = {row["hash"]: row for row in rows}
                for key in chunk:
                    for waiter in wanted[key]:
                        waiter.callback(byKey.get(key))

            def failed(failure, chunk=chunk) -> None:
                for key in chunk:
                    for waiter in wanted[key]:
                        waiter.errback(failure)

            d.addCallbacks(found, failed)

    async def _fetchBody(self, row):
        peer = self._peer
        if row is None:
            raise BodyUnavailable("no notification is known for this message")
        sender = Address.parse(row["sender"])
        if not self._pullDirectoryMade:
            await peer.inThreads(os.makedirs, self.pullDirectory, 0o700, True)
            self._pullDirectoryMade = True
        base = os.path.join(self.pullDirectory, uuid.uuid4().hex)
        try:
            message = await self._pull(row, sender, base)
        except (P2PMTAError, OSError) as e:
            await peer.inThreads(lambda: [removeIfThere(base + suffix) for suffix in (".gpg", ".eml")])
            raise self._unavailable(row, sender, e) from None
        # The receipt waits until the mail store holds the body (bodyStored):
        # on a full disk the sender must keep its copy.
        return message

    def _unavailable(self, row, sender: Address, e: Exception) -> BodyUnavailable:
        """Log why C{row}'s body could not be had: L{BodyUnavailable} to raise."""
        self.log.warn("cannot pull {digest} from {sender}: {e}", digest=row["digest"], sender=str(sender), e=e)
        return e if isinstance(e, BodyUnavailable) else BodyUnavailable(str(e))

    def bodyStored(self, mailbox: str, record) -> None:
        """
        The mail store's C{attachedHook}: a pulled body is safely stored, so
        its sender may be told we are done with it.
        """
        key = record.meta.get("incoming")
        if mailbox != "INBOX" or not key:
            return
        # The mail store stores bodies in groups: one ledger transaction
        # records a group, on the next turn of the reactor.
        self._stored.append(key)
        if len(self._stored) == 1:
            self._peer.reactor.callLater(0, self._recordStored)

    def _recordStored(self) -> None:
        keys, self._stored = self._stored, []
        self._peer.track(Deferred.fromCoroutine(self._doneWith(keys, "pulled"))).addErrback(
            logFailure(self.log, "recording a pulled body failed; the next poll retries")
        )

    async def _pull(self, row, sender: Address, base: str):
        peer = self._peer
        started = time.monotonic()
        extra = authenticationResults(self.address, sender, row["reason"])
        if row["ciphertext_size"] <= IN_MEMORY_PULL:
            # No ciphertext file: its chunks as they came, hashed, decrypted
            # and checked by one thread call, never joined.
            opened: list = []

            async def attempt(descriptor) -> str:
                url, opened[:] = await self._downloadAndOpen(descriptor, row, extra)
                return url

            url = await self._fromSenderOrGroup(sender, row["digest"], attempt)
            return self._logOpened(opened[0], row, url, started)
        f = await peer.inThreads(open, base + ".gpg", "wb")
        try:

            async def attempt(descriptor) -> str:
                await peer.inThreads(_rewind, f)
                return await self._download(descriptor, row, f)

            url = await self._fromSenderOrGroup(sender, row["digest"], attempt)
        finally:
            await peer.inThreads(f.close)
        message = await peer.keyring.whileShared(self._openedOrFailure, base + ".gpg", row, extra, base)
        return self._logOpened(message, row, url, started)

    def _logOpened(self, message, row, url: str, started: float):
        """
        Log the message pulled from C{url} and opened (or the L{Failure} of
        opening it, raised here).
        """
        if isinstance(message, Failure):
            if message.check(DecryptionFailed):
                self.log.info("refused a message: {reason}", reason=message.getErrorMessage())
            message.raiseException()
        self.log.info(
            "pulled {digest} from {url}: {size} bytes in {seconds:.3f}s",
            digest=row["digest"],
            url=url,
            size=row["size"],
            seconds=time.monotonic() - started,
        )
        return message

    def _openPulled(self, source, row, base: str, extra: bytes):
        """
        Decrypt a pulled ciphertext (L{bytes} or a stream in memory, or the
        path of its file, which goes) after the field C{extra}, and check
        it against its notification (blocking; see L{Keyring.whileShared}).
        Only for a ciphertext whose SHA-256 was found to be the notified
        one: it is decrypted as C{authenticated} (see L{p2pmta.openpgp.decrypt}).

        @return: the message: L{bytes} for a ciphertext pulled into memory,
            else the path of the file C{base}.eml it was written to.
        """
        notified = row["headers"]
        inMemory = not isinstance(source, str)
        path = base + ".eml"
        try:
            if inMemory:
                out = io.BytesIO()
            else:
                out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            with out:
                out.write(extra)
                sink = _Beginning(out, len(notified))
                self._peer.keyring.decryptInto(source, sink, row["size"], row["session_key"] or None, authenticated=True)
                message = out.getvalue() if inMemory else path
            if not inMemory:
                os.remove(source)
            if sink.size > len(notified):
                # The notified section ends at the message's first blank line.
                matches = sink.beginning == notified
            else:
                # A message without a body: compare as the sender split it.
                matches = splitHeaders(bytes(sink.beginning))[0] == notified
            if sink.size != row["size"] or not matches:
                raise BodyUnavailable("the message does not match its notification")
        except BaseException:
            if not inMemory:
                removeIfThere(path)
            raise
        return message

    async def _fromSenderOrGroup(self, sender: Address, digest: str, attempt):
        """
        C{await attempt(descriptor)} with the descriptor of C{sender}, and
        if its outbox fails us, of the other members of its group, which
        replicate its outbox (paper, section 4.5), until one succeeds.

        @param digest: what is fetched, for the log.
        @return: what the first success returns.
        """
        peer = self._peer
        try:
            return await peer.directory.withPeer(sender, attempt)
        except (FetchError, UnknownPeer, BodyUnavailable) as e:
            why = e
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
                return await peer.directory.withPeer(member, attempt)
            except (FetchError, UnknownPeer, BodyUnavailable) as e:
                self.log.info("group member {member} cannot serve {digest}: {e}", member=str(member), digest=digest, e=e)
        raise why

    async def _download(self, descriptor, row, f) -> str:
        """
        Download the ciphertext into the file C{f} and check its hash, both
        in threads (see L{fetchIntoFile}).

        @return: the URL it came from.
        """
        peer = self._peer
        url = descriptor.link("outbox/" + row["digest"])
        digest = await fetchIntoFile(peer.agent, url, f, row["ciphertext_size"], peer.reactor, peer.inThreads)
        _checkDigest(url, digest, row)
        return url

    async def _downloadAndOpen(self, descriptor, row, extra: bytes) -> tuple:
        """
        Download the ciphertext into memory, a chunk at a time as it comes,
        check its hash and open it (see L{_checkedAndOpened}): a large one
        in one thread call, so that the reactor only moves its bytes
        (hashing 1 MB costs about a millisecond, decrypting as much again).

        @return: the URL it came from, and a list of the message or of the
            L{Failure} of opening it.
        @raise BodyUnavailable: if the bytes are not the ones notified
            (another member of the sender's group may have them).
        """
        peer = self._peer
        url = descriptor.link("outbox/" + row["digest"])
        chunks: list = []
        await fetchInto(peer.agent, url, chunks.append, row["ciphertext_size"], peer.reactor)
        if row["session_key"] and row["ciphertext_size"] <= INLINE_DECRYPTION:
            # The notice's session key: AES over a few KiB, no key of the
            # keyring; quicker here than a thread's round trip.
            return url, self._checkedAndOpened(url, chunks, row, extra)
        return url, await peer.keyring.whileShared(self._checkedAndOpened, url, chunks, row, extra)

    def _checkedAndOpened(self, url: str, chunks: list, row, extra: bytes):
        """
        Check that the ciphertext C{chunks} pulled from C{url} is the one
        notified, then decrypt and check it (see L{_openPulled}; blocking).

        @return: a list of the message, or of the L{Failure} of opening it
            (which a Deferred firing with it would take for its own): only
            a ciphertext that is not the one notified is worth pulling
            again from elsewhere.
        @raise BodyUnavailable: for that one.
        """
        _checkDigest(url, _sha256(chunks), row)
        return [self._openedOrFailure(_Chunks(chunks), row, extra)]

    # Step 10: receive notifications

    async def inboxExpunged(self, records) -> None:
        """The INBOX hook: a message expunged unread is rejected."""
        await self._doneWith([record.meta["incoming"] for record in records if record.meta.get("incoming")], "rejected")

    async def _doneWith(self, keys: list, state: str) -> None:
        """
        Record that we are done with the messages C{keys}, not yet done
        with: C{state} is C{pulled} or C{rejected}; then receipt them soon.
        """
        if not keys:
            return
        await self._peer.ledger.transaction(
            [("UPDATE incoming SET state = ? WHERE hash = ? AND state IN ('new', 'shown')", (state, key)) for key in keys]
        )
        self.sendReceipts()

    def sendReceipts(self) -> Deferred:
        """
        Soon tell the senders of every message pulled or rejected that we
        are done with it: one receive notification per sender for all of
        them (see L{Coalescing}).
        """
        return self._receipts()

    async def _postReceipts(self) -> None:
        peer = self._peer
        rows = await peer.ledger.query(
            "SELECT hash, sender, digest, password, notice FROM incoming WHERE state IN ('pulled', 'rejected')"
            " ORDER BY received LIMIT 10000"
        )
        bySender: dict[str, list] = {}
        for row in rows:
            bySender.setdefault(row["sender"], []).append(row)
        for name, items in bySender.items():
            sender = Address.parse(name)
            for start in range(0, len(items), MAX_BATCH):
                chunk = items[start : start + MAX_BATCH]
                receipt = ReceiveNotification.make(self.address, [(r["password"], r["digest"]) for r in chunk])
                try:
                    await peer.dht.put(sender.receiveKey, receipt.encode(), chunk[0]["password"], NOTIFICATION_TTL)
                except P2PMTAError as e:
                    self.log.warn("cannot tell {sender} yet: {e}", sender=name, e=e)
                    break
                await peer.ledger.transaction(
                    [("UPDATE incoming SET state = 'receipted' WHERE hash = ?", (r["hash"],)) for r in chunk]
                )
                self.log.info("told {sender} we are done with {n} messages", sender=name, n=len(chunk))
                await self._closeNotices({r["notice"] for r in chunk if r["notice"]})

    async def _closeNotices(self, notices) -> None:
        """
        Delete the notices (send notifications) all of whose messages are
        done with, proving their password: group members stop re-publishing
        them.
        """
        peer = self._peer
        for notice in notices:
            open_ = await peer.ledger.query(
                "SELECT COUNT(*) AS n FROM incoming WHERE notice = ? AND state NOT IN ('receipted', 'duplicate')",
                notice,
            )
            if open_[0]["n"]:
                continue
            rows = await peer.ledger.query(
                "SELECT raw, password FROM received_notices WHERE hash = ? AND state = 'open'", notice
            )
            if not rows:
                continue
            try:
                # No look-up first: reading our key costs all its values.
                await peer.dht.retract(self.address.sendKey, rows[0]["raw"], rows[0]["password"], NOTIFICATION_TTL)
            except P2PMTAError as e:
                self.log.debug("send notification not deleted: {e}", e=e)
            await peer.ledger.query(
                "UPDATE received_notices SET state = 'done', raw = NULL WHERE hash = ?", notice
            )

    async def round(self) -> None:
        """
        One periodic poll: new notifications, messages not yet shown,
        receipts not yet posted.
        """
        peer = self._peer
        for raw in await peer.dht.get(self.address.sendKey):
            await self.handleNotification(raw)
        await self._fileNew()
        # Stored, but a crash came before it was recorded as pulled.
        held = {r.meta.get("incoming") for r in peer.mailStore.messages("INBOX") if r.held}
        stored = [
            row["hash"]
            for row in await peer.ledger.query("SELECT hash FROM incoming WHERE state IN ('new', 'shown')")
            if row["hash"] in held
        ]
        await self._doneWith(stored, "pulled")
        await self._postReceipts()
        open_ = await peer.ledger.query("SELECT hash FROM received_notices WHERE state = 'open'")
        await self._closeNotices([row["hash"] for row in open_])
        cutoff = self._peer.clock.seconds() - NOTIFICATION_TTL - 86400
        await peer.ledger.query(
            "DELETE FROM incoming WHERE state IN ('bad', 'receipted', 'duplicate') AND received < ?", cutoff
        )
        await peer.ledger.query("DELETE FROM received_notices WHERE state IN ('bad', 'done') AND received < ?", cutoff)


def _rewind(f) -> None:
    """Empty the file C{f} for another try (blocking)."""
    f.seek(0)
    f.truncate()


def _sha256(chunks: list) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _checkDigest(url: str, digest: str, row) -> None:
    if digest != row["digest"]:
        raise BodyUnavailable(f"{url} served bytes that do not match the notified hash")


class _BatchOpener:
    """
    Opens the ciphertexts of one batch pull as they arrive: those arrived
    while a thread call runs go together in the next, so that one thread
    round trip serves many, and the reactor, which would otherwise spend a
    third of a batch's time decrypting, reads and answers meanwhile.
    """

    def __init__(self, receiver: Receiver, sender: Address) -> None:
        self._receiver = receiver
        self._sender = sender
        self._queued: list = []  # (row, extra, ciphertext, url, Deferred)
        self._running = False

    def open(self, row, d: Deferred, ciphertext: bytes, url: str) -> None:
        """Fire C{d} with the message C{ciphertext} (of C{row}, pulled from C{url}) opens to."""
        extra = authenticationResults(self._receiver.address, self._sender, row["reason"])
        self._queued.append((row, extra, ciphertext, url, d))
        if not self._running:
            self._next()

    def _next(self) -> None:
        jobs, self._queued = self._queued, []
        if not jobs:
            self._running = False
            return
        self._running = True
        receiver = self._receiver
        d = receiver._peer.keyring.whileShared(receiver._openBatched, [job[:3] for job in jobs])
        d.addBoth(self._opened, jobs)

    def _opened(self, outcomes, jobs: list) -> None:
        receiver, sender = self._receiver, self._sender
        if isinstance(outcomes, Failure):
            outcomes = [outcomes] * len(jobs)
        try:
            for (row, _, _, url, d), outcome in zip(jobs, outcomes):
                if outcome is None:
                    receiver.log.warn("{url} served bytes that do not match the notified hash", url=url)
                    receiver._pullAlone(row).chainDeferred(d)
                elif isinstance(outcome, Failure):
                    if outcome.check(DecryptionFailed):
                        receiver.log.info("refused a message: {reason}", reason=outcome.getErrorMessage())
                    if outcome.check(P2PMTAError, OSError):
                        outcome = Failure(receiver._unavailable(row, sender, outcome.value))
                    d.errback(outcome)
                else:
                    d.callback(outcome)
        finally:
            # Whatever befell these, those queued meanwhile are opened.
            self._next()


class _Chunks:
    """
    A binary stream over a list of L{bytes}: C{read(n)} returns at most the
    rest of one of them, so that none is copied to be read.  It can go
    back to where it was (C{tell}, C{seek}), as gpg's second try needs
    (L{p2pmta.crypto.Keyring.decryptInto}).
    """

    def __init__(self, chunks: list) -> None:
        self._chunks = chunks
        self._next = 0  # the index of the chunk being read
        self._at = 0  # where in it

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return sum(len(chunk) for chunk in self._chunks[: self._next]) + self._at

    def seek(self, offset: int) -> int:
        """Go to C{offset} bytes from the beginning (or to the end)."""
        self._next, self._at = 0, max(0, offset)
        while self._next < len(self._chunks) and self._at >= len(self._chunks[self._next]):
            self._at -= len(self._chunks[self._next])
            self._next += 1
        if self._next == len(self._chunks):
            self._at = 0
        return self.tell()

    def read(self, n: int) -> bytes:
        while self._next < len(self._chunks):
            chunk = self._chunks[self._next]
            if self._at < len(chunk):
                data = chunk[self._at : self._at + n]  # the chunk itself when whole
                self._at += len(data)
                return data
            self._next, self._at = self._next + 1, 0
        return b""


class _Beginning:
    """A file's C{write} that keeps the first C{keep} bytes and counts all."""

    def __init__(self, f, keep: int) -> None:
        self._write = f.write
        self._keep = keep
        self.beginning = bytearray()
        self.size = 0

    def write(self, data) -> None:
        if len(self.beginning) < self._keep:
            self.beginning += data[: self._keep - len(self.beginning)]
        self.size += len(data)
        self._write(data)
