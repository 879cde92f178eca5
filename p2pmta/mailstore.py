# -*- test-case-name: tests.test_mailstore -*-
"""
The peer's mailboxes: what the IMAP server shows (paper, section 4.3, steps
7 to 10).

Metadata lives in SQLite (tables C{mail_mailboxes} and C{mail_messages}, WAL
mode), message files in a Maildir (written to C{tmp/}, fsynced, renamed into
C{cur/}).  An index in memory mirrors the database, so every read of
L{IMailStore} is synchronous; every write runs in the threadpool, one at a
time, and updates the index only after its transaction commits, then tells
the listeners.

Every commit survives a killed peer.  What a client is told is safe (an
APPEND, a COPY, an EXPUNGE) and a pulled body (its sender deletes its copy
once told) are also on disk before their Deferred fires; the core's own
additions and flag changes may go with a power cut, the database staying
consistent (it shares its write-ahead log with the ledger, whose later
state follows them).

A received message may be shown before its body is here: L{MailStore.deliver}
without a body file records the exact header section and the size given by
the send notification.  L{MailStore.body} pulls the body through
L{MailStore.bodyFetcher} when a client first needs it.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pmta.errors import BodyUnavailable, StoreError
from p2pmta.fileutil import (
    CHUNK_SIZE,
    AtomicFile,
    ensureDir,
    fsyncDir,
    removeFromFolder,
    removeIfThere,
    removeTempFiles,
)
from p2pmta.interfaces import IMailStore

#: The mailboxes every store has, with their SPECIAL-USE attributes.
DEFAULT_MAILBOXES = (("INBOX", ()), ("Sent", ("\\Sent",)), ("Outbox", ()))

#: The suffix of our Maildir file names (Maildir "info" with no flags: flags
#: live in SQLite).  A crash between writing a file and committing its row
#: may leave a file no row names; it is kept, never deleted at start.
_MAILDIR_SUFFIX = ".p2pmta:2,"

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

#: Pulled bodies up to this size are kept in the database (the table
#: C{mail_bodies}), not each in a file of its own: a group of them is one
#: transaction and one flush, where a file each costs an inode, a flush and
#: two renames (about 1 ms each on a file system that deleted many files
#: lately).  Dovecot's dbox keeps many messages per file for the same reason.
DATABASE_BODY = 256 * 1024

#: The C{filename} of a message whose body is in C{mail_bodies}: no Maildir
#: file is ever named so (see L{MailStore._newName}).
IN_DATABASE = "(database)"


class NoSuchMailbox(StoreError):
    """There is no mailbox of that name."""


class DiskFull(StoreError):
    """The disk holding the mail store is full."""


def _diskFull(failure: Failure):
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


class NoSuchMessage(StoreError):
    """There is no message with that UID in the mailbox."""


class HeaderMismatch(StoreError):
    """The message does not start with the header section it was announced with."""


#: How many bytes of pulled messages may be served from memory while they
#: are written to the Maildir; beyond that a reader waits for the disk.
WRITE_BEHIND_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class MessageRecord:
    """
    What the index knows of one message.

    @ivar uid: Its IMAP UID in its mailbox.
    @ivar flags: Its flags (a L{frozenset} of L{str}, e.g. C{"\\\\Seen"}).
    @ivar internalDate: Its IMAP INTERNALDATE, seconds since the epoch.
    @ivar size: Its RFC822.SIZE in bytes.
    @ivar headers: Its exact header section, the blank line included.
    @ivar held: Whether its whole file is here.
    @ivar meta: The core's own data about it (JSON-able L{dict}); do not
        mutate it, use L{MailStore.updateMeta}.
    """

    uid: int
    flags: frozenset
    internalDate: float
    size: int
    headers: bytes
    held: bool
    meta: dict = field(default_factory=dict, hash=False)


def splitHeaders(message: bytes) -> bytes:
    """
    @return: the header section of C{message}, up to and including the
        blank line that ends it (or all of C{message} if it has none).
    """
    if message.startswith(b"\r\n"):
        return b"\r\n"
    if message.startswith(b"\n"):
        return b"\n"
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    if not ends:
        return message
    end = min(ends)
    return message[: end + (4 if message[end : end + 4] == b"\r\n\r\n" else 2)]


class _Box:
    """
    The index of one mailbox.
    """

    def __init__(self, name: str, attributes, uidValidity: int, uidNext: int) -> None:
        self.name = name
        self.attributes = list(attributes)
        self.uidValidity = uidValidity
        self.uidNext = uidNext
        self.records: dict[int, MessageRecord] = {}
        self.files: dict[int, str] = {}
        self.uids: list[int] = []
        # meta key -> value -> UIDs, for the keys looked up so far
        self._byMeta: dict[str, dict] = {}

    def put(self, record: MessageRecord, filename: str | None) -> None:
        old = self.records.get(record.uid)
        if old is None:
            self.uids.append(record.uid)
            if len(self.uids) > 1 and self.uids[-2] > record.uid:
                self.uids.sort()
        self.records[record.uid] = record
        if old is None or old.meta is not record.meta:
            self._unindex(old)
            self._index(record)
        if filename is None:
            self.files.pop(record.uid, None)
        else:
            self.files[record.uid] = filename

    def remove(self, uids: Iterable[int]) -> None:
        gone = set()
        for uid in uids:
            self._unindex(self.records.pop(uid, None))
            self.files.pop(uid, None)
            gone.add(uid)
        self.uids = [u for u in self.uids if u not in gone]

    def findAll(self, key: str, values) -> dict:
        """
        @return: C{{value: [records, in UID order]}} for those of C{values}
            some record's C{meta[key]} equals.
        """
        index = self._byMeta.get(key)
        if index is None:
            index = self._byMeta[key] = {}
            for uid in self.uids:
                _add(index, self.records[uid].meta, key, uid)
        found = {}
        for value in values:
            try:
                uids = index.get(value)
            except TypeError:  # unhashable: no meta value equals it
                continue
            if uids:
                found[value] = [self.records[u] for u in sorted(uids)]
        return found

    def _index(self, record: MessageRecord) -> None:
        for key, index in self._byMeta.items():
            _add(index, record.meta, key, record.uid)

    def _unindex(self, record: MessageRecord | None) -> None:
        if record is None:
            return
        for key, index in self._byMeta.items():
            try:
                uids = index.get(record.meta.get(key))
            except TypeError:
                continue
            if uids is not None:
                uids.discard(record.uid)
                if not uids:
                    del index[record.meta[key]]


def _add(index: dict, meta: dict, key: str, uid: int) -> None:
    """Index C{uid} under C{meta[key]}, if it has a hashable one."""
    if key not in meta:
        return
    try:
        index.setdefault(meta[key], set()).add(uid)
    except TypeError:
        pass


@implementer(IMailStore)
class MailStore:
    """
    The mailboxes C{INBOX}, C{Sent} and C{Outbox} over SQLite and a Maildir.

    @ivar bodyFetcher: Set by the core: C{bodyFetcher(mailbox, record)}
        returns a Deferred firing with the path of a complete message file
        (which the store then takes over, moving it), or with the message
        as L{bytes} (which the store writes), or failing with
        L{BodyUnavailable}.  L{body} calls it for messages not held.
    @ivar expungeHook: Set by the core: C{expungeHook(mailbox, records)}
        returns a Deferred; it is called before messages are expunged (to
        post receive notifications, or cancel a send).  If it fails the
        failure is logged and the messages are expunged all the same.
    @ivar attachedHook: Set by the core: C{attachedHook(mailbox, record)}
        is called once a body pulled by C{bodyFetcher} is safely in the
        Maildir (the moment to tell its sender it may delete its copy: a
        body that could not be stored, for want of disk space say, must be
        pulled again later).
    @ivar writeBehindBytes: How many bytes of pulled messages (the fetcher's
        L{bytes}) L{body} may serve from memory while they are written; a
        message beyond that is served once it is on disk.
    """

    log = Logger()

    def __init__(
        self, reactor, databasePath: str, maildirPath: str, threadpool
    ) -> None:
        """
        @param reactor: The reactor threadpool results come back on.
        @param databasePath: The SQLite file (it may hold other tables too).
        @param maildirPath: The Maildir; C{tmp/}, C{new/} and C{cur/} are
            created in it (mode 0700).
        @param threadpool: A L{twisted.python.threadpool.ThreadPool} (or
            anything with its C{callInThreadWithCallback}) for SQLite and disk
            work.
        """
        self._reactor = reactor
        self._databasePath = os.path.abspath(databasePath)
        self._maildir = os.path.abspath(maildirPath)
        self._tmp = os.path.join(self._maildir, "tmp")
        self._cur = os.path.join(self._maildir, "cur")
        self._threadpool = threadpool
        self._db: sqlite3.Connection | None = None
        self._dbLock = threading.Lock()
        self._writeLock = DeferredLock()
        self._boxes: dict[str, _Box] = {}
        self._listeners: dict[str, list] = {}
        self._fetching: dict[tuple[str, int], list[Deferred]] = {}
        self._expunging: set[tuple[str, int]] = set()
        self._attaching: list = []  # (box, uid, path or bytes, Deferred) to attach
        self._pendingBodies: dict[tuple[str, int], bytes] = {}  # served while attached
        self._pendingBytes = 0
        self._writeWaiters: dict[tuple[str, int], list[Deferred]] = {}
        self._attachScheduled = False
        self._reading: list = []  # (mailbox, uid, Deferred): bodies to read from the database
        self.bodyFetcher: Callable[[str, MessageRecord], Deferred] | None = None
        self.expungeHook: Callable[[str, list], Deferred] | None = None
        self.attachedHook: Callable[[str, MessageRecord], object] | None = None
        self.writeBehindBytes = WRITE_BEHIND_BYTES

    # -- plumbing --------------------------------------------------------

    def runInThread(self, f, *args) -> Deferred:
        """
        Run C{f(*args)} in the store's threadpool: for read-only disk work
        on message files by the front ends (MIME parsing, body search).
        """
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def _change(self, f, *args) -> Deferred:
        """
        Run C{f(*args)}, which writes, in the threadpool; a full disk (or
        quota) fails it with L{DiskFull}.
        """
        return self.runInThread(f, *args).addErrback(_diskFull)

    def _write(self, f, *args) -> Deferred:
        """
        Run the write C{f(*args)} in the threadpool, after every earlier
        write has finished.
        """
        return self._writeLock.run(self.runInThread, f, *args)

    def _transaction(self, statements: Iterable[tuple[str, tuple]], durable: bool = False) -> None:
        """
        Run C{statements} in one transaction (in a thread).

        @param durable: have the commit on disk, not just in the OS, when
            this returns (C{synchronous=FULL} for this commit): for what a
            client is told is safe.  Any commit survives a killed peer; one
            that is not durable may be lost with the later ones to a power
            cut, the database staying consistent.
        """
        with self._dbLock:
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

    def _box(self, mailbox: str) -> _Box:
        if isinstance(mailbox, str) and mailbox.upper() == "INBOX":
            mailbox = "INBOX"
        box = self._boxes.get(mailbox)
        if box is None:
            raise NoSuchMailbox(mailbox)
        return box

    def _notify(self, mailbox: str, event: str, uids: Iterable[int]) -> None:
        for uid in uids:
            for listener in list(self._listeners.get(mailbox, ())):
                try:
                    listener(event, uid)
                except Exception:
                    self.log.failure("mailbox listener failed on {event}", event=event)

    def filePath(self, mailbox: str, uid: int) -> str | None:
        """
        @return: the path of the file of a held message, or L{None} (not
            held, or held in the database: see L{bodySource}).
        """
        name = self._box(mailbox).files.get(uid)
        return None if name is None or name == IN_DATABASE else os.path.join(self._cur, name)

    def bodySource(self, mailbox: str, uid: int):
        """
        Where a held message is, for a reader in a thread: the path of its
        file, or for one held in the database a callable returning its
        L{bytes} (blocking; L{OSError} if it is gone meanwhile); L{None} if
        it is not held.
        """
        box = self._box(mailbox)
        name = box.files.get(uid)
        if name == IN_DATABASE:
            return lambda: self._readBody(box.name, uid)
        return None if name is None else os.path.join(self._cur, name)

    def _readBody(self, mailbox: str, uid: int) -> bytes:
        """The body of a message held in the database (blocking)."""
        [body] = self._readBodies([(mailbox, uid)])
        if body is None:
            raise FileNotFoundError(f"no body of {mailbox} {uid}")
        return body

    def _readBodies(self, keys: list) -> list:
        """The bodies of C{keys} held in the database, L{None} for one gone (blocking)."""
        sql = "SELECT body FROM mail_bodies WHERE mailbox = ? AND uid = ?"
        with self._dbLock:
            db = self._db
            if db is None:
                raise StoreError("the mail store is closed")
            rows = [db.execute(sql, key).fetchone() for key in keys]
        return [None if row is None else bytes(row[0]) for row in rows]

    def _bodyFromDatabase(self, mailbox: str, uid: int) -> Deferred:
        """
        The body of a message held in the database: those asked for in one
        turn of the reactor (a FETCH of many) are read in one thread call.
        """
        d: Deferred = Deferred()
        self._reading.append((mailbox, uid, d))
        if len(self._reading) == 1:
            self._reactor.callLater(0, self._readQueued)
        return d

    def _readQueued(self) -> None:
        queued, self._reading = self._reading, []

        def read(bodies: list) -> None:
            for (mailbox, uid, d), body in zip(queued, bodies):
                if body is None:
                    d.errback(BodyUnavailable(f"message {uid} of {mailbox} is gone"))
                else:
                    d.callback(body)

        def failed(failure: Failure) -> None:
            for _, _, d in queued:
                d.errback(failure)

        self.runInThread(self._readBodies, [(mailbox, uid) for mailbox, uid, _ in queued]).addCallbacks(read, failed)

    # -- opening ---------------------------------------------------------

    def open(self) -> Deferred:
        """
        Create what is missing and load the index, in a thread.

        @return: a Deferred firing with this store.
        """
        return self._write(self._open).addCallback(self._opened)

    def _open(self):
        for sub in ("tmp", "new", "cur"):
            ensureDir(os.path.join(self._maildir, sub), 0o700)
        removeTempFiles(self._tmp)
        db = sqlite3.connect(
            self._databasePath, check_same_thread=False, isolation_level=None
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.isolation_level = ""
        with db:
            now = int(time.time())
            for name, _ in DEFAULT_MAILBOXES:
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
                else not os.path.isfile(os.path.join(self._cur, row[6]))
            )
        ]
        if missing:
            with db:
                db.executemany(
                    "UPDATE mail_messages SET filename = NULL "
                    "WHERE mailbox = ? AND uid = ?",
                    missing,
                )
        self._db = db
        return boxes, rows, set(missing)

    def _opened(self, result):
        boxes, rows, missing = result
        known = {name: (validity, uidNext) for name, validity, uidNext in boxes}
        for name, attributes in DEFAULT_MAILBOXES:
            self._boxes[name] = _Box(name, attributes, *known[name])
        for mailbox, uid, flags, date, size, headers, filename, meta in rows:
            box = self._boxes.get(mailbox)
            if box is None:
                continue
            if (mailbox, uid) in missing:
                filename = None
            flags = frozenset(json.loads(flags))
            held, meta = filename is not None, json.loads(meta)
            box.put(
                MessageRecord(uid, flags, date, size, bytes(headers), held, meta),
                filename,
            )
        if missing:
            self.log.warn(
                "mail store: {missing} message files are missing; their bodies "
                "will be pulled again",
                missing=len(missing),
            )
        return self

    def close(self) -> Deferred:
        """
        Close the database once the writes under way are done.
        """
        return self._write(self._close)

    def _close(self) -> None:
        with self._dbLock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- IMailStore reads -----------------------------------------------

    def mailboxNames(self) -> list:
        return [(box.name, list(box.attributes)) for box in self._boxes.values()]

    def uidValidity(self, mailbox: str) -> int:
        return self._box(mailbox).uidValidity

    def uidNext(self, mailbox: str) -> int:
        return self._box(mailbox).uidNext

    def messages(self, mailbox: str) -> list:
        box = self._box(mailbox)
        return [box.records[uid] for uid in box.uids]

    def uids(self, mailbox: str) -> list:
        """
        @return: the UIDs of C{mailbox}, ascending (a copy).
        """
        return list(self._box(mailbox).uids)

    def record(self, mailbox: str, uid: int) -> MessageRecord | None:
        return self._box(mailbox).records.get(uid)

    def findByMeta(self, mailbox: str, key: str, value) -> list:
        """
        @return: the records of C{mailbox} whose C{meta[key] == value}, in
            UID order.
        """
        return self._box(mailbox).findAll(key, [value]).get(value, [])

    def findAllByMeta(self, mailbox: str, key: str, values) -> dict:
        """
        L{findByMeta} for several values in one pass over the mailbox.

        @return: C{{value: [records]}} for the values found.
        """
        return self._box(mailbox).findAll(key, set(values))

    def addListener(self, mailbox: str, listener) -> None:
        self._listeners.setdefault(self._box(mailbox).name, []).append(listener)

    def removeListener(self, mailbox: str, listener) -> None:
        listeners = self._listeners.get(self._box(mailbox).name, [])
        if listener in listeners:
            listeners.remove(listener)

    # -- writing files ----------------------------------------------------

    def _newName(self) -> str:
        return f"{int(time.time())}.{uuid.uuid4().hex}{_MAILDIR_SUFFIX}"

    def _intoMaildir(self, name: str, tempPath: str, syncDir: bool = True) -> None:
        """
        Rename the fsynced C{tempPath} (in C{tmp/}) to C{cur/name}.
        """
        os.replace(tempPath, os.path.join(self._cur, name))
        if syncDir:
            fsyncDir(self._cur)

    def _writeMessage(self, data: bytes, sync: bool = True) -> str:
        """
        Write C{data} into the Maildir, through C{tmp/} (the file flushed).

        @param sync: flush the folders too (pass L{False} when the caller
            flushes C{cur/}, once for several files).
        @return: its name in C{cur/}.
        """
        name = self._newName()
        with AtomicFile(self._tmp, 0o600) as f:
            f.write(data)
            f.commit(os.path.join(self._tmp, name), sync)
        self._intoMaildir(name, os.path.join(self._tmp, name), sync)
        return name

    def _takeFile(
        self, path: str, headers: bytes, syncDir: bool = True, syncFile: bool = True
    ) -> tuple[str, int]:
        """
        Move the file at C{path} into the Maildir if it starts with exactly
        C{headers}.  On failure it is left at C{path}.

        @param syncDir: fsync C{cur/} (pass L{False} when the caller does,
            once for several files).
        @param syncFile: fsync the file (pass L{False} for one the caller
            has flushed to disk already).
        @return: its name in C{cur/} and its size.
        """
        with open(path, "rb") as f:
            if f.read(len(headers)) != headers:
                raise HeaderMismatch(path)
            st = os.fstat(f.fileno())
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(f.fileno(), 0o600)
            if syncFile:
                os.fsync(f.fileno())
        name = self._newName()
        # The file is whole already: straight into cur/, not through tmp/.
        try:
            os.rename(path, os.path.join(self._cur, name))
        except OSError:
            temp = os.path.join(self._tmp, name)
            with open(path, "rb") as source, AtomicFile(self._tmp, 0o600) as f:
                while chunk := source.read(CHUNK_SIZE):
                    f.write(chunk)
                f.commit(temp)
            size = os.stat(temp).st_size
            try:
                self._intoMaildir(name, temp, syncDir)
            except BaseException:
                os.unlink(temp)
                raise
            os.unlink(path)
            return name, size
        if syncDir:
            fsyncDir(self._cur)
        return name, st.st_size

    def _takeBytes(self, data: bytes, headers: bytes) -> tuple[str, int]:
        """
        Write the message C{data} into the Maildir (through C{tmp/}, flushed)
        if it starts with exactly C{headers}; C{cur/} is not flushed.  One
        of at most L{DATABASE_BODY} bytes is left to the caller to put in
        the database.

        @return: its name in C{cur/} (or L{IN_DATABASE}) and its size.
        """
        if not data.startswith(headers):
            raise HeaderMismatch("the pulled message")
        if len(data) <= DATABASE_BODY:
            return IN_DATABASE, len(data)
        return self._writeMessage(data, sync=False), len(data)

    def _removeFiles(self, names: Iterable[str]) -> None:
        removeFromFolder(self._cur, [name for name in names if name != IN_DATABASE])

    # -- adding messages --------------------------------------------------

    _INSERT = "INSERT INTO mail_messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    _COPY_BODY = (
        "INSERT OR REPLACE INTO mail_bodies (mailbox, uid, body)"
        " SELECT ?, ?, body FROM mail_bodies WHERE mailbox = ? AND uid = ?"
    )
    # Only for a message still there: one expunged meanwhile leaves no body.
    _PUT_BODY = (
        "INSERT OR REPLACE INTO mail_bodies (mailbox, uid, body)"
        " SELECT mailbox, uid, ? FROM mail_messages WHERE mailbox = ? AND uid = ?"
    )
    _UIDNEXT = "UPDATE mail_mailboxes SET uidnext = ? WHERE name = ?"

    def _insert(self, box: _Box, records: list, filenames: list, durable: bool = False, more=()) -> None:
        statements = [
            (self._INSERT, (box.name, r.uid, json.dumps(sorted(r.flags)), r.internalDate,
                            r.size, r.headers, name, json.dumps(r.meta)))
            for r, name in zip(records, filenames)
        ]  # fmt: skip
        statements.append((self._UIDNEXT, (records[-1].uid + 1, box.name)))
        statements += more
        try:
            self._transaction(statements, durable)
        except BaseException:
            self._removeFiles(f for f in filenames if f is not None)
            raise

    def _added(self, box: _Box, records: list, filenames: list) -> list:
        for record, filename in zip(records, filenames):
            box.put(record, filename)
        box.uidNext = max(box.uidNext, records[-1].uid + 1)
        self._notify(box.name, "added", [r.uid for r in records])
        return [r.uid for r in records]

    def _addOne(self, mailbox, headers, flags, date, meta, makeFile, durable=False) -> Deferred:
        """
        Add one message; C{makeFile()} (run in the threadpool) puts its file
        in C{cur/} and returns its name (or L{None}) and its size.

        @param durable: see L{_transaction}.
        """
        try:
            box = self._box(mailbox)
            headers = bytes(headers)
            flags = frozenset(str(f) for f in flags)
            meta = json.loads(json.dumps(meta))
        except Exception:
            return fail()
        when = time.time() if date is None else float(date)

        def work(uid: int) -> tuple[list, list]:
            filename, size = makeFile()
            record = MessageRecord(
                uid, flags, when, size, headers, filename is not None, meta
            )
            self._insert(box, [record], [filename], durable)
            return [record], [filename]

        return self._writeLock.run(
            lambda: self._change(work, box.uidNext).addCallback(
                lambda r: self._added(box, *r)[0]
            )
        )

    def deliver(self, mailbox: str, headers: bytes, size: int, meta: dict,
                bodyPath: str | None = None, flags=(), date: float | None = None,
                ) -> Deferred:  # fmt: skip
        """
        Add a message: shown by its C{headers} alone when C{bodyPath} is
        L{None}, else the file at C{bodyPath} (which must start with
        C{headers}) is moved in and its real size is kept.

        @param headers: The exact header section, blank line included.
        @param size: Its RFC822.SIZE, as announced.
        @param meta: The core's data about it (JSON-able).
        @param flags: Its initial flags.
        @param date: Its INTERNALDATE (seconds since the epoch), now if
            L{None}.

        @return: a Deferred firing with its UID.
        """

        def makeFile():
            if bodyPath is None:
                return None, int(size)
            return self._takeFile(os.fspath(bodyPath), bytes(headers))

        return self._addOne(mailbox, headers, flags, date, meta, makeFile)

    def deliverMany(self, mailbox: str, messages) -> Deferred:
        """
        Add several messages at once, as L{deliver} would one by one, in
        one transaction (and one directory sync): all are added, or none.

        @param messages: dicts with the keyword arguments of L{deliver}:
            C{headers}, C{size}, C{meta} and optionally C{bodyPath},
            C{flags}, C{date}; and C{synced}, true when the file at
            C{bodyPath} is on disk already (a second name for a file the
            caller flushed): then only its new name is flushed.
        @return: a Deferred firing with their UIDs, in order.
        """
        try:
            box = self._box(mailbox)
            now = time.time()
            prepared = [
                (
                    bytes(m["headers"]),
                    int(m["size"]),
                    json.loads(json.dumps(m["meta"])),
                    None if m.get("bodyPath") is None else os.fspath(m["bodyPath"]),
                    frozenset(str(f) for f in m.get("flags", ())),
                    now if m.get("date") is None else float(m["date"]),
                    bool(m.get("synced", False)),
                )
                for m in messages
            ]
        except Exception:
            return fail()
        if not prepared:
            return succeed([])

        def work(first: int) -> tuple[list, list]:
            records, names = [], []
            try:
                for offset, (headers, size, meta, bodyPath, flags, when, synced) in enumerate(prepared):
                    name = None
                    if bodyPath is not None:
                        name, size = self._takeFile(bodyPath, headers, syncDir=False, syncFile=not synced)
                    names.append(name)
                    records.append(MessageRecord(first + offset, flags, when, size, headers, name is not None, meta))
                if any(name is not None for name in names):
                    fsyncDir(self._cur)
                self._insert(box, records, names)
            except BaseException:
                self._removeFiles(name for name in names if name is not None)
                raise
            return records, names

        return self._writeLock.run(
            lambda: self.runInThread(work, box.uidNext).addCallback(lambda r: self._added(box, *r))
        )

    def append(self, mailbox: str, message: bytes, flags=(), date=None) -> Deferred:
        """
        Store a complete message (IMAP APPEND, or a sent message).

        @return: a Deferred firing with its UID.
        """
        message = bytes(message)
        return self._addOne(
            mailbox, splitHeaders(message), flags, date, {},
            lambda: (self._writeMessage(message), len(message)), durable=True,
        )  # fmt: skip

    def copy(self, source: str, uids: Iterable[int], destination: str) -> Deferred:
        """
        Copy messages (IMAP COPY): flags, dates, headers and C{meta} are
        copied; a held file is hard-linked (or copied); a message not held
        stays not held in both mailboxes, so the core may see two records
        with the same C{meta}.

        @return: a Deferred firing with a list of C{(sourceUid, newUid)}.
        """
        try:
            src, dst = self._box(source), self._box(destination)
        except Exception:
            return fail()
        uids = sorted(set(uids))

        def work(first: int, records: list, files: list):
            copies, names, bodies = [], [], []
            try:
                for i, (record, filename) in enumerate(zip(records, files)):
                    name = None
                    if filename == IN_DATABASE:
                        name = IN_DATABASE
                        bodies.append((self._COPY_BODY, (dst.name, first + i, src.name, record.uid)))
                    elif filename is not None:
                        name = self._newName()
                        old = os.path.join(self._cur, filename)
                        try:
                            os.link(old, os.path.join(self._cur, name))
                        except OSError:
                            with open(old, "rb") as f:
                                self._writeMessageFrom(f, name)
                    names.append(name)
                    copies.append(
                        replace(record, uid=first + i, meta=dict(record.meta))
                    )
                fsyncDir(self._cur)
            except BaseException:
                self._removeFiles(n for n in names if n is not None)
                raise
            self._insert(dst, copies, names, durable=True, more=bodies)
            return copies, names

        def start():
            records = [src.records[u] for u in uids if u in src.records]
            if not records:
                return succeed([])
            files = [src.files.get(r.uid) for r in records]
            d = self._change(work, dst.uidNext, records, files)
            d.addCallback(
                lambda r: list(zip([x.uid for x in records], self._added(dst, *r)))
            )
            return d

        return self._writeLock.run(start)

    def _writeMessageFrom(self, source, name: str) -> None:
        with AtomicFile(self._tmp, 0o600) as f:
            while chunk := source.read(CHUNK_SIZE):
                f.write(chunk)
            f.commit(os.path.join(self._tmp, name))
        self._intoMaildir(name, os.path.join(self._tmp, name))

    # -- changing messages ------------------------------------------------

    def attachBody(self, mailbox: str, uid: int, path: str) -> Deferred:
        """
        Move the complete message file at C{path} in as the body of a
        message shown by its headers only.  The file must start with exactly
        the stored header section; its real size replaces the announced one.

        Bodies attached while an earlier write runs are moved in together:
        each file is flushed, then C{cur/} once and one durable commit
        serve them all.

        @return: a Deferred firing with the stored file's path once it is
            on disk, or failing with L{HeaderMismatch} (the file is left
            where it is), L{NoSuchMessage}, L{StoreError} (already held)
            or L{DiskFull}.
        """
        try:
            box = self._box(mailbox)
        except Exception:
            return fail()
        return self._queueAttach(box, uid, os.fsdecode(path))

    def attachData(self, mailbox: str, uid: int, data: bytes) -> Deferred:
        """
        L{attachBody} for a message held in memory: C{data} is written into
        the Maildir (with the bodies attached together), and must start
        with exactly the stored header section.

        @return: as L{attachBody}'s; on L{HeaderMismatch} nothing is kept.
        """
        try:
            box = self._box(mailbox)
        except Exception:
            return fail()
        return self._queueAttach(box, uid, bytes(data))

    def _queueAttach(self, box: _Box, uid: int, source) -> Deferred:
        d: Deferred = Deferred()
        self._attaching.append((box, uid, source, d))
        if not self._attachScheduled:
            self._attachScheduled = True
            self._writeLock.run(self._attachQueued)
        return d

    def _attachQueued(self) -> Deferred:
        """
        Attach the bodies queued by L{attachBody} and L{attachData} so far,
        in one thread call
        (under the write lock).
        """
        self._attachScheduled = False
        queued, self._attaching = self._attaching, []
        jobs, taken = [], set()
        for box, uid, path, d in queued:
            record = box.records.get(uid)
            if record is None:
                d.errback(NoSuchMessage(f"{box.name} {uid}"))
            elif record.held or (box.name, uid) in taken:
                d.errback(StoreError(f"{box.name} {uid} already has its body"))
            else:
                taken.add((box.name, uid))
                jobs.append((box, record, path, d))
        if not jobs:
            return succeed(None)

        def work() -> list:
            results, names = [], []
            for box, record, source, _ in jobs:
                try:
                    if isinstance(source, bytes):
                        name, size = self._takeBytes(source, record.headers)
                    else:
                        name, size = self._takeFile(source, record.headers, syncDir=False)
                except Exception:
                    results.append(Failure())
                else:
                    results.append((name, size))
                    names.append(name)
            if names:
                sql = "UPDATE mail_messages SET filename = ?, size = ? WHERE mailbox = ? AND uid = ?"
                statements = []
                for (box, record, source, _), result in zip(jobs, results):
                    if isinstance(result, Failure):
                        continue
                    if result[0] == IN_DATABASE:
                        statements.append((self._PUT_BODY, (source, box.name, record.uid)))
                    statements.append((sql, (result[0], result[1], box.name, record.uid)))
                try:
                    if any(name != IN_DATABASE for name in names):
                        fsyncDir(self._cur)
                    self._transaction(statements, durable=True)
                except BaseException:
                    self._removeFiles(names)
                    raise
            return results

        def done(results: list):
            orphans = []
            for (box, record, source, d), result in zip(jobs, results):
                if isinstance(result, Failure):
                    fail(result).addErrback(_diskFull).chainDeferred(d)
                    continue
                name, size = result
                current = box.records.get(record.uid)
                if current is None:
                    # Expunged while its body was moved in (the expunge
                    # took the lock first, but left the index after this
                    # began): its file goes too, and it stays expunged.
                    orphans.append(name)
                    d.errback(NoSuchMessage(f"{box.name} {record.uid}"))
                    continue
                if size != record.size:
                    self.log.warn(
                        "message {uid} in {mailbox} is {size} bytes, {announced} announced",
                        uid=record.uid,
                        mailbox=box.name,
                        size=size,
                        announced=record.size,
                    )
                box.put(replace(current, held=True, size=size), name)
                d.callback(source if name == IN_DATABASE else os.path.join(self._cur, name))
            if orphans:
                # Still under the write lock: no later write sees them.
                return self.runInThread(self._removeFiles, orphans).addErrback(
                    lambda f: self.log.failure("removing the bodies of expunged messages failed", f)
                )
            return None

        def failed(failure: Failure) -> None:
            for _, _, _, d in jobs:
                d.errback(failure)

        return self._change(work).addCallbacks(done, failed)

    def updateMeta(self, mailbox: str, uid: int, meta: dict) -> Deferred:
        """
        Update a message's C{meta} like L{dict.update}.

        @return: a Deferred firing with the new meta.
        """
        try:
            box = self._box(mailbox)
            json.dumps(meta)
        except Exception:
            return fail()

        def start():
            record = box.records.get(uid)
            if record is None:
                return fail(NoSuchMessage(f"{box.name} {uid}"))
            new = {**record.meta, **meta}
            sql = "UPDATE mail_messages SET meta = ? WHERE mailbox = ? AND uid = ?"
            d = self._change(
                self._transaction, [(sql, (json.dumps(new), box.name, uid))]
            )

            def done(_):
                current = box.records.get(uid)
                if current is not None:
                    box.put(replace(current, meta=new), box.files.get(uid))
                return new

            return d.addCallback(done)

        return self._writeLock.run(start)

    def setFlags(self, mailbox: str, uids, flags, mode: str) -> Deferred:
        try:
            box = self._box(mailbox)
            flags = frozenset(str(f) for f in flags)
            if mode not in ("set", "add", "remove"):
                raise ValueError(f"bad flag mode {mode!r}")
        except Exception:
            return fail()
        uids = list(uids)

        def start():
            result, changed = {}, {}
            for uid in uids:
                record = box.records.get(uid)
                if record is None:
                    continue
                if mode == "set":
                    new = flags
                elif mode == "add":
                    new = record.flags | flags
                else:
                    new = record.flags - flags
                result[uid] = new
                if new != record.flags:
                    changed[uid] = new
            if not changed:
                return succeed(result)
            sql = "UPDATE mail_messages SET flags = ? WHERE mailbox = ? AND uid = ?"
            statements = [
                (sql, (json.dumps(sorted(f)), box.name, u)) for u, f in changed.items()
            ]

            def done(_):
                for uid, new in changed.items():
                    current = box.records.get(uid)
                    if current is not None:
                        box.records[uid] = replace(current, flags=new)
                self._notify(box.name, "flags", list(changed))
                return result

            return self._change(self._transaction, statements).addCallback(done)

        return self._writeLock.run(start)

    def expunge(self, mailbox: str, uids) -> Deferred:
        try:
            box = self._box(mailbox)
        except Exception:
            return fail()
        records = [
            box.records[u]
            for u in sorted(set(uids))
            if u in box.records and (box.name, u) not in self._expunging
        ]
        if not records:
            return succeed([])
        keys = [(box.name, r.uid) for r in records]
        self._expunging.update(keys)
        hook = self.expungeHook
        d = (
            maybeDeferred(hook, box.name, list(records))
            if hook is not None
            else succeed(None)
        )
        d.addErrback(
            lambda f: self.log.failure(
                "expunge hook failed for {mailbox}", f, mailbox=box.name
            )
        )

        def work(uids: list, names: list):
            sql = "DELETE FROM mail_messages WHERE mailbox = ? AND uid = ?"
            bodies = "DELETE FROM mail_bodies WHERE mailbox = ? AND uid = ?"
            self._transaction([(sql, (box.name, u)) for u in uids] + [(bodies, (box.name, u)) for u in uids], durable=True)
            self._removeFiles(names)

        def start():
            uids = [r.uid for r in records if r.uid in box.records]
            names = [box.files[u] for u in uids if u in box.files]
            return self._change(work, uids, names).addCallback(lambda _: uids)

        def done(removed: list):
            box.remove(removed)
            self._notify(box.name, "expunged", removed)
            return removed

        def cleanup(result):
            self._expunging.difference_update(keys)
            return result

        d.addCallback(lambda _: self._writeLock.run(start))
        d.addCallback(done)
        d.addBoth(cleanup)
        return d

    # -- bodies -----------------------------------------------------------

    def body(self, mailbox: str, uid: int) -> Deferred:
        """
        C{IMailStore.body}: the path of the message's file; or its L{bytes},
        for one just pulled and still being written (see
        L{writeBehindBytes}) or one held in the database (see
        L{DATABASE_BODY}).
        """
        try:
            box = self._box(mailbox)
        except Exception:
            return fail()
        record = box.records.get(uid)
        if record is None:
            return fail(BodyUnavailable(f"no message {uid} in {box.name}"))
        if record.held:
            name = box.files[uid]
            if name == IN_DATABASE:
                return self._bodyFromDatabase(box.name, uid)
            return succeed(os.path.join(self._cur, name))
        key = (box.name, uid)
        pending = self._pendingBodies.get(key)
        if pending is not None:
            return succeed(pending)
        waiter: Deferred = Deferred()
        waiters = self._fetching.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._fetching[key] = [waiter]
        self._pull(box, record).addBoth(self._pulled, key)
        return waiter

    def written(self, mailbox: str, uids) -> Deferred:
        """
        Wait until the bodies of C{uids} that L{body} served from memory
        are written (or have failed to be: then the next L{body} pulls
        again).  A front end answers OK only then, so that a client told a
        message was had never has it taken by a crash unnoticed.

        @return: a Deferred firing with L{None}.
        """
        try:
            name = self._box(mailbox).name
        except NoSuchMailbox:
            return succeed(None)
        waiters = []
        for uid in uids:
            key = (name, uid)
            if key in self._pendingBodies:
                waiter: Deferred = Deferred()
                self._writeWaiters.setdefault(key, []).append(waiter)
                waiters.append(waiter)
        return DeferredList(waiters).addCallback(lambda _: None)

    def _pull(self, box: _Box, record: MessageRecord) -> Deferred:
        fetcher = self.bodyFetcher
        if fetcher is None:
            return fail(BodyUnavailable("nothing can pull message bodies"))
        key = (box.name, record.uid)

        def attach(pulled):
            if not isinstance(pulled, bytes):
                path = os.fsdecode(pulled)
                d = self.attachBody(box.name, record.uid, path)
                return d.addCallbacks(attached, refused, errbackArgs=(path,))
            if not pulled.startswith(record.headers):
                return refused(Failure(HeaderMismatch("the pulled message")))
            d = self.attachData(box.name, record.uid, pulled)
            if self._pendingBytes + len(pulled) > self.writeBehindBytes:
                return d.addCallbacks(attached, refused).addCallback(lambda _: pulled)
            # Served from memory while it is written: the sender is told
            # (attachedHook) only once it is on disk.
            self._pendingBodies[key] = pulled
            self._pendingBytes += len(pulled)
            d.addCallbacks(attached, unwritten)
            d.addBoth(settled, len(pulled))
            return pulled

        def refused(f: Failure, path: str | None = None):
            if path is not None:
                removeIfThere(path)
            if f.check(HeaderMismatch):
                self.log.warn(
                    "pulled message {uid} in {mailbox} does not match its notification",
                    uid=record.uid,
                    mailbox=box.name,
                )
                raise BodyUnavailable("the message pulled does not match its notification")
            if f.check(NoSuchMessage):
                raise BodyUnavailable("the message was expunged")
            return f

        def attached(stored: str) -> str:
            hook = self.attachedHook
            if hook is not None:
                try:
                    hook(box.name, record)
                except Exception:
                    self.log.failure("the attached hook failed for {uid}", uid=record.uid)
            return stored

        def unwritten(f: Failure) -> None:
            # Its reader has the message already; the next one pulls again.
            if not f.check(NoSuchMessage):
                self.log.warn(
                    "could not store the body of message {uid} of {mailbox}: {why}",
                    uid=record.uid,
                    mailbox=box.name,
                    why=f.getErrorMessage(),
                )

        def settled(_, size: int) -> None:
            if self._pendingBodies.pop(key, None) is not None:
                self._pendingBytes -= size
            for waiter in self._writeWaiters.pop(key, []):
                waiter.callback(None)

        return maybeDeferred(fetcher, box.name, record).addCallback(attach)

    def _pulled(self, result, key) -> None:
        waiters = self._fetching.pop(key, [])
        if isinstance(result, Failure) and result.check(DiskFull):
            self.log.warn(
                "no room to store the body of message {uid} of {mailbox}",
                uid=key[1],
                mailbox=key[0],
            )
            result = Failure(BodyUnavailable(str(result.value)))
        if isinstance(result, Failure) and not result.check(BodyUnavailable):
            self.log.failure(
                "pulling message {uid} of {mailbox} failed",
                result,
                uid=key[1],
                mailbox=key[0],
            )
            result = Failure(BodyUnavailable(str(result.value)))
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
