"""
Tests for L{p2pmta.mailstore}.
"""

import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from p2pmta.errors import NoSuchMailbox
from p2pmta.interfaces import IMailStore
from p2pmta.mailindex import MessageRecord
from p2pmta.mailstore import MailStore

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


class MailStoreMixin:
    """
    A L{MailStore} with a real threadpool and SQLite, in a folder of its
    own, for tests of it and of its parts.
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


class MailStoreTests(MailStoreMixin, TestCase):
    """
    Tests for L{MailStore} with a real threadpool and SQLite.
    """

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
