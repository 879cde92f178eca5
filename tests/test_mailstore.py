"""
Tests for L{p2pmta.mailstore}.
"""

import os
import sqlite3
import threading

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from p2pmta import mailstore
from p2pmta.errors import BodyUnavailable
from p2pmta.interfaces import IMailStore
from p2pmta.mailstore import (
    HeaderMismatch,
    MailStore,
    MessageRecord,
    NoSuchMailbox,
    NoSuchMessage,
    splitHeaders,
)

HEADERS = b"From: bob@demo\r\nTo: alice@demo\r\nSubject: Hi\r\n\r\n"
MESSAGE = HEADERS + b"Hello Alice.\r\n"


class _CountingPool:
    """
    A threadpool wrapper that records which threads ran the work.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool
        self.threads: set = set()
        self.gate = threading.Event()  # cleared: work waits in its thread
        self.gate.set()
        self.calls: list = []  # the names of the functions run

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        def work(*a, **kw):
            self.threads.add(threading.get_ident())
            self.gate.wait()
            return f(*a, **kw)

        self.calls.append(getattr(f, "__name__", repr(f)))
        self._pool.callInThreadWithCallback(onResult, work, *args, **kwargs)


class SplitHeadersTests(SynchronousTestCase):
    """
    Tests for L{splitHeaders}.
    """

    @given(
        st.lists(
            st.from_regex(rb"[A-Za-z-]{1,10}: [ -~]{0,30}\r\n", fullmatch=True),
            max_size=5,
        ),
        st.binary(max_size=50),
    )
    def test_headerSectionWithBlankLine(self, fields, body) -> None:
        """
        The header section is everything up to and including the first
        blank line, whatever the body holds.
        """
        headers = b"".join(fields) + b"\r\n"
        self.assertEqual(splitHeaders(headers + body), headers)

    def test_noBlankLine(self) -> None:
        """
        A message without a blank line is all header.
        """
        self.assertEqual(splitHeaders(b"Subject: x\r\n"), b"Subject: x\r\n")


class MailStoreTests(TestCase):
    """
    Tests for L{MailStore} with a real threadpool and SQLite.
    """

    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-mailstore")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.counting = _CountingPool(self.pool)
        self.calls = []
        return self.reopen()

    @inlineCallbacks
    def reopen(self):
        """
        (Re)open the store on the same files.
        """
        if getattr(self, "store", None) is not None:
            yield self.store.close()
        self.store = MailStore(
            reactor,
            os.path.join(self.dir, "p2pmta.sqlite"),
            os.path.join(self.dir, "inbox"),
            self.counting,
        )
        yield self.store.open()
        self.addCleanup(self.store.close)

    def writeFile(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def fetcherReturning(self, *results):
        """
        A body fetcher that answers each call with the next of C{results}
        (a path, or an exception to fail with), after a reactor turn.
        """
        results = list(results)

        def fetch(mailbox, record):
            self.calls.append((mailbox, record.uid))
            result = results.pop(0)
            d = Deferred()
            if isinstance(result, Exception):
                reactor.callLater(0, d.errback, result)
            else:
                reactor.callLater(0, d.callback, result)
            return d

        return fetch

    def test_interface(self) -> None:
        """
        L{MailStore} provides L{IMailStore}.
        """
        self.assertTrue(verifyObject(IMailStore, self.store))

    def test_defaultMailboxes(self) -> None:
        """
        INBOX, Sent (SPECIAL-USE C{\\Sent}) and Outbox exist from the start.
        """
        self.assertEqual(
            self.store.mailboxNames(),
            [("INBOX", []), ("Sent", ["\\Sent"]), ("Outbox", [])],
        )
        for name in ("INBOX", "Sent", "Outbox"):
            self.assertEqual(self.store.messages(name), [])
            self.assertEqual(self.store.uidNext(name), 1)

    @inlineCallbacks
    def test_persistsAcrossReopen(self):
        """
        UIDs, flags, dates, headers, meta, UIDNEXT and UIDVALIDITY survive a
        restart.
        """
        validity = self.store.uidValidity("INBOX")
        uid1 = yield self.store.deliver(
            "INBOX", HEADERS, 1234, {"hash": "ab"}, date=1000.0
        )
        uid2 = yield self.store.append("INBOX", MESSAGE, ["\\Draft"], 2000.0)
        yield self.store.setFlags("INBOX", [uid1, uid2], ["\\Seen", "work"], "add")
        yield self.store.expunge("INBOX", [uid2])
        before = self.store.messages("INBOX")
        yield self.reopen()
        self.assertEqual(self.store.uidValidity("INBOX"), validity)
        self.assertEqual(self.store.uidNext("INBOX"), 3)
        self.assertEqual(self.store.messages("INBOX"), before)
        [record] = before
        self.assertEqual(
            record,
            MessageRecord(
                1,
                frozenset({"\\Seen", "work"}),
                1000.0,
                1234,
                HEADERS,
                False,
                {"hash": "ab"},
            ),
        )
        uid3 = yield self.store.append("INBOX", MESSAGE)
        self.assertEqual(uid3, 3)

    @inlineCallbacks
    def test_writesRunInThreadpool(self):
        """
        Writes run in the threadpool, not in the reactor thread.
        """
        self.counting.threads.clear()
        yield self.store.append("INBOX", MESSAGE)
        self.assertTrue(self.counting.threads)
        self.assertNotIn(threading.get_ident(), self.counting.threads)

    @inlineCallbacks
    def test_appendStoresFile(self):
        """
        A message appended is held: its file in C{cur/} has its exact bytes.
        """
        uid = yield self.store.append("Sent", MESSAGE)
        record = self.store.record("Sent", uid)
        self.assertTrue(record.held)
        self.assertEqual(record.headers, HEADERS)
        self.assertEqual(record.size, len(MESSAGE))
        path = yield self.store.body("Sent", uid)
        self.assertEqual(os.path.dirname(path), os.path.join(self.dir, "inbox", "cur"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(os.listdir(os.path.join(self.dir, "inbox", "tmp")), [])

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
        Pulled bytes over L{mailstore.DATABASE_BODY} are written into a file
        of their own, which serves them once written.
        """
        self.patch(mailstore, "DATABASE_BODY", len(MESSAGE) - 1)
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
        self.assertEqual(self.counting.calls, ["_readBodies"])

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

    @inlineCallbacks
    def test_deliverWithBodyMovesFileIn(self):
        """
        C{deliver} with a body file moves it into the Maildir.
        """
        source = self.writeFile("incoming", MESSAGE)
        uid = yield self.store.deliver("INBOX", HEADERS, 1, {}, bodyPath=source)
        self.assertFalse(os.path.exists(source))
        record = self.store.record("INBOX", uid)
        self.assertTrue(record.held)
        self.assertEqual(record.size, len(MESSAGE))

    @inlineCallbacks
    def test_expungeHookSeesRecordsFirst(self):
        """
        The expunge hook is called with the records before they go; the
        files are removed and listeners hear of it.
        """
        uid1 = yield self.store.append("INBOX", MESSAGE)
        uid2 = yield self.store.deliver("INBOX", HEADERS, 10, {"n": 2})
        path = self.store.filePath("INBOX", uid1)
        seen, events = [], []
        self.store.addListener("INBOX", lambda e, u: events.append((e, u)))

        def hook(mailbox, records):
            seen.append(
                (mailbox, records, [self.store.record(mailbox, r.uid) for r in records])
            )
            return succeed(None)

        self.store.expungeHook = hook
        removed = yield self.store.expunge("INBOX", [uid1, uid2, 99])
        self.assertEqual(removed, [uid1, uid2])
        [(mailbox, records, present)] = seen
        self.assertEqual(mailbox, "INBOX")
        self.assertEqual([r.uid for r in records], [uid1, uid2])
        self.assertEqual(records, present)
        self.assertEqual(self.store.messages("INBOX"), [])
        self.assertFalse(os.path.exists(path))
        self.assertEqual(events, [("expunged", uid1), ("expunged", uid2)])

    @inlineCallbacks
    def test_expungeHookFailureStillExpunges(self):
        """
        A failing hook is logged and the messages are expunged anyway.
        """
        uid = yield self.store.append("INBOX", MESSAGE)
        self.store.expungeHook = lambda mailbox, records: fail(RuntimeError("dht down"))
        removed = yield self.store.expunge("INBOX", [uid])
        self.assertEqual(removed, [uid])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(self.store.record("INBOX", uid))

    @inlineCallbacks
    def test_listeners(self):
        """
        Listeners hear C{added}, C{flags} and C{expunged}, after the change
        is visible, until they are removed.
        """
        events = []

        def listener(event, uid):
            events.append((event, uid, self.store.record("INBOX", uid)))

        self.store.addListener("inbox", listener)
        uid = yield self.store.append("INBOX", MESSAGE)
        yield self.store.setFlags("INBOX", [uid], ["\\Seen"], "add")
        yield self.store.setFlags("INBOX", [uid], ["\\Seen"], "add")
        yield self.store.expunge("INBOX", [uid])
        self.assertEqual(
            [(e, u) for e, u, _ in events],
            [("added", uid), ("flags", uid), ("expunged", uid)],
        )
        self.assertIsNotNone(events[0][2])
        self.assertEqual(events[1][2].flags, {"\\Seen"})
        self.assertIsNone(events[2][2])
        self.store.removeListener("INBOX", listener)
        yield self.store.append("INBOX", MESSAGE)
        self.assertEqual(len(events), 3)

    @inlineCallbacks
    def test_setFlagsModes(self):
        """
        C{set}, C{add} and C{remove} change flags as named, and report the
        new flags of each message.
        """
        uid = yield self.store.append("INBOX", MESSAGE, ["\\Seen"])
        result = yield self.store.setFlags("INBOX", [uid, 42], ["a", "b"], "add")
        self.assertEqual(result, {uid: {"\\Seen", "a", "b"}})
        result = yield self.store.setFlags("INBOX", [uid], ["a"], "remove")
        self.assertEqual(result, {uid: {"\\Seen", "b"}})
        result = yield self.store.setFlags("INBOX", [uid], ["\\Flagged"], "set")
        self.assertEqual(result, {uid: {"\\Flagged"}})

    @inlineCallbacks
    def test_metaFindAndUpdate(self):
        """
        C{findByMeta} finds records by a meta key; C{updateMeta} merges and
        persists.
        """
        yield self.store.deliver("INBOX", HEADERS, 10, {"hash": "aa"})
        uid = yield self.store.deliver("INBOX", HEADERS, 10, {"hash": "bb"})
        [found] = self.store.findByMeta("INBOX", "hash", "bb")
        self.assertEqual(found.uid, uid)
        self.assertEqual(self.store.findByMeta("INBOX", "hash", "cc"), [])
        new = yield self.store.updateMeta("INBOX", uid, {"state": "received"})
        self.assertEqual(new, {"hash": "bb", "state": "received"})
        yield self.reopen()
        self.assertEqual(
            self.store.findByMeta("INBOX", "state", "received")[0].meta, new
        )

    @inlineCallbacks
    def test_findAllByMetaFollowsChanges(self):
        """
        C{findAllByMeta} answers from an index that follows deliveries,
        meta updates and expunges, in UID order.
        """
        first = yield self.store.deliver("INBOX", HEADERS, 10, {"id": "a"})
        self.assertEqual(list(self.store.findAllByMeta("INBOX", "id", ["a", "b"])), ["a"])
        second = yield self.store.deliver("INBOX", HEADERS, 10, {"id": "b"})
        third = yield self.store.deliver("INBOX", HEADERS, 10, {"id": "a", "list": [1]})
        found = self.store.findAllByMeta("INBOX", "id", ["a", "b", "c"])
        self.assertEqual({k: [r.uid for r in v] for k, v in found.items()}, {"a": [first, third], "b": [second]})
        yield self.store.updateMeta("INBOX", first, {"id": "c"})
        yield self.store.expunge("INBOX", [second])
        found = self.store.findAllByMeta("INBOX", "id", ["a", "b", "c"])
        self.assertEqual({k: [r.uid for r in v] for k, v in found.items()}, {"a": [third], "c": [first]})
        self.assertEqual(found["c"][0].meta, {"id": "c"})
        self.assertEqual(self.store.findAllByMeta("INBOX", "list", [1, "x"]), {})

    @inlineCallbacks
    def test_copy(self):
        """
        C{copy} gives new UIDs in the destination, with the same flags,
        headers, meta and bytes.
        """
        held = yield self.store.append("INBOX", MESSAGE, ["\\Seen"])
        bare = yield self.store.deliver("INBOX", HEADERS, 77, {"hash": "cc"})
        pairs = yield self.store.copy("INBOX", [held, bare], "Sent")
        self.assertEqual(pairs, [(held, 1), (bare, 2)])
        first, second = self.store.messages("Sent")
        self.assertEqual(first.flags, {"\\Seen"})
        self.assertTrue(first.held)
        path = yield self.store.body("Sent", 1)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(
            (second.held, second.size, second.meta), (False, 77, {"hash": "cc"})
        )
        yield self.store.expunge("INBOX", [held])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    @inlineCallbacks
    def test_missingFileForgottenAtOpen(self):
        """
        A held message whose file has gone is shown as not held after a
        restart, so its body can be pulled again.
        """
        uid = yield self.store.append("INBOX", MESSAGE)
        os.unlink(self.store.filePath("INBOX", uid))
        yield self.reopen()
        self.assertFalse(self.store.record("INBOX", uid).held)
        self.flushLoggedErrors()

    def test_unknownMailbox(self):
        """
        Naming a mailbox that does not exist fails with L{NoSuchMailbox}.
        """
        self.assertRaises(NoSuchMailbox, self.store.messages, "Trash")
        self.failureResultOf(self.store.append("Trash", MESSAGE), NoSuchMailbox)
        self.failureResultOf(self.store.deliver("Trash", HEADERS, 1, {}), NoSuchMailbox)

    def test_inboxAnyCase(self):
        """
        INBOX is case-insensitive; other names are not.
        """
        self.assertEqual(
            self.store.uidValidity("inBox"), self.store.uidValidity("INBOX")
        )
        self.assertRaises(NoSuchMailbox, self.store.uidValidity, "sent")
