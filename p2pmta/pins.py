# -*- test-case-name: tests.test_crypto -*-
"""
A keyring's pins (the paper's key cache area): the fingerprint of the key
pinned for each address, and when each peer's key was last used, in an
SQLite file.

Everything here blocks: L{p2pmta.crypto.Keyring} uses its L{Pins} from its
threads only.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

from p2pmta.address import asAddress

#: How often at most the last use of a peer's key is written down.
_SEEN_INTERVAL = 3600.0
_UPSERT = (
    "INSERT INTO pins VALUES (?, ?, ?, ?) ON CONFLICT(address) DO UPDATE "
    "SET fingerprint = excluded.fingerprint, last_seen = excluded.last_seen"
)


class Pins:
    """
    The pins table in C{path}, with a cache of the pins read and of the
    last uses not written down yet.  L{lookup} and L{seen} take
    L{p2pmta.address.Address}es or strings; the other methods take
    addresses as C{str(Address)} writes them.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._pins: dict[str, str] = {}  # address -> fingerprint, a cache
        self._lastSeen: dict[str, float] = {}  # last use written down
        self._seenAt: dict[str, float] = {}  # last use

    def _db(self):
        return closing(sqlite3.connect(self._path, timeout=60))

    def create(self) -> None:
        """Make the pins table, if it is not there yet."""
        with self._db() as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS pins (address TEXT PRIMARY KEY, fingerprint"
                " TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL)"
            )

    def lookup(self, address) -> str | None:
        """
        @return: the fingerprint pinned for C{address}, or L{None}.
        @raise BadAddress: if C{address} is not an address.
        """
        address = str(asAddress(address))
        cached = self._pins.get(address)
        if cached is not None:
            return cached
        with self._db() as db:
            query = "SELECT fingerprint FROM pins WHERE address = ?"
            row = db.execute(query, (address,)).fetchone()
        if row:
            self._pins[address] = row[0]
        return row[0] if row else None

    def pin(self, address: str, fingerprint: str, now: float) -> None:
        """
        Write down that C{fingerprint} is pinned for C{address}, seen at
        C{now} (and first seen then, if no key was pinned for it).
        """
        with self._db() as db, db:
            db.execute(_UPSERT, (address, fingerprint, now, now))
        self._pins[address] = fingerprint

    def seen(self, addresses) -> None:
        """
        Note that C{addresses} were just used.  Written down at most hourly,
        and before L{unseenSince}.
        """
        now = time.time()
        due = []
        for address in addresses:
            address = str(asAddress(address))
            self._seenAt[address] = now
            if now - self._lastSeen.get(address, float("-inf")) >= _SEEN_INTERVAL:
                due.append(address)
        self._writeSeen(due)

    def _writeSeen(self, addresses) -> None:
        rows = [(self._seenAt[a], a) for a in addresses if a in self._seenAt]
        if not rows:
            return
        with self._db() as db, db:
            db.executemany("UPDATE pins SET last_seen = ? WHERE address = ?", rows)
        for when, address in rows:
            self._lastSeen[address] = when

    def unseenSince(self, unseenSince: float, keep: str) -> list[tuple[str, str]]:
        """
        @return: the C{(address, fingerprint)} of each pin not seen since
            POSIX time C{unseenSince}, by address, but for address C{keep};
            every use noted is written down first.
        """
        self._writeSeen(list(self._seenAt))
        with self._db() as db:
            return db.execute(
                "SELECT address, fingerprint FROM pins WHERE last_seen < ? AND address != ? ORDER BY address",
                (unseenSince, keep),
            ).fetchall()

    def forget(self, address: str, fingerprint: str) -> None:
        """Remove the pin of C{fingerprint} for C{address}."""
        with self._db() as db, db:
            db.execute("DELETE FROM pins WHERE address = ? AND fingerprint = ?", (address, fingerprint))
        self._pins.pop(address, None)
