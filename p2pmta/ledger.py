# -*- test-case-name: tests.test_mailflow -*-
"""
The pipelines' durable state, in SQLite: what was accepted for sending and
how far each recipient got; which notifications were received and what was
done with them.  Every step of the pipelines is recorded here before it is
considered done, so a peer killed at any moment resumes where it stopped.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from dataclasses import dataclass

from twisted.internet.threads import deferToThreadPool

from p2pmta.sqlitewrites import writeLock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outgoing (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,          -- spooled, encrypted, sent, finishing, finished, cancelled
    spool TEXT NOT NULL,
    spool_size INTEGER,           -- the spool file's size and CRC-32, checked
    spool_crc INTEGER,            -- after a crash (recorded while it is flushed)
    digest TEXT,
    ciphertext_size INTEGER,
    size INTEGER,
    headers BLOB,
    attachments TEXT,
    session_key BLOB              -- of the ciphertext, told to recipients
);
CREATE INDEX IF NOT EXISTS outgoing_digest ON outgoing(digest);
CREATE TABLE IF NOT EXISTS deliveries (
    outgoing TEXT NOT NULL,
    recipient TEXT NOT NULL,
    password BLOB NOT NULL,
    state TEXT NOT NULL,          -- pending, notified, done, cancelled, expired
    notification BLOB,            -- unused since notices (kept for old ledgers)
    notice TEXT,                  -- the notice (ns value) that told of it
    PRIMARY KEY (outgoing, recipient)
);
CREATE INDEX IF NOT EXISTS deliveries_notice ON deliveries(notice);
CREATE TABLE IF NOT EXISTS notices (
    id TEXT PRIMARY KEY,
    recipient TEXT NOT NULL,
    value BLOB NOT NULL,          -- the ns value put: one for several messages
    password BLOB NOT NULL,       -- its DHT password, told to the recipient
    created REAL NOT NULL,
    state TEXT NOT NULL,          -- preparing, live, retired
    body TEXT                     -- digest of the notice in the outbox (value: its doorbell)
);
CREATE TABLE IF NOT EXISTS incoming (
    hash TEXT PRIMARY KEY,        -- "<notice hash>:<index>": one message
    state TEXT NOT NULL,          -- duplicate, new, shown, pulled, rejected, receipted
    received REAL NOT NULL,
    sender TEXT,
    digest TEXT,
    password BLOB,
    ciphertext_size INTEGER,
    size INTEGER,
    headers BLOB,
    raw BLOB,                     -- unused since notices (kept for old ledgers)
    reason TEXT,
    notice TEXT,                  -- the hash of the ns value that told of it
    session_key BLOB,
    sent REAL                     -- when the sender sent it
);
CREATE INDEX IF NOT EXISTS incoming_message ON incoming(sender, digest);
CREATE INDEX IF NOT EXISTS incoming_notice ON incoming(notice);
CREATE TABLE IF NOT EXISTS received_notices (
    hash TEXT PRIMARY KEY,        -- SHA-256 of the raw ns value
    state TEXT NOT NULL,          -- bad, open, done
    received REAL NOT NULL,
    sender TEXT,
    password BLOB,
    raw BLOB,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS republish (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,            -- "hash:<sha1>" of the DHT key
    entry BLOB NOT NULL,          -- the owner's encoded DHT entry, opaque
    PRIMARY KEY (owner, key, entry)
);
CREATE TABLE IF NOT EXISTS replicas (
    owner TEXT NOT NULL,
    digest TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (owner, digest)
);
"""


@dataclass(frozen=True)
class Row:
    """A row, as a read-only mapping of column names to values."""

    values: dict

    def __getitem__(self, key: str):
        return self.values[key]

    def get(self, key: str, default=None):
        return self.values.get(key, default)


class Ledger:
    """
    The pipelines' state.  One connection, used from the thread pool under a
    lock: SQLite work never runs in the reactor thread.
    """

    def __init__(self, reactor, path: str, threadpool) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._lock = threading.Lock()
        # Shared with the mail store's connection (see sqlitewrites).
        self._writeLock = writeLock(path)
        self._connection = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        # Every commit is in the OS before the call returns, so a killed
        # peer loses nothing; durable transactions (an accepted message)
        # also reach the disk before they return.
        self._connection.execute("PRAGMA synchronous=NORMAL")
        with self._writeLock:
            self._addMissingColumns()
            self._connection.executescript(_SCHEMA)

    def _addMissingColumns(self) -> None:
        """Bring a ledger written by an older p2pmta up to this schema."""
        for table, column, kind in (("deliveries", "notice", "TEXT"), ("incoming", "notice", "TEXT"),
                                    ("incoming", "session_key", "BLOB"),
                                    ("outgoing", "session_key", "BLOB"),
                                    ("incoming", "sent", "REAL"), ("notices", "body", "TEXT"),
                                    ("outgoing", "spool_size", "INTEGER"), ("outgoing", "spool_crc", "INTEGER")):
            columns = [row[1] for row in self._connection.execute(f"PRAGMA table_info({table})")]
            if columns and column not in columns:
                self._connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _atomically(self, work, durable: bool = False):
        """
        Run C{work(cursor)} in one transaction, under the lock (blocking).

        A failed transaction is rolled back if it is still open (SQLite
        ends some on its own, e.g. when the disk is full), and the error
        that failed it is the one raised: a full disk (C{SQLITE_FULL}) as
        an L{OSError} with C{ENOSPC}, as every other write of the peer
        reports it.

        @param durable: commit with C{synchronous=FULL}, set and reset
            under the same hold of the lock as the transaction.
        """
        with self._lock, self._writeLock:
            cursor = self._connection.cursor()
            if durable:
                cursor.execute("PRAGMA synchronous=FULL")
            try:
                cursor.execute("BEGIN IMMEDIATE")
                result = work(cursor)
                cursor.execute("COMMIT")
                return result
            except BaseException as e:
                if self._connection.in_transaction:
                    try:
                        cursor.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if _isDiskFull(e):
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({e})") from e
                raise
            finally:
                if durable:
                    cursor.execute("PRAGMA synchronous=NORMAL")

    def _run(self, sql: str, args=(), many: bool = False):
        def work(cursor):
            if many:
                cursor.executemany(sql, args)
            else:
                cursor.execute(sql, args)
            columns = [c[0] for c in cursor.description or ()]
            return [Row(dict(zip(columns, r))) for r in cursor.fetchall()]

        if not many and _isRead(sql):
            # One statement is a transaction of its own; a read needs no
            # write lock, which the mail store's connection may be holding.
            with self._lock:
                return work(self._connection.cursor())
        return self._atomically(work)

    def query(self, sql: str, *args):
        """
        @return: a Deferred firing with the list of L{Row}s of C{sql}.
        """
        return deferToThreadPool(self._reactor, self._threadpool, self._run, sql, args)

    def transaction(self, statements, durable: bool = False):
        """
        Run C{[(sql, args), ...]} in one transaction.

        @param durable: have the commit on disk (not just in the OS) before
            the Deferred fires: for what a client was told is safe.
        @return: a Deferred firing with L{None}.
        """

        def work(cursor):
            for sql, args in statements:
                cursor.execute(sql, args)

        return deferToThreadPool(self._reactor, self._threadpool, self._atomically, work, durable)


def _isRead(sql: str) -> bool:
    """
    @return: whether C{sql} is one statement that only reads.
    """
    return sql.lstrip()[:6].upper() == "SELECT"


def _isDiskFull(error: BaseException) -> bool:
    """
    @return: whether C{error} is SQLite's "database or disk is full".
    """
    if not isinstance(error, sqlite3.Error):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code == sqlite3.SQLITE_FULL
    return "disk is full" in str(error)
