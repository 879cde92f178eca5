"""
Mail end to end between real peers (paper, section 4.3-4.4): real gpg, real
OpenDHT nodes, real TCP on 127.0.0.1, the stdlib's smtplib and imaplib.
"""

from __future__ import annotations

import email
import errno
import os
import smtplib
import threading
from email.message import EmailMessage
from email.policy import SMTP

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from p2pmta import fileutil, maildir, receiving
from p2pmta.address import Address
from p2pmta.dht import NOTIFICATION_TTL
from p2pmta.errors import DecryptionFailed
from p2pmta.notification import splitHeaders
from p2pmta.sealing import LANES
from p2pmta.spool import keepsEnvelopes
from p2pmta.store import sha256Hex
from tests.peers import PeerHarness, eventually, sleep, uids


def makeMessage(sender: str, recipients, subject: str, attachment: bytes = b"") -> bytes:
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Message-ID"] = f"<{os.urandom(8).hex()}@p2pmta.test>"
    message.set_content("Hello!\n\nThis is p2pmta.\n")
    if attachment:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    return message.as_bytes()


def fetchOne(client, uid: int, what: str, mailbox: str = "INBOX"):
    client.select(mailbox)
    typ, data = client.uid("FETCH", str(uid), what)
    return typ, data


def fetchBodies(client, uids: list):
    """
    UID FETCH the bodies of C{uids} in C{INBOX}, in one command.

    @return: its status and data, and the untagged FETCH responses (where
        imaplib keeps them after a NO).
    """
    client.select("INBOX")
    typ, data = client.uid("FETCH", ",".join(map(str, uids)), "(BODY[])")
    return typ, data, client.untagged_responses.pop("FETCH", [])


def stripAdded(message: bytes) -> bytes:
    """Drop the header fields that the MTAs add (Received, Authentication-Results)."""
    headers, body = splitHeaders(message)
    kept = []
    skipping = False
    for line in headers.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith((b"received:", b"authentication-results:"))
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + body


class MailFlowTests(TestCase):
    timeout = 180

    async def peers(self, *names):
        self.harness = PeerHarness(self)
        started = {}
        for name in names:
            started[name] = await self.harness.start(name)
        return started

    async def _sendReceive(self):
        await self.peers("alice", "bob")
        h = self.harness
        attachment = os.urandom(20_000)
        submitted = makeMessage("alice@demo", ["bob@demo"], "binary attachment", attachment)
        refused = await h.send("alice", ["bob@demo"], submitted)
        self.assertEqual(refused, {})
        [uid] = await self.harness.listed("bob")

        # Headers and size are there before any pull.
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(RFC822.SIZE BODY.PEEK[HEADER] FLAGS)"))
        self.assertEqual(typ, "OK")
        headers = data[0][1]
        self.assertIn(b"Subject: binary attachment", headers)
        self.assertIn(b"Authentication-Results:", headers)
        self.assertIn(self.harness.running["alice"].keyring.fingerprint.encode(), headers)
        self.assertEqual(h.access.bodyRequests(), [])
        self.assertEqual(len(h.outboxDigests("alice")), 1)

        # Opening pulls, decrypts, and gives alice's message byte for byte.
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[] RFC822.SIZE)"))
        self.assertEqual(typ, "OK")
        body = data[0][1]
        self.assertEqual(stripAdded(body), submitted.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        self.assertEqual(len(h.access.bodyRequests()), 1)
        parsed = email.message_from_bytes(body)
        parts = [p.get_payload(decode=True) for p in parsed.walk() if p.get_filename()]
        self.assertEqual(parts, [attachment])
        self.assertIn(f"RFC822.SIZE {len(body)}".encode(), data[0][0] + data[1])

        # Alice hears bob's receive notification and drops the ciphertext.
        async def emptied():
            return not h.outboxDigests("alice")

        await eventually(emptied)
        copies = await h.running["alice"].ledger.query("SELECT state FROM deliveries")
        self.assertEqual([r["state"] for r in copies], ["done"])
        # No longer re-published by the group.  The notice's file goes
        # before its row says so: wait for the row.
        async def retired():
            notices = await h.running["alice"].ledger.query("SELECT state FROM notices")
            return [r["state"] for r in notices] == ["retired"]

        await eventually(retired)
        # Sent holds alice's copy; Outbox is empty again.
        sent = await h.imap("alice", lambda c: uids(c, "Sent"))
        self.assertEqual(len(sent), 1)

        async def outboxEmpty():
            return not await h.imap("alice", lambda c: uids(c, "Outbox"))

        await eventually(outboxEmpty)
        # A second open serves the stored copy, with no new pull.
        typ, again = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(again[0][1], body)
        self.assertEqual(len(h.access.bodyRequests()), 1)

    async def _codedByteByByte(self):
        await self.peers("alice", "bob")
        h = self.harness
        attachment = os.urandom(100_000)
        submitted = makeMessage("alice@demo", ["bob@demo"], "base64 of 100 KB", attachment)
        await h.send("alice", ["bob@demo"], submitted)
        [uid] = await h.listed("bob")
        [digest] = h.outboxDigests("alice")
        ciphertext = os.path.getsize(h.running["alice"].outbox.path(digest).path)
        self.assertLess(ciphertext, 0.8 * len(submitted))
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK")
        parsed = email.message_from_bytes(data[0][1])
        self.assertEqual([p.get_payload(decode=True) for p in parsed.walk() if p.get_filename()], [attachment])

    def test_binaryAttachmentCodedByteByByte(self):
        """
        A 100 KB binary attachment (base64 of random bytes: no repeats to
        find) travels compressed all the same, Huffman only, and bob reads
        it byte for byte.
        """
        return ensureDeferred(self._codedByteByByte())

    async def _largeBody(self):
        await self.peers("alice", "bob")
        h = self.harness
        uncached = []
        write = fileutil.writeUncached
        self.patch(fileutil, "writeUncached", lambda fd, data: (uncached.append(len(data)), write(fd, data)))
        attachment = os.urandom(400_000)
        submitted = makeMessage("alice@demo", ["bob@demo"], "base64 of 400 KB", attachment)
        await h.send("alice", ["bob@demo"], submitted)
        [uid] = await h.listed("bob")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK")
        body = data[0][1]
        self.assertGreater(len(body), maildir.DATABASE_BODY)
        self.assertEqual(stripAdded(body), submitted.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        parsed = email.message_from_bytes(body)
        self.assertEqual([p.get_payload(decode=True) for p in parsed.walk() if p.get_filename()], [attachment])
        # Served from memory, written past the page cache into a file of
        # its own, which serves the next open with no new pull.
        store = h.running["bob"].mailStore
        await store.written("INBOX", [uid])
        self.assertEqual(uncached, [len(body)])
        with open(store.filePath("INBOX", uid), "rb") as f:
            self.assertEqual(f.read(), body)
        typ, again = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(again[0][1], body)
        self.assertEqual(len(h.access.bodyRequests()), 1)

    def test_largeBodyStoredPastTheCache(self):
        """
        A 400 KB attachment is pulled, given to the client whole, and
        stored in a Maildir file written past the page cache, byte for byte
        what the client got.
        """
        return ensureDeferred(self._largeBody())

    async def _flushNotBehindPool(self):
        await self.peers("alice", "bob")
        h = self.harness
        alice = h.running["alice"]
        port, config = h.port("alice", "smtp"), h.configs["alice"]

        def connect():
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            client.ehlo()
            client.login(str(config.address), config.password)
            return client

        client = await deferToThread(connect)
        try:
            first = makeMessage("alice@demo", ["bob@demo"], "first")
            self.assertEqual(await deferToThread(client.sendmail, "alice@demo", ["bob@demo"], first), {})
            # Every thread of the peer's pool taken (by the pipeline's
            # encryption of a burst, say): the next 250 does not wait.
            release = threading.Event()
            busy = [alice.inThreads(release.wait, 30) for _ in range(alice.threads.pool.max)]
            try:
                second = makeMessage("alice@demo", ["bob@demo"], "second")
                sent = deferToThread(client.sendmail, "alice@demo", ["bob@demo"], second)
                self.assertEqual(await sent.addTimeout(15, reactor), {})
            finally:
                release.set()
                await gatherResults(busy)
        finally:
            client.close()
        await h.listed("bob", 2)

    def test_flushNotBehindThePool(self):
        """
        An SMTP 250 waits for its message's flush, which has threads of its
        own: not behind whatever holds the peer's pool.
        """
        return ensureDeferred(self._flushNotBehindPool())

    def test_sendReceive(self):
        """
        bob sees alice's message with its headers before any pull; opening it
        pulls it once, byte for byte; then alice's outbox empties.
        """
        return ensureDeferred(self._sendReceive())

    async def _filedOnce(self):
        bob = (await self.peers("bob"))["bob"]
        headers = [f"From: alice@demo\r\nSubject: told {i}\r\n\r\n".encode() for i in range(3)]
        await bob.ledger.transaction(
            [
                (
                    "INSERT INTO incoming (hash, state, received, sender, digest, size, headers, reason, notice, sent)"
                    " VALUES (?, 'new', 0, 'alice@demo', ?, ?, ?, '', 'k', 0)",
                    (f"k:{i}", f"{i:064x}", len(h), h),
                )
                for i, h in enumerate(headers)
            ]
        )
        # A notice's own filing and a poll round's filing of every new
        # message, at once.
        await gatherResults([ensureDeferred(bob.receiver._fileNew("k")), ensureDeferred(bob.receiver._fileNew())])
        shown = sorted(r.meta["incoming"] for r in bob.mailStore.messages("INBOX"))
        self.assertEqual(shown, ["k:0", "k:1", "k:2"])

    def test_filedOnce(self):
        """
        Messages recorded as new are shown once, even when two filings
        (a notice's, a poll round's) run at the same time.
        """
        return ensureDeferred(self._filedOnce())

    async def fourSent(self, subject: str) -> tuple:
        """
        alice sends bob four small messages, to be pulled in one batch.

        @return: the messages, their UIDs at bob, and their ciphertexts'
            digests.
        """
        await self.peers("alice", "bob")
        h = self.harness
        sent = [makeMessage("alice@demo", ["bob@demo"], f"{subject} {n}", os.urandom(3000 + n)) for n in range(4)]
        for message in sent:
            await h.send("alice", ["bob@demo"], message)
        listed = await h.listed("bob", 4)
        digests = h.outboxDigests("alice")
        self.assertEqual(len(digests), 4)
        return sent, listed, digests

    async def partlyFetched(self, listed: list, sent: list, count: int) -> None:
        """
        One FETCH of the bodies of C{listed} at bob says NO [UNAVAILABLE],
        after C{count} of them, each one of C{sent}.
        """
        typ, data, fetched = await self.harness.imap("bob", lambda c: fetchBodies(c, listed))
        self.assertEqual(typ, "NO")
        self.assertIn(b"UNAVAILABLE", data[0])
        bodies = [stripAdded(item[1]) for item in fetched if isinstance(item, tuple)]
        self.assertEqual(len(bodies), count)
        self.assertTrue(all(body in sent for body in bodies))

    async def _batchPull(self):
        sent, listed, digests = await self.fourSent("batch")
        h = self.harness
        # One ciphertext is gone from alice's outbox (and she has no group):
        # the batch says so, that one is asked for alone, and fails alone.
        missing = digests[0]
        await h.running["alice"].outbox.remove(missing)
        pulled: list = []

        def observe(event):
            if str(event.get("log_format", "")).startswith("pulled "):
                pulled.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        await self.partlyFetched(listed, sent, 3)
        requests = h.access.bodyRequests()
        batches = [h.access.asked(line) for line in requests if "/outbox/batch?" in line]
        self.assertEqual([sorted(asked) for asked in batches], [sorted(digests)], "one request for the four")
        alone = [h.access.asked(line) for line in requests if "/outbox/batch?" not in line]
        self.assertEqual(alone, [[missing]])
        # One log line for the batch, naming the three it brought.
        [batchLine] = pulled
        self.assertEqual(batchLine["n"], 3)
        self.assertEqual(sorted(batchLine["digests"].split()), sorted(digests[1:]))
        # Asked again, the three stored are served from the store, and the
        # missing one is asked for alone again.
        typ, _, fetched = await h.imap("bob", lambda c: fetchBodies(c, listed))
        self.assertEqual(typ, "NO")
        self.assertEqual(len([item for item in fetched if isinstance(item, tuple)]), 3)
        self.assertEqual(len(h.access.bodyRequests()), len(requests) + 1)

    def test_batchPull(self):
        """
        Opening several of one sender's messages in one FETCH pulls them in
        one request; what the batch does not bring is asked for alone, and
        only that message is unavailable.
        """
        return ensureDeferred(self._batchPull())

    async def _batchOpened(self):
        sent, listed, digests = await self.fourSent("opened")
        h = self.harness
        bob = h.running["bob"]
        # One ciphertext in alice's outbox is changed: its hash is wrong.
        # Another is the one notified but does not open.
        changed, refused = digests[0], digests[1]
        path = h.running["alice"].outbox.path(changed).path
        with open(path, "rb") as f:
            original = f.read()
        with open(path, "wb") as f:
            f.write(original[:-1] + bytes([original[-1] ^ 1]))
        openPulled = bob.receiver._openPulled
        threads = []

        def opening(source, row, base, extra):
            threads.append(threading.current_thread())
            if row["digest"] == refused:
                raise DecryptionFailed("refused for the test")
            return openPulled(source, row, base, extra)

        self.patch(bob.receiver, "_openPulled", opening)

        await self.partlyFetched(listed, sent, 2)
        # The changed one is asked for again alone, and not opened; the
        # refused one is not asked for again.
        requests = h.access.bodyRequests()
        self.assertEqual([sorted(h.access.asked(line)) for line in requests], [sorted(digests), [changed]])
        self.assertEqual(len(threads), 3)
        self.assertNotIn(threading.main_thread(), threads, "opened in the reactor's thread")

    async def _batchOpenerFails(self):
        sent, listed, _ = await self.fourSent("opener fails")
        bob = self.harness.running["bob"]

        def failing(jobs):
            raise OSError(errno.EIO, "the thread call failed for the test")

        patched = self.patch(bob.receiver, "_openBatched", failing)
        await self.partlyFetched(listed, sent, 0)
        patched.restore()
        typ, data, _ = await self.harness.imap("bob", lambda c: fetchBodies(c, listed))
        self.assertEqual(typ, "OK")
        self.assertEqual(sorted(stripAdded(item[1]) for item in data if isinstance(item, tuple)), sorted(sent))

    def test_batchOpenerFails(self):
        """
        A batch's thread call that fails makes each of its messages
        unavailable, not the FETCH hang; the next FETCH opens them all.
        """
        return ensureDeferred(self._batchOpenerFails())

    def test_batchOpenedInThreads(self):
        """
        The ciphertexts of a batch are checked and opened in threads: one
        whose bytes are not the ones notified is asked for again alone; one
        that does not open fails alone, and is not asked for again.
        """
        return ensureDeferred(self._batchOpened())

    def submitInOneSession(self, name: str, recipient: str, messages: list):
        """
        Submit C{messages} to C{recipient} at peer C{name}'s SMTP server, one
        after the other in one session (in a thread), which then ends.
        """
        port, config = self.harness.port(name, "smtp"), self.harness.configs[name]

        def submitAll():
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.login(str(config.address), config.password)
                for message in messages:
                    client.sendmail(str(config.address), [recipient], message)

        return deferToThread(submitAll)

    async def _burstEnds(self):
        await self.peers("alice", "bob")
        h = self.harness
        sender = h.running["alice"].sender
        # Every notice in a burst waits for the rest of it, but only until
        # the pipeline runs dry, never this long.
        sender.notices.burst, sender.notices.burstDelay = 2, 120.0
        messages = [makeMessage("alice@demo", ["bob@demo"], f"burst {n}", os.urandom(2000)) for n in range(30)]
        await self.submitInOneSession("alice", "bob@demo", messages)
        listed = await h.listed("bob", len(messages), timeout=20)
        self.assertEqual(len(listed), len(messages))
        notices = await h.running["alice"].ledger.query("SELECT id FROM notices")
        self.assertLess(len(notices), len(messages) / 2, "the burst shared its notices")

    def test_burstEndsWithPipeline(self):
        """
        A burst of messages goes out in shared notices, the last of them as
        soon as the pipeline has none left to take.
        """
        return ensureDeferred(self._burstEnds())

    async def _burstTailInLanes(self):
        await self.peers("alice", "bob")
        h = self.harness
        peer = h.running["alice"]
        sealers, seal = peer.sealers, peer.sealers.seal
        asked: list = []  # (messages, lanes) of each batch
        release: Deferred = Deferred()

        def sealing(outbox, limit, jobs, keys, lanes=1):
            asked.append((len(jobs), lanes))
            if len(asked) == 1:
                # The burst's first batch waits for the session to end: the
                # rest of the burst comes in meanwhile, as it does when the
                # sealing falls behind.
                return release.addCallback(lambda _: seal(outbox, limit, jobs, keys, lanes=lanes))
            return seal(outbox, limit, jobs, keys, lanes=lanes)

        sealers.seal = sealing
        messages = [makeMessage("alice@demo", ["bob@demo"], f"tail {n}", os.urandom(2000 + 3000 * n)) for n in range(12)]
        await self.submitInOneSession("alice", "bob@demo", messages)

        async def closed():
            return not peer.sender._sessions

        await eventually(closed)
        release.callback(None)
        listed = await h.listed("bob", len(messages), timeout=30)
        typ, data, _ = await h.imap("bob", lambda c: fetchBodies(c, listed))
        self.assertEqual(typ, "OK")
        bodies = sorted(stripAdded(item[1]) for item in data if isinstance(item, tuple))
        self.assertEqual(bodies, sorted(messages))
        self.assertEqual(asked[0], (1, 1), "sealed one at a time while the session ran")
        lanes = max(1, min(LANES, os.cpu_count() or 1))
        self.assertEqual(sum(n for n, _ in asked[1:]), len(messages) - 1)
        self.assertEqual({used for _, used in asked[1:]}, {lanes})

    def test_burstTailSealedInLanes(self):
        """
        The messages of a burst still to seal once its session has ended
        are sealed in the sealing process's lanes, side by side, and reach
        their recipient whole; while the session ran, one at a time.
        """
        return ensureDeferred(self._burstTailInLanes())

    async def _twoRecipients(self):
        await self.peers("alice", "bob", "carol")
        h = self.harness
        message = makeMessage("alice@demo", ["bob@demo", "carol@demo"], "for two", os.urandom(5000))
        await h.send("alice", ["bob@demo", "carol@demo"], message)
        [bobUid] = await self.harness.listed("bob")
        [carolUid] = await self.harness.listed("carol")
        self.assertEqual(len(h.outboxDigests("alice")), 1)
        await h.imap("bob", lambda c: fetchOne(c, bobUid, "(BODY[])"))
        await sleep(2.5)  # more than two poll rounds
        self.assertEqual(len(h.outboxDigests("alice")), 1, "kept until carol reads it too")
        typ, data = await h.imap("carol", lambda c: fetchOne(c, carolUid, "(BODY[])"))
        self.assertEqual(stripAdded(data[0][1]), message)
        requested = {line.split('"GET ')[1].split()[0] for line in h.access.bodyRequests()}
        self.assertEqual(len(requested), 1, "both pulled the one shared ciphertext")

        async def emptied():
            return not h.outboxDigests("alice")

        await eventually(emptied)
        # The outbox also holds the notices, each gone once its messages are
        # read, maybe a moment after the ciphertext.  The outbox is seen
        # empty as soon as its files are moved among the spares; they are
        # taken as spares once emptied, a moment later.
        outbox = h.running["alice"].outbox
        spares = outbox.directory + ".spare"

        async def settled():
            return not outbox.digests() and len(outbox.spares) == len(os.listdir(spares))

        await eventually(settled)
        # Its file, emptied, waits among the outbox's spares, and the next
        # ciphertext is written into one of them.
        kept = {os.stat(os.path.join(spares, name)).st_ino for name in os.listdir(spares)}
        self.assertTrue(kept)
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "next", os.urandom(5000)))

        async def stored():
            return h.outboxDigests("alice")

        await eventually(stored)
        [digest] = h.outboxDigests("alice")
        self.assertIn(os.stat(os.path.join(outbox.directory, digest)).st_ino, kept)

    def test_twoRecipientsShareOneCiphertext(self):
        """Two recipients pull one ciphertext, which stays until both have read it."""
        return ensureDeferred(self._twoRecipients())

    async def _rejectUnread(self):
        await self.peers("alice", "bob")
        h = self.harness
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "spam", os.urandom(10_000)))
        [uid] = await self.harness.listed("bob")

        def deleteUnread(client):
            client.select("INBOX")
            client.uid("STORE", str(uid), "+FLAGS", "(\\Deleted)")
            return client.expunge()

        await h.imap("bob", deleteUnread)

        async def emptied():
            return not h.outboxDigests("alice")

        await eventually(emptied)
        self.assertEqual(h.access.bodyRequests(), [], "bob never asked for the body")
        self.assertEqual(await h.imap("bob", uids), [])

    def test_rejectUnread(self):
        """Expunging unread costs bob no body traffic and empties alice's outbox."""
        return ensureDeferred(self._rejectUnread())

    async def _cancel(self):
        await self.peers("alice", "bob")
        h = self.harness
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "oops"))
        [uid] = await self.harness.listed("bob")

        async def inOutbox():
            return await h.imap("alice", lambda c: uids(c, "Outbox"))

        [outboxUid] = await eventually(inOutbox)

        def cancel(client):
            client.select("Outbox")
            client.uid("STORE", str(outboxUid), "+FLAGS", "(\\Deleted)")
            return client.expunge()

        await h.imap("alice", cancel)

        async def emptied():
            return not h.outboxDigests("alice")

        await eventually(emptied)
        bob = h.running["bob"]
        self.assertEqual(await bob.dht.get(Address("bob", "demo").sendKey), [])
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "NO")
        self.assertIn(b"UNAVAILABLE", data[0])
        sent = await h.imap("alice", lambda c: uids(c, "Sent"))
        self.assertEqual(len(sent), 1, "the Sent copy stays")

    def test_cancelFromOutbox(self):
        """Deleting a message in Outbox cancels it: notification and ciphertext go."""
        return ensureDeferred(self._cancel())

    async def _restart(self):
        await self.peers("alice", "bob")
        h = self.harness
        alice = h.running["alice"]
        # Stop alice the instant the 250 arrives, before her pipeline runs.
        alice.sender.process = lambda messageId: None
        message = makeMessage("alice@demo", ["bob@demo"], "survives a restart")
        await h.send("alice", ["bob@demo"], message)
        await h.stop("alice")
        spool = os.listdir(os.path.join(h.root, "alice", "spool"))
        self.assertEqual(len(spool), 1, "the accepted message stays in the spool")
        await h.start("alice")
        [uid] = await self.harness.listed("bob")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(stripAdded(data[0][1]), message)
        await sleep(2.5)
        self.assertEqual(await h.imap("bob", uids), [uid], "delivered once")

    def test_restartResumes(self):
        """A message accepted just before a stop is delivered after the restart, once."""
        return ensureDeferred(self._restart())

    async def acceptedThenStopped(self, *messages: bytes):
        """
        alice takes C{messages} for bob (her pipeline held, so they stay
        spooled), then stops.

        @return: the harness.
        """
        await self.peers("alice", "bob")
        h = self.harness
        h.running["alice"].sender.process = lambda messageId: None
        for message in messages:
            await h.send("alice", ["bob@demo"], message)
        await h.stop("alice")
        return h

    async def _lostSpoolName(self):
        h = await self.acceptedThenStopped(makeMessage("alice@demo", ["bob@demo"], "name lost"))
        # A crash after the ledger's record and before the folder's flush:
        # the file's name did not last (and no 250 went out).
        spool = os.path.join(h.root, "alice", "spool")
        [name] = os.listdir(spool)
        os.remove(os.path.join(spool, name))
        await h.start("alice")
        alice = h.running["alice"]
        self.assertEqual(await alice.ledger.query("SELECT id FROM outgoing"), [])
        self.assertEqual(await alice.ledger.query("SELECT outgoing FROM deliveries"), [])
        # The next message goes as usual.
        message = makeMessage("alice@demo", ["bob@demo"], "after")
        await h.send("alice", ["bob@demo"], message)
        [uid] = await h.listed("bob")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(stripAdded(data[0][1]), message)

    async def _tornSpoolFile(self):
        kept = makeMessage("alice@demo", ["bob@demo"], "kept whole")
        h = await self.acceptedThenStopped(makeMessage("alice@demo", ["bob@demo"], "torn"), kept)
        # A crash after the ledger's record and before the file was on
        # disk: the file is there, but not as it was written (and no 250
        # went out).
        rows = await self.spooled(h)
        with open(rows[0][1], "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"X\r\n")
        await h.start("alice")
        alice = h.running["alice"]
        self.assertFalse(os.path.exists(rows[0][1]), "the torn file was kept")
        [uid] = await h.listed("bob")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(stripAdded(data[0][1]), kept)
        self.assertEqual(
            [row["id"] for row in await alice.ledger.query("SELECT id FROM outgoing")], [rows[1][0]]
        )

    async def spooled(self, h):
        """The C{(id, spool file)} of alice's messages, oldest first (she is stopped)."""
        import sqlite3

        db = sqlite3.connect(os.path.join(h.root, "alice", "p2pmta.sqlite"))
        try:
            return db.execute("SELECT id, spool FROM outgoing ORDER BY created").fetchall()
        finally:
            db.close()

    async def _lostRecords(self):
        whole = makeMessage("alice@demo", ["bob@demo"], "record lost")
        h = await self.acceptedThenStopped(makeMessage("alice@demo", ["bob@demo"], "record lost, torn"), whole)
        if not keepsEnvelopes(os.path.join(h.root, "alice", "spool")):
            raise SkipTest("this file system keeps no extended attributes")
        # A power cut took the records, committed but not flushed: the
        # spool files, flushed with their envelopes before the 250, stay.
        # One of them was torn meanwhile (it cannot have got its 250),
        # and a link to the other is left as filing it in Sent would.
        torn, kept = [path for _, path in await self.spooled(h)]
        import sqlite3

        db = sqlite3.connect(os.path.join(h.root, "alice", "p2pmta.sqlite"))
        try:
            with db:
                db.execute("DELETE FROM deliveries")
                db.execute("DELETE FROM outgoing")
        finally:
            db.close()
        with open(torn, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"X\r\n")
        os.link(kept, kept + ".Sent")
        await h.start("alice")
        alice = h.running["alice"]
        self.assertFalse(os.path.exists(torn), "the torn file was kept")
        [row] = await alice.ledger.query("SELECT spool FROM outgoing")
        self.assertEqual(row["spool"], kept)
        [uid] = await h.listed("bob")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(stripAdded(data[0][1]), whole)
        await sleep(2.5)
        self.assertEqual(await h.imap("bob", uids), [uid], "delivered once")

    async def _envelopeRefused(self):
        await self.peers("alice", "bob")
        h = self.harness
        alice = h.running["alice"]
        if not alice.sender.keepsEnvelopes:
            raise SkipTest("this file system keeps no extended attributes")
        calls = []
        transaction = alice.ledger.transaction

        def spy(statements, durable=False):
            calls.append(([sql for sql, _ in statements], durable))
            return transaction(statements, durable)

        self.patch(alice.ledger, "transaction", spy)
        first = makeMessage("alice@demo", ["bob@demo"], "envelope kept")
        await h.send("alice", ["bob@demo"], first)

        def setxattr(*args):
            raise OSError(errno.E2BIG, "Argument list too long")

        self.patch(os, "setxattr", setxattr)
        second = makeMessage("alice@demo", ["bob@demo"], "envelope refused")
        await h.send("alice", ["bob@demo"], second)
        records = [durable for sql, durable in calls if sql[0].startswith("INSERT INTO outgoing")]
        self.assertEqual(records, [False, False], "the records are committed, not flushed")
        flushed = [durable for sql, durable in calls if sql == ["UPDATE outgoing SET state = state WHERE id = ?"]]
        self.assertEqual(flushed, [True], "the second record is flushed, as its file has no envelope")
        listed = await h.listed("bob", 2)
        bodies = []
        for uid in listed:
            typ, data = await h.imap("bob", lambda c, uid=uid: fetchOne(c, uid, "(BODY[])"))
            bodies.append(stripAdded(data[0][1]))
        self.assertEqual(sorted(bodies), sorted([first, second]))

    def test_envelopeRefusedRecordFlushed(self):
        """
        The record of a message whose spool file keeps its envelope is not
        flushed before the 250; where the file system refuses a file's
        envelope, its record is.
        """
        return ensureDeferred(self._envelopeRefused())

    def test_lostRecordsMadeAgain(self):
        """
        A message whose record a power cut took (the record is committed
        but not flushed before the 250; the spool file is, with its
        envelope) is recorded again at the next start and sent, once; an
        unrecorded file that is torn, or that is a link to a message, is
        not.
        """
        return ensureDeferred(self._lostRecords())

    def test_tornSpoolFileForgotten(self):
        """
        A message recorded whose spool file a crash left torn (the file is
        flushed while it is recorded, and it got no 250) is forgotten at the
        next start and its file removed; the others go.
        """
        return ensureDeferred(self._tornSpoolFile())

    def test_recordWithoutSpoolFileForgotten(self):
        """
        A message recorded whose spool file a crash took (it got no 250)
        is forgotten at the next start, not retried for ever.
        """
        return ensureDeferred(self._lostSpoolName())

    async def _unrecordedCiphertext(self):
        await self.peers("alice", "bob")
        h = self.harness
        first = makeMessage("alice@demo", ["bob@demo"], "recorded", os.urandom(5000))
        await h.send("alice", ["bob@demo"], first)
        await h.listed("bob")
        [recorded] = h.outboxDigests("alice")
        h.running["alice"].sender.process = lambda messageId: None
        second = makeMessage("alice@demo", ["bob@demo"], "sealed again", os.urandom(5000))
        await h.send("alice", ["bob@demo"], second)
        await h.stop("alice")
        # What a crash can leave: a ciphertext stored, its record not made.
        stray = os.urandom(3000)
        with open(os.path.join(h.root, "alice", "outbox", sha256Hex(stray)), "wb") as f:
            f.write(stray)
        await h.start("alice")
        digests = h.running["alice"].outbox.digests()
        self.assertNotIn(sha256Hex(stray), digests)
        self.assertIn(recorded, digests)
        found = await h.listed("bob", 2)
        for uid, message in zip(sorted(found), (first, second)):
            typ, data = await h.imap("bob", lambda c, uid=uid: fetchOne(c, uid, "(BODY[])"))
            self.assertEqual(stripAdded(data[0][1]), message)

    def test_unrecordedCiphertextRemoved(self):
        """
        A ciphertext no record names (a crash came between storing it and
        recording it) is removed at the next start, and only that: the
        recorded one stays, and the message is sealed again.
        """
        return ensureDeferred(self._unrecordedCiphertext())

    async def _badRecipients(self):
        await self.peers("alice", "bob")
        h = self.harness
        message = makeMessage("alice@demo", ["bob@demo", "nobody@demo"], "partly")
        refused = await h.send("alice", ["bob@demo", "nobody@demo"], message)
        self.assertEqual(list(refused), ["nobody@demo"])
        self.assertEqual(refused["nobody@demo"][0], 550)
        await self.harness.listed("bob")
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            await h.send("alice", ["nobody@demo"], message)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
            await h.send("alice", ["not an address"], message)
        code = list(caught.exception.recipients.values())[0][0]
        self.assertIn(code, (501, 553))

    def test_badRecipients(self):
        """Unknown and malformed recipients are refused; the others still get it."""
        return ensureDeferred(self._badRecipients())

    def test_notificationTTL(self):
        """Notifications live a week, as the paper says."""
        self.assertEqual(NOTIFICATION_TTL, 7 * 86400)

    async def _unfinishedNotice(self):
        from twisted.internet.defer import fail

        from p2pmta.errors import DHTError

        h = PeerHarness(self)
        alice = await h.start("alice")
        await h.start("bob")
        put, failed = alice.dht.put, []

        def failOnce(key, value, password, ttl):
            if key.startswith("ns:") and not failed:
                failed.append(key)
                return fail(DHTError("the DHT is away"))
            return put(key, value, password, ttl)

        alice.dht.put = failOnce
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "rung twice"))

        async def stranded():
            return await alice.ledger.query("SELECT body FROM notices WHERE state = 'preparing'")

        [row] = await eventually(stranded)
        self.assertIn(row["body"], alice.outbox.digests(), "stored before the doorbell failed")
        await alice.getServiceNamed("mailflow").runNow()
        [uid] = await h.listed("bob")
        self.assertNotIn(row["body"], alice.outbox.digests(), "the unfinished notice was taken back")
        states = await alice.ledger.query("SELECT state FROM notices ORDER BY created")
        self.assertEqual(sorted(r["state"] for r in states), ["live", "retired"])

    def test_unfinishedNoticeTakenBack(self):
        """
        A notice whose doorbell could not be put is taken back (its file
        leaves the outbox) and its message goes in a new notice.
        """
        return ensureDeferred(self._unfinishedNotice())


class HostileInputTests(TestCase):
    """Forged, tampered and garbage input is refused and logged; nothing else is lost."""

    timeout = 180

    async def _forgedAndGarbage(self):
        from p2pmta.notification import Doorbell, SendNotification, wrapSigned

        h = PeerHarness(self)
        await h.start("alice")
        bob = await h.start("bob")
        carol = await h.start("carol")
        await carol.directory.lookup(Address("bob", "demo"))  # carol pins bob's key
        digest = "ab" * 32
        for claimed, to in (("alice@demo", "bob@demo"), ("carol@demo", "dave@demo")):
            forged = SendNotification(
                sender=Address.parse(claimed),
                recipient=Address.parse(to),
                digest=digest,
                ciphertextSize=10,
                size=10,
                headers=b"Subject: forged\r\n\r\n",
                password=os.urandom(32),
                sent=0.0,
            )
            # Carol's notices, rung by doorbells that carol signs: one
            # claims alice's mail in it, the other is addressed to dave.
            body = forged.encode()
            sealed = await carol.keyring.encrypt(wrapSigned(body, await carol.keyring.sign(body)), ["bob@demo"])
            bell = Doorbell(Address.parse("carol@demo"), await carol.outbox.add(sealed), len(sealed)).encode()
            value = await carol.keyring.encrypt(wrapSigned(bell, await carol.keyring.sign(bell)), ["bob@demo"])
            await carol.dht.put("ns:bob@demo", value, b"pw", 3600)
        # A doorbell in alice's name that carol signed.
        bell = Doorbell(Address.parse("alice@demo"), digest, 100).encode()
        value = await carol.keyring.encrypt(wrapSigned(bell, await carol.keyring.sign(bell)), ["bob@demo"])
        await carol.dht.put("ns:bob@demo", value, b"pw", 3600)
        await carol.dht.put("ns:bob@demo", b"\x00garbage", b"pw", 3600)
        await carol.dht.put("ns:bob@demo", os.urandom(3000), b"pw", 3600)
        real = makeMessage("alice@demo", ["bob@demo"], "the real one")
        await h.send("alice", ["bob@demo"], real)

        [uid] = await h.listed("bob")
        await sleep(2.5)
        self.assertEqual(await h.imap("bob", uids), [uid])
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        self.assertIn(b"the real one", data[0][1])
        bad = await bob.ledger.query("SELECT COUNT(*) AS n FROM received_notices WHERE state = 'bad'")
        self.assertEqual(bad[0]["n"], 5, "the three forgeries and the two garbage values are recorded once each")

    async def _flood(self):
        import time

        from p2pmta.dht.memory import MemoryDHT, MemoryNetwork
        from tests.test_dht import ShiftedClock

        network = MemoryNetwork(ShiftedClock(), storagePeriod=3600.0)
        h = PeerHarness(self)
        alice = await h.start("alice", dht=MemoryDHT(network, "alice"))
        bob = await h.start("bob", dht=MemoryDHT(network, "bob"))
        await alice.directory.lookup(Address("bob", "demo"))  # alice pins bob's key
        # 9,000 garbage values and 1,000 that decrypt for bob but say nothing.
        for i in range(9000):
            await alice.dht.put("ns:bob@demo", os.urandom(200) + b"%d" % i, b"pw", 3600)
        for i in range(1000):
            sealed = await alice.keyring.encrypt(b'{"n": %d}' % i, ["bob@demo"])
            await alice.dht.put("ns:bob@demo", sealed, b"pw", 3600)
        started = time.monotonic()
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "through the flood"))
        [uid] = await h.listed("bob", timeout=20)
        elapsed = time.monotonic() - started
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        self.assertIn(b"through the flood", data[0][1])
        bad = await bob.ledger.query("SELECT COUNT(*) AS n FROM received_notices WHERE state = 'bad'")
        self.assertGreater(bad[0]["n"], 0)
        self.assertLess(elapsed, 20, "the real message is listed within seconds of the flood")

    def test_floodDoesNotDelayRealMail(self):
        """
        10,000 bogus notifications under ns:bob (garbage, and values that
        decrypt but are no notification) do not keep a real one from bob's
        INBOX for more than seconds: each costs one in-process decryption.
        """
        return ensureDeferred(self._flood())

    def test_forgedAndGarbageNotifications(self):
        """
        Notifications signed by the wrong key, addressed to someone else, or
        garbage under ns:bob are dropped; the real message still arrives.
        """
        return ensureDeferred(self._forgedAndGarbage())

    async def _tampered(self, size: int):
        h = PeerHarness(self)
        alice = await h.start("alice")
        bob = await h.start("bob")
        message = makeMessage("alice@demo", ["bob@demo"], "tampered", os.urandom(size))
        await h.send("alice", ["bob@demo"], message)

        [uid] = await h.listed("bob")
        [digest] = h.outboxDigests("alice")
        path = alice.outbox.path(digest).path
        with open(path, "rb") as f:
            original = f.read()
        if size >= receiving.IN_MEMORY_PULL:
            self.assertGreater(len(original), receiving.IN_MEMORY_PULL)
        # Only a ciphertext whose hash matched is decrypted, as authenticated
        # (its MDC's hash not computed: see openpgp.decrypt).
        decryptions = []
        decryptInto = bob.keyring.decryptInto

        def spy(*args, **kwargs):
            decryptions.append(kwargs.get("authenticated"))
            return decryptInto(*args, **kwargs)

        self.patch(bob.keyring, "decryptInto", spy)
        with open(path, "wb") as f:
            f.write(original[:100] + bytes([original[100] ^ 1]) + original[101:])
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "NO")
        self.assertIn(b"UNAVAILABLE", data[0])
        self.assertEqual(decryptions, [])
        with open(path, "wb") as f:
            f.write(original)
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK")
        self.assertEqual(stripAdded(data[0][1]), message)
        self.assertEqual(decryptions, [True])
        self.assertEqual(os.listdir(bob.receiver.pullDirectory), [])

    def test_tamperedCiphertext(self):
        """
        A ciphertext whose hash does not match its notification is refused
        (NO [UNAVAILABLE]); a later FETCH of the genuine one succeeds.
        """
        return ensureDeferred(self._tampered(4000))

    def test_tamperedLargeCiphertext(self):
        """
        The same for a ciphertext pulled alone into memory, whose hash is
        checked in a thread (over L{receiving.BATCH_ITEM} and
        L{receiving.INLINE_DECRYPTION}).
        """
        return ensureDeferred(self._tampered(receiving.BATCH_ITEM))

    def test_tamperedCiphertextPulledIntoAFile(self):
        """
        The same for a ciphertext over L{receiving.IN_MEMORY_PULL}, pulled
        into a file, which threads write and hash a MiB at a time (see
        L{p2pmta.httpclient.HashingDownload}).
        """
        return ensureDeferred(self._tampered(receiving.IN_MEMORY_PULL))

    async def _senderOffline(self):
        h = PeerHarness(self)
        await h.start("alice")
        await h.start("bob")
        message = makeMessage("alice@demo", ["bob@demo"], "pull later")
        await h.send("alice", ["bob@demo"], message)

        [uid] = await h.listed("bob")
        await h.stop("alice")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "NO")
        self.assertIn(b"UNAVAILABLE", data[0])
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY.PEEK[HEADER])"))
        self.assertEqual(typ, "OK")
        await h.start("alice")
        typ, data = await h.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK")
        self.assertEqual(stripAdded(data[0][1]), message)

    def test_senderOffline(self):
        """While the sender is away a FETCH of the body says NO [UNAVAILABLE]; later it works."""
        return ensureDeferred(self._senderOffline())


class CurlTests(TestCase):
    """curl, as README shows it, sends and reads mail."""

    timeout = 120

    async def _curl(self):
        from twisted.internet.utils import getProcessOutputAndValue

        h = PeerHarness(self)
        await h.start("alice")
        await h.start("bob")
        path = os.path.join(h.root, "msg.txt")
        message = b"From: alice@demo\r\nTo: bob@demo\r\nSubject: hi\r\n\r\nHello Bob!\r\n"
        with open(path, "wb") as f:
            f.write(message)
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/curl",
            ["-sS", f"smtp://127.0.0.1:{h.port('alice', 'smtp')}", "--user", "alice@demo:alice-pw",
             "--mail-from", "alice@demo", "--mail-rcpt", "bob@demo", "--upload-file", path],
        )
        self.assertEqual(code, 0, err)

        [uid] = await h.listed("bob")
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/curl", ["-sS", f"imap://127.0.0.1:{h.port('bob', 'imap')}/INBOX;UID={uid}", "--user", "bob@demo:bob-pw"]
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(stripAdded(out), message)
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/curl", ["-sS", f"imap://127.0.0.1:{h.port('bob', 'imap')}/INBOX", "--user", "bob@demo:wrong"]
        )
        self.assertNotEqual(code, 0)

    def test_curlSendAndRead(self):
        """curl submits over SMTP with AUTH and reads the message over IMAP."""
        return ensureDeferred(self._curl())


class IdleTests(TestCase):
    """A mail client idling on INBOX hears of new mail as it is announced."""

    timeout = 120

    async def _idle(self):
        import socket

        from twisted.internet.threads import deferToThread

        h = PeerHarness(self)
        await h.start("alice")
        await h.start("bob")
        port = h.port("bob", "imap")
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.addCleanup(sock.close)
        reader = sock.makefile("rb")

        def until(tag: bytes) -> list[bytes]:
            lines = []
            while True:
                line = reader.readline()
                if not line:
                    raise AssertionError(f"connection closed; got {lines!r}")
                lines.append(line)
                if line.startswith(tag):
                    return lines

        def startIdle():
            until(b"* OK")
            sock.sendall(b"a LOGIN bob@demo bob-pw\r\na SELECT INBOX\r\n")
            until(b"a OK")  # LOGIN
            until(b"a OK")  # SELECT
            sock.sendall(b"b IDLE\r\n")
            return until(b"+")

        await deferToThread(startIdle)
        await h.send("alice", ["bob@demo"], makeMessage("alice@demo", ["bob@demo"], "while idling"))
        lines = await deferToThread(until, b"* 1 EXISTS")
        self.assertIn(b"* 1 EXISTS\r\n", lines)

        def done():
            sock.sendall(b"DONE\r\nc LOGOUT\r\n")
            return until(b"c OK")

        await deferToThread(done)

    def test_newMailDuringIdle(self):
        """A message alice sends shows up as * 1 EXISTS in bob's IDLE session."""
        return ensureDeferred(self._idle())


class UnreachableRecipientTests(TestCase):
    timeout = 120

    async def _oneLate(self):
        from twisted.internet.defer import fail

        from p2pmta.errors import UnknownPeer

        h = self.harness = PeerHarness(self)
        alice = await h.start("alice")
        await h.start("bob")
        await h.start("carol")
        alice.sender.process = lambda messageId: None  # hold the pipeline
        await h.send("alice", ["bob@demo", "carol@demo"], makeMessage("alice@demo", ["bob@demo", "carol@demo"], "x"))
        del alice.sender.process
        blocked = {Address("carol", "demo")}
        lookup = alice.directory.lookup
        alice.directory.lookup = lambda a, fresh=False: fail(UnknownPeer(str(a))) if a in blocked else lookup(a, fresh)
        await alice.getServiceNamed("mailflow").runNow()
        await self.harness.listed("bob")
        self.assertEqual(len(await h.imap("alice", lambda c: uids(c, "Sent"))), 1, "filed despite carol")
        states = await alice.ledger.query("SELECT recipient, state FROM deliveries ORDER BY recipient")
        self.assertEqual([(r["recipient"], r["state"]) for r in states], [("bob@demo", "notified"), ("carol@demo", "pending")])
        self.flushLoggedErrors()
        blocked.clear()
        await alice.getServiceNamed("mailflow").runNow()
        await self.harness.listed("carol")

    def test_unreachableRecipientDoesNotHoldTheOthers(self):
        """
        A recipient that cannot be notified now neither keeps the message out
        of Sent nor delays the others; a later round notifies it.
        """
        return ensureDeferred(self._oneLate())
