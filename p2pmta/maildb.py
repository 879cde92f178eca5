# -*- test-case-name: tests.test_mailstore,tests.test_mailbodies -*-
"""
The mail store's SQLite tables: C{mail_mailboxes}, C{mail_messages} and
C{mail_bodies}, in WAL mode.

L{MailDatabase} holds the one connection, which the threads of
L{p2pmta.mailstore.MailStore}'s threadpool take in turn; everything here
blocks.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from twisted.python.failure import Failure

from p2pmta.errors import DiskFull, StoreError
from p2pmta.maildir import IN_DATABASE
from p2pmta.sqlitewrites import writeLock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mail_mailboxes (
    name TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mail_messages (
    mailbox TEXT NOT NULL,
    uid INTEGER NOT NULL,
    flags TEXT NOT NULL,
    internaldate REAL NOT NULL,
    size INTEGER NOT NULL,
    headers BLOB NOT NULL,
    filename TEXT,
    meta TEXT NOT NULL,
    PRIMARY KEY (mailbox, uid)
);
CREATE TABLE IF NOT EXISTS mail_bodies (
    mailbox TEXT NOT NULL,
    uid INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (mailbox, uid)
);
"""


def translateDiskFull(failure: Failure):
    """
    Translate a full disk or quota (C{ENOSPC}, C{EDQUOT}, SQLite's
    C{SQLITE_FULL}) into L{DiskFull}; pass other failures on.
    """
    e = failure.value
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(e.strerror or str(e)) from e
    if isinstance(e, sqlite3.Error) and (
        getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "disk is full" in str(e)
    ):
        raise DiskFull(str(e)) from e
    return failure


class MailDatabase:
    """
    The mail store's connection to its SQLite file.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The SQLite file (it may hold other tables too).
        """
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # Shared with the ledger's connection (see sqlitewrites).
        self._writeLock = writeLock(path)

    def open(self, mailboxes: Iterable[str], held: Callable[[str], bool]) -> tuple[list, list, set]:
        """
        Connect, create the tables and the C{mailboxes} that are missing,
        and read them all.  A message whose body is gone (its file, by
        C{held(filename)}, or its row in C{mail_bodies}) is recorded as not
        held.

        @return: the rows of C{mail_mailboxes} and of C{mail_messages} (in
            mailbox and UID order), and the C{(mailbox, uid)} of the
            messages whose body was gone.
        """
        db = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        with self._writeLock:
            db.executescript(_SCHEMA)
        db.isolation_level = ""
        with self._writeLock, db:
            now = int(time.time())
            for name in mailboxes:
                db.execute(
                    "INSERT OR IGNORE INTO mail_mailboxes VALUES (?, ?, 1)", (name, now)
                )
        boxes = db.execute(
            "SELECT name, uidvalidity, uidnext FROM mail_mailboxes"
        ).fetchall()
        rows = db.execute(
            "SELECT mailbox, uid, flags, internaldate, size, headers, filename, meta "
            "FROM mail_messages ORDER BY mailbox, uid"
        ).fetchall()
        inDatabase = set(db.execute("SELECT mailbox, uid FROM mail_bodies"))
        missing = [
            (row[0], row[1])
            for row in rows
            if row[6] is not None
            and (
                (row[0], row[1]) not in inDatabase
                if row[6] == IN_DATABASE
                else not held(row[6])
            )
        ]
        if missing:
            with self._writeLock, db:
                db.executemany(
                    "UPDATE mail_messages SET filename = NULL "
                    "WHERE mailbox = ? AND uid = ?",
                    missing,
                )
        self._db = db
        return boxes, rows, set(missing)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def transaction(self, statements: Iterable[tuple[str, tuple]], durable: bool = False) -> None:
        """
        Run C{statements} in one transaction (in a thread).

        @param durable: have the commit on disk, not just in the OS, when
            this returns (C{synchronous=FULL} for this commit): for what a
            client is told is safe.  Any commit survives a killed peer; one
            that is not durable may be lost with the later ones to a power
            cut, the database staying consistent.
        """
        with self._lock, self._writeLock:
            db = self._db
            if db is None:
                raise StoreError("the mail store is closed")
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            try:
                with db:
                    for sql, params in statements:
                        db.execute(sql, params)
            finally:
                if durable:
                    db.execute("PRAGMA synchronous=NORMAL")

    def readBody(self, mailbox: str, uid: int) -> bytes:
        """The body of a message held in the database (blocking)."""
        [body] = self.readBodies([(mailbox, uid)])
        if body is None:
            raise FileNotFoundError(f"no body of {mailbox} {uid}")
        return body

    def readBodies(self, keys: list) -> list:
        """The bodies of C{keys} held in the database, L{None} for one gone (blocking)."""
        sql = "SELECT body FROM mail_bodies WHERE mailbox = ? AND uid = ?"
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError("the mail store is closed")
            rows = [db.execute(sql, key).fetchone() for key in keys]
        return [None if row is None else bytes(row[0]) for row in rows]
