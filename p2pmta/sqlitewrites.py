# -*- test-case-name: tests.test_sqlitewrites -*-
"""
One lock per SQLite database file for the writes of every connection this
process has to it.

The ledger and the mail store each keep a connection to the peer's one
database (they share its write-ahead log).  SQLite lets one connection
write at a time; one that tries meanwhile is told the database is busy,
and its busy handler sleeps 1, 2, 5, 10 ms and more before it tries again
(Python's C{sqlite3} offers no other handler).  An SMTP 250 waiting on the
ledger then waited milliseconds for a mail store commit that took a
fraction of one.  Holding this lock around each write transaction hands
the database over the moment the other commit ends; SQLite's own lock is
then never contended within the process.  Reads take no lock: in WAL mode
they do not wait for writers.
"""

from __future__ import annotations

import os
import threading

_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def writeLock(path: str) -> threading.Lock:
    """
    @return: the lock that write transactions to the database file C{path}
        hold, the same for every name of that file (one lock object per
        file for the life of the process).
    """
    key = os.path.realpath(path)
    with _guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.Lock()
        return lock
