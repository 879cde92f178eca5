"""
Tests for L{p2pmta.mailbodies}.
"""

import os
import sqlite3

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    inlineCallbacks,
)
from twisted.trial.unittest import TestCase

from p2pmta import fileutil, maildir
from p2pmta.errors import BodyUnavailable, HeaderMismatch, NoSuchMessage
from tests.test_mailstore import HEADERS, MESSAGE, MailStoreMixin


class MessageBodiesTests(MailStoreMixin, TestCase):
    """
    Tests for L{MessageBodies}, through the L{MailStore} it is part of.
    """

    @inlineCallbacks
    def test_bodyPulledOnceForConcurrentCallers(self):
        """
        A message delivered without a body is pulled once, even for
        concurrent callers, then served from the stored file.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {"h": 1})
        self.assertFalse(self.store.record("INBOX", uid).held)
        pulled = self.writeFile("pulled", MESSAGE)
        self.store.bodyFetcher = self.fetcherReturning(pulled)
        paths = yield gatherResults([self.store.body("INBOX", uid) for _ in range(3)])
        self.assertEqual(self.calls, [("INBOX", uid)])
        self.assertEqual(len(set(paths)), 1)
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertFalse(os.path.exists(pulled))
        self.assertTrue(self.store.record("INBOX", uid).held)
        again = yield self.store.body("INBOX", uid)
        self.assertEqual(again, paths[0])
        self.assertEqual(len(self.calls), 1)
        yield self.reopen()
        self.assertTrue(self.store.record("INBOX", uid).held)

    @inlineCallbacks
    def test_pulledBytesServedWhileWritten(self):
        """
        A message the fetcher returns as bytes is served at once, from
        memory, while it is written; the sender is told (C{attachedHook}),
        and C{written} fires, only once it is on disk, after which its file
        serves it.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        stored = Deferred()
        self.store.attachedHook = lambda mailbox, record: stored.callback(self.store.record(mailbox, record.uid))
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        self.counting.gate.clear()  # the disk "hangs"
        try:
            first = yield self.store.body("INBOX", uid)
            second = yield self.store.body("INBOX", uid)
            self.assertEqual((first, second), (MESSAGE, MESSAGE))
            self.assertEqual(self.calls, [("INBOX", uid)])
            self.assertFalse(self.store.record("INBOX", uid).held)
            self.assertFalse(stored.called)
            written = self.store.written("INBOX", [uid, uid + 1])
            self.assertFalse(written.called)
        finally:
            self.counting.gate.set()
        yield written
        self.assertTrue(self.store.record("INBOX", uid).held)
        self.assertTrue(self.store.written("INBOX", [uid]).called, "nothing left to wait for")
        record = yield stored
        self.assertTrue(record.held)
        # Small: kept in the database, not in a file of its own.
        again = yield self.store.body("INBOX", uid)
        self.assertEqual(again, MESSAGE)
        for sub in ("tmp", "cur"):
            self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", sub)), [])
        self.assertIsNone(self.store.filePath("INBOX", uid))
        yield self.reopen()
        self.assertTrue(self.store.record("INBOX", uid).held)
        again = yield self.store.body("INBOX", uid)
        self.assertEqual(again, MESSAGE)

    @inlineCallbacks
    def test_largePulledBytesIntoFile(self):
        """
        Pulled bytes over L{maildir.DATABASE_BODY} are written into a file
        of their own, which serves them once written.
        """
        self.patch(maildir, "DATABASE_BODY", len(MESSAGE) - 1)
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        first = yield self.store.body("INBOX", uid)
        self.assertEqual(first, MESSAGE)
        yield self.store.written("INBOX", [uid])
        path = yield self.store.body("INBOX", uid)
        self.assertEqual(path, self.store.filePath("INBOX", uid))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "tmp")), [])

    @inlineCallbacks
    def test_largePulledBytesPastTheCache(self):
        """
        A large pulled body, which its reader has from memory, is written
        past the page cache (L{fileutil.writeUncached}); what is read back
        from its file is the message.
        """
        big = MESSAGE + os.urandom(maildir.DATABASE_BODY)
        uncached = []
        write = fileutil.writeUncached
        self.patch(fileutil, "writeUncached", lambda fd, data: (uncached.append(len(data)), write(fd, data)))
        uid = yield self.store.deliver("INBOX", HEADERS, len(big), {})
        self.store.bodyFetcher = self.fetcherReturning(big)
        first = yield self.store.body("INBOX", uid)
        self.assertEqual(first, big)
        yield self.store.written("INBOX", [uid])
        self.assertEqual(uncached, [len(big)])
        path = yield self.store.body("INBOX", uid)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), big)

    @inlineCallbacks
    def pulledIntoDatabase(self) -> int:
        """A message whose pulled body is in the database: its UID."""
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        yield self.store.body("INBOX", uid)
        yield self.store.written("INBOX", [uid])
        self.assertTrue(self.store.record("INBOX", uid).held)
        self.assertIsNone(self.store.filePath("INBOX", uid))
        return uid

    def database(self, sql: str, *args) -> list:
        """Run C{sql} on the store's database from outside the store."""
        db = sqlite3.connect(os.path.join(self.dir, "p2pmta.sqlite"))
        try:
            with db:
                return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def bodyRows(self) -> list:
        return self.database("SELECT mailbox, uid, length(body) FROM mail_bodies ORDER BY mailbox, uid")

    @inlineCallbacks
    def test_databaseBodyCopiedAndExpunged(self):
        """
        COPY of a body held in the database copies it; expunging either
        message removes its body only.
        """
        uid = yield self.pulledIntoDatabase()
        [(_, copied)] = yield self.store.copy("INBOX", [uid], "Sent")
        body = yield self.store.body("Sent", copied)
        self.assertEqual(body, MESSAGE)
        self.assertEqual(self.bodyRows(), [("INBOX", uid, len(MESSAGE)), ("Sent", copied, len(MESSAGE))])
        yield self.store.expunge("INBOX", [uid])
        self.assertEqual(self.bodyRows(), [("Sent", copied, len(MESSAGE))])
        yield self.reopen()
        body = yield self.store.body("Sent", copied)
        self.assertEqual(body, MESSAGE)

    @inlineCallbacks
    def test_databaseBodiesReadTogether(self):
        """
        Bodies held in the database asked for in one turn of the reactor
        are read in one thread call; one whose row is gone is unavailable.
        """
        uids = []
        for _ in range(3):
            uids.append((yield self.pulledIntoDatabase()))
        # One body lost behind the store's back (a damaged database).
        self.database("DELETE FROM mail_bodies WHERE uid = ?", uids[1])
        self.counting.calls.clear()
        wanted = [self.store.body("INBOX", u) for u in uids]
        results = yield DeferredList(wanted, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        self.assertEqual([results[0][1], results[2][1]], [MESSAGE, MESSAGE])
        self.assertTrue(results[1][1].check(BodyUnavailable))
        self.assertEqual(self.counting.calls, ["readBodies"])

    @inlineCallbacks
    def test_databaseBodyLost(self):
        """
        A message whose row in C{mail_bodies} is gone (a damaged database)
        is not held after a restart: the next open pulls it again.
        """
        uid = yield self.pulledIntoDatabase()
        yield self.store.close()
        self.database("DELETE FROM mail_bodies")
        self.store = None
        yield self.reopen()
        self.assertFalse(self.store.record("INBOX", uid).held)
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        body = yield self.store.body("INBOX", uid)
        self.assertEqual(body, MESSAGE)

    @inlineCallbacks
    def test_writeBehindBounded(self):
        """
        Beyond C{writeBehindBytes} held in memory, a pulled message is
        served once it is on disk.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        self.store.writeBehindBytes = len(MESSAGE) - 1
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        body = yield self.store.body("INBOX", uid)
        self.assertEqual(body, MESSAGE)
        self.assertTrue(self.store.record("INBOX", uid).held)

    @inlineCallbacks
    def test_pulledBytesExpungedWhileWritten(self):
        """
        A message expunged while its pulled bytes are written leaves no
        file, and is no longer served from memory.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        self.store.bodyFetcher = self.fetcherReturning(MESSAGE)
        self.counting.gate.clear()
        try:
            expunged = self.store.expunge("INBOX", [uid])  # holds the write lock
            body = yield self.store.body("INBOX", uid)
            self.assertEqual(body, MESSAGE)
        finally:
            self.counting.gate.set()
        self.assertEqual((yield expunged), [uid])
        yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})  # after the attach
        yield self.assertFailure(self.store.body("INBOX", uid), BodyUnavailable)
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "cur")), [])
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "tmp")), [])

    @inlineCallbacks
    def test_pulledBytesMismatchRefused(self):
        """
        Pulled bytes whose header section differs from the notification's
        are refused, and nothing is written.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        self.store.bodyFetcher = self.fetcherReturning(b"Subject: other\r\n\r\nbody\r\n")
        yield self.assertFailure(self.store.body("INBOX", uid), BodyUnavailable)
        self.assertFalse(self.store.record("INBOX", uid).held)
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "cur")), [])

    @inlineCallbacks
    def test_bodyUnavailableThenRetried(self):
        """
        L{BodyUnavailable} reaches every waiter; a later call asks again.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        pulled = self.writeFile("pulled", MESSAGE)
        self.store.bodyFetcher = self.fetcherReturning(
            BodyUnavailable("sender offline"), pulled
        )
        first = self.store.body("INBOX", uid)
        second = self.store.body("INBOX", uid)
        for d in (first, second):
            failure = yield self.assertFailure(d, BodyUnavailable)
            self.assertIn("sender offline", str(failure))
        self.assertFalse(self.store.record("INBOX", uid).held)
        path = yield self.store.body("INBOX", uid)
        self.assertEqual(len(self.calls), 2)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    @inlineCallbacks
    def test_otherFetchErrorsAreUnavailable(self):
        """
        Any other failure of the fetcher, or no fetcher at all, is
        L{BodyUnavailable} to the caller.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        yield self.assertFailure(self.store.body("INBOX", uid), BodyUnavailable)
        self.store.bodyFetcher = self.fetcherReturning(ValueError("boom"))
        yield self.assertFailure(self.store.body("INBOX", uid), BodyUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @inlineCallbacks
    def test_pulledMismatchRefused(self):
        """
        A pulled file whose header section differs from the notification's
        is refused (and removed): the body stays unavailable.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, len(MESSAGE), {})
        bad = self.writeFile("bad", b"Subject: other\r\n\r\nbody\r\n")
        self.store.bodyFetcher = self.fetcherReturning(bad)
        yield self.assertFailure(self.store.body("INBOX", uid), BodyUnavailable)
        self.assertFalse(os.path.exists(bad))
        self.assertFalse(self.store.record("INBOX", uid).held)

    @inlineCallbacks
    def test_attachBodyRefusesMismatchingHeaders(self):
        """
        C{attachBody} takes a file only if it starts with exactly the
        stored header section; its real size replaces the announced one.
        """
        uid = yield self.store.deliver("INBOX", HEADERS, 99, {})
        bad = self.writeFile("bad", HEADERS.replace(b"Hi", b"HI") + b"body")
        yield self.assertFailure(
            self.store.attachBody("INBOX", uid, bad), HeaderMismatch
        )
        self.assertTrue(os.path.exists(bad))
        self.assertFalse(self.store.record("INBOX", uid).held)
        good = self.writeFile("good", MESSAGE)
        path = yield self.store.attachBody("INBOX", uid, good)
        record = self.store.record("INBOX", uid)
        self.assertTrue(record.held)
        self.assertEqual(record.size, len(MESSAGE))
        self.assertEqual(self.store.filePath("INBOX", uid), path)

    @inlineCallbacks
    def test_attachBodiesTogether(self):
        """
        Bodies attached while another write runs are moved in by one thread
        call (the first starts at once, the others join while it runs); one
        that does not match fails alone, and all are kept across a reopen.
        """
        uids = []
        for i in range(4):
            uids.append((yield self.store.deliver("INBOX", HEADERS, 99, {"n": i})))
        calls = []
        original = self.store.runInThread

        def counting(f, *args):
            calls.append(f)
            return original(f, *args)

        self.store.runInThread = counting
        bad = self.writeFile("bad", b"Subject: other\r\n\r\nbody")
        ds = [self.store.attachBody("INBOX", uids[0], self.writeFile("m0", MESSAGE))]
        ds.append(self.store.attachBody("INBOX", uids[1], bad))
        ds += [self.store.attachBody("INBOX", u, self.writeFile(f"m{u}", MESSAGE)) for u in uids[2:]]
        results = yield DeferredList(ds, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True, True])
        results[1][1].trap(HeaderMismatch)
        self.assertEqual(len(calls), 2)
        self.assertTrue(os.path.exists(bad))
        yield self.reopen()
        self.assertEqual([r.held for r in self.store.messages("INBOX")], [True, False, True, True])
        with open(self.store.filePath("INBOX", uids[3]), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    @inlineCallbacks
    def test_expungedWhileItsBodyIsAttached(self):
        """
        A message expunged while its pulled body waits to be attached
        stays expunged: the attach fails with L{NoSuchMessage} and its file
        goes, even when the attach starts before the expunge has left the
        index (it takes the lock the moment the expunge's write is done).
        """
        uid = yield self.store.deliver("INBOX", HEADERS, 99, {})
        keep = yield self.store.deliver("INBOX", HEADERS, 99, {})
        expunged = self.store.expunge("INBOX", [uid])
        attached = self.store.attachBody("INBOX", uid, self.writeFile("pulled", MESSAGE))
        self.assertEqual((yield expunged), [uid])
        yield self.assertFailure(attached, NoSuchMessage)
        self.assertIsNone(self.store.record("INBOX", uid))
        self.assertEqual(self.store.uids("INBOX"), [keep])
        yield self.reopen()
        self.assertEqual(self.store.uids("INBOX"), [keep])
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "cur")), [])
