"""
Tests for L{p2pmta.sqlitewrites}: the ledger's and the mail store's
connections to one database never meet SQLite's "busy" (whose handler
sleeps milliseconds): each write waits for the other's on one lock.
"""

from __future__ import annotations

import os
import threading

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.ledger import Ledger
from p2pmta.maildb import MailDatabase
from p2pmta.sqlitewrites import writeLock

_INSERT = "INSERT INTO outgoing (id, sender, created, state, spool) VALUES (?, 'a@b', 0, 'spooled', '/x')"


class _Held:
    """
    A write transaction run in a thread of its own that stops half way,
    holding the database, until L{finish}.
    """

    def __init__(self, run) -> None:
        self.inside = threading.Event()
        self._go = threading.Event()
        self.error: BaseException | None = None

        def target():
            try:
                run(self)
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=target)
        self.thread.start()
        if not self.inside.wait(10):
            raise AssertionError("the transaction did not start")

    def pause(self) -> None:
        """Called inside the transaction: hold it until L{finish}."""
        self.inside.set()
        self._go.wait(10)

    def finish(self) -> None:
        self._go.set()
        self.thread.join(10)
        if self.error is not None:
            raise self.error


def _inThread(f, *args):
    """Run C{f(*args)} in a thread; return the thread and a list of its outcome."""
    outcome: list = []

    def target():
        try:
            outcome.append(("ok", f(*args)))
        except BaseException as e:
            outcome.append(("error", e))

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


class SharedWriteLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.abspath(os.path.join(directory, "p2pmta.sqlite"))
        self.ledger = Ledger(None, self.path, None)
        self.addCleanup(self.ledger.close)
        self.mail = MailDatabase(self.path)
        self.mail.open(["INBOX"], held=lambda name: True)
        self.addCleanup(self.mail.close)
        # Without the shared lock, a write meeting the other connection's
        # would now fail at once ("database is locked"), not sleep.
        self.ledger._connection.execute("PRAGMA busy_timeout=0")
        self.mail._db.execute("PRAGMA busy_timeout=0")

    def test_sameLockForEveryName(self):
        """One file has one lock, whatever name it is reached by."""
        link = self.path + "-link"
        os.symlink(self.path, link)
        self.assertIs(writeLock(link), writeLock(self.path))
        self.assertIs(writeLock(os.path.relpath(self.path)), writeLock(self.path))
        self.assertIsNot(writeLock(self.path + "-other"), writeLock(self.path))

    def test_ledgerWaitsForMailStore(self):
        """
        A ledger write while the mail store's transaction is open waits for
        it, then commits: it is never told the database is busy.
        """

        def statements(held):
            yield ("UPDATE mail_mailboxes SET uidnext = uidnext + 1", ())
            held.pause()

        held = _Held(lambda h: self.mail.transaction(statements(h), durable=True))
        thread, outcome = _inThread(self.ledger._atomically, lambda c: c.execute(_INSERT, ("m1",)), True)
        thread.join(0.2)
        self.assertEqual(outcome, [], "the ledger wrote while the mail store held the database")
        held.finish()
        thread.join(10)
        self.assertEqual([kind for kind, _ in outcome], ["ok"], outcome)
        self.assertEqual([r["id"] for r in self.ledger._run("SELECT id FROM outgoing")], ["m1"])

    def test_mailStoreWaitsForLedger(self):
        """The same the other way round."""

        def work(held, cursor):
            cursor.execute(_INSERT, ("m2",))
            held.pause()

        held = _Held(lambda h: self.ledger._atomically(lambda c: work(h, c)))
        thread, outcome = _inThread(
            self.mail.transaction, [("UPDATE mail_mailboxes SET uidnext = uidnext + 1", ())], True
        )
        thread.join(0.2)
        self.assertEqual(outcome, [])
        held.finish()
        thread.join(10)
        self.assertEqual([kind for kind, _ in outcome], ["ok"], outcome)

    def test_readsDoNotWait(self):
        """A ledger read goes on while the mail store holds the database."""

        def statements(held):
            yield ("UPDATE mail_mailboxes SET uidnext = uidnext + 1", ())
            held.pause()

        held = _Held(lambda h: self.mail.transaction(statements(h)))
        try:
            thread, outcome = _inThread(self.ledger._run, "SELECT count(*) AS n FROM outgoing")
            thread.join(10)
            self.assertEqual([kind for kind, _ in outcome], ["ok"], outcome)
        finally:
            held.finish()
