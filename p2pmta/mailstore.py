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

L{MailStore} resolves mailbox names, runs the writes one at a time and
tells the listeners; it holds the parts that do the rest: the index
(L{p2pmta.mailindex}), the SQLite tables (L{p2pmta.maildb}), the Maildir
(L{p2pmta.maildir}), and the bodies read, pulled and attached
(L{p2pmta.mailbodies}).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta.errors import (
    DiskFull,
    HeaderMismatch,
    NoSuchMailbox,
    NoSuchMessage,
)
from p2pmta.interfaces import IMailStore
from p2pmta.mailbodies import MessageBodies
from p2pmta.maildb import MailDatabase, translateDiskFull
from p2pmta.maildir import IN_DATABASE, Maildir
from p2pmta.mailindex import MailboxIndex, MessageRecord, splitHeaders

__all__ = [
    "DEFAULT_MAILBOXES",
    "WRITE_BEHIND_BYTES",
    "DiskFull",
    "HeaderMismatch",
    "MailStore",
    "MessageRecord",
    "NoSuchMailbox",
    "NoSuchMessage",
    "splitHeaders",
]

#: The mailboxes every store has, with their SPECIAL-USE attributes.
DEFAULT_MAILBOXES = (("INBOX", ()), ("Sent", ("\\Sent",)), ("Outbox", ()))

#: How many bytes of pulled messages may be served from memory while they
#: are written to the Maildir; beyond that a reader waits for the disk.
WRITE_BEHIND_BYTES = 32 * 1024 * 1024


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
        self._database = MailDatabase(os.path.abspath(databasePath))
        self._maildir = os.path.abspath(maildirPath)
        self._files = Maildir(self._maildir)
        self._threadpool = threadpool
        self._writeLock = DeferredLock()
        self._boxes: dict[str, MailboxIndex] = {}
        self._listeners: dict[str, list] = {}
        self._expunging: set[tuple[str, int]] = set()
        self._bodies = MessageBodies(self, reactor, self._database, self._files, self._writeLock)
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
        return self.runInThread(f, *args).addErrback(translateDiskFull)

    def _write(self, f, *args) -> Deferred:
        """
        Run the write C{f(*args)} in the threadpool, after every earlier
        write has finished.
        """
        return self._writeLock.run(self.runInThread, f, *args)

    def _box(self, mailbox: str) -> MailboxIndex:
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
        return None if name is None or name == IN_DATABASE else self._files.filePath(name)

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
            return lambda: self._database.readBody(box.name, uid)
        return None if name is None else self._files.filePath(name)

    # -- opening ---------------------------------------------------------

    def open(self) -> Deferred:
        """
        Create what is missing and load the index, in a thread.

        @return: a Deferred firing with this store.
        """
        return self._write(self._open).addCallback(self._opened)

    def _open(self):
        self._files.create()
        return self._database.open([name for name, _ in DEFAULT_MAILBOXES], self._files.holds)

    def _opened(self, result):
        boxes, rows, missing = result
        known = {name: (validity, uidNext) for name, validity, uidNext in boxes}
        for name, attributes in DEFAULT_MAILBOXES:
            self._boxes[name] = MailboxIndex(name, attributes, *known[name])
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
        return self._write(self._database.close)

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

    # -- adding messages --------------------------------------------------

    _INSERT = "INSERT INTO mail_messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    _COPY_BODY = (
        "INSERT OR REPLACE INTO mail_bodies (mailbox, uid, body)"
        " SELECT ?, ?, body FROM mail_bodies WHERE mailbox = ? AND uid = ?"
    )
    _UIDNEXT = "UPDATE mail_mailboxes SET uidnext = ? WHERE name = ?"

    def _insert(self, box: MailboxIndex, records: list, filenames: list, durable: bool = False, more=()) -> None:
        statements = [
            (self._INSERT, (box.name, r.uid, json.dumps(sorted(r.flags)), r.internalDate,
                            r.size, r.headers, name, json.dumps(r.meta)))
            for r, name in zip(records, filenames)
        ]  # fmt: skip
        statements.append((self._UIDNEXT, (records[-1].uid + 1, box.name)))
        statements += more
        try:
            self._database.transaction(statements, durable)
        except BaseException:
            self._files.removeFiles(f for f in filenames if f is not None)
            raise

    def _added(self, box: MailboxIndex, records: list, filenames: list) -> list:
        for record, filename in zip(records, filenames):
            box.put(record, filename)
        box.uidNext = max(box.uidNext, records[-1].uid + 1)
        self._notify(box.name, "added", [r.uid for r in records])
        return [r.uid for r in records]

    def _addOne(self, mailbox, headers, flags, date, meta, makeFile, durable=False) -> Deferred:
        """
        Add one message; C{makeFile()} (run in the threadpool) puts its file
        in C{cur/} and returns its name (or L{None}) and its size.

        @param durable: see L{MailDatabase.transaction}.
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
            return self._files.takeFile(os.fspath(bodyPath), bytes(headers))

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
                        name, size = self._files.takeFile(bodyPath, headers, syncDir=False, syncFile=not synced)
                    names.append(name)
                    records.append(MessageRecord(first + offset, flags, when, size, headers, name is not None, meta))
                if any(name is not None for name in names):
                    self._files.sync()
                self._insert(box, records, names)
            except BaseException:
                self._files.removeFiles(name for name in names if name is not None)
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
            lambda: (self._files.writeMessage(message), len(message)), durable=True,
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
                        name = self._files.copyFile(filename)
                    names.append(name)
                    copies.append(
                        replace(record, uid=first + i, meta=dict(record.meta))
                    )
                self._files.sync()
            except BaseException:
                self._files.removeFiles(n for n in names if n is not None)
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
        return self._bodies.attach(box, uid, os.fsdecode(path))

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
        return self._bodies.attach(box, uid, bytes(data))

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
                self._database.transaction, [(sql, (json.dumps(new), box.name, uid))]
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

            return self._change(self._database.transaction, statements).addCallback(done)

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
            self._database.transaction([(sql, (box.name, u)) for u in uids] + [(bodies, (box.name, u)) for u in uids], durable=True)
            self._files.removeFiles(names)

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
        L{p2pmta.maildir.DATABASE_BODY}).
        """
        try:
            box = self._box(mailbox)
        except Exception:
            return fail()
        return self._bodies.body(box, uid)

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
        return self._bodies.written(name, uids)
