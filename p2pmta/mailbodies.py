# -*- test-case-name: tests.test_mailbodies -*-
"""
The bodies of the mail store's messages: serving them to the front ends,
pulling those not held yet, and attaching pulled bodies to their messages.

A received message may be shown by its headers alone.  When a client first
needs its body, L{MessageBodies.body} pulls it through the store's
C{bodyFetcher}, once however many ask; a body pulled as L{bytes} is served
from memory while it is written.  Bodies pulled meanwhile are attached
together: their files flushed, then C{cur/} once and one durable commit
for them all.  Bodies held in the database and asked for in one turn of the
reactor are read in one thread call.
"""

from __future__ import annotations

import os
from dataclasses import replace

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, fail, maybeDeferred, succeed
from twisted.python.failure import Failure

from p2pmta.errors import (
    BodyUnavailable,
    DiskFull,
    HeaderMismatch,
    NoSuchMessage,
    StoreError,
)
from p2pmta.fileutil import removeIfThere
from p2pmta.maildb import MailDatabase, translateDiskFull
from p2pmta.maildir import IN_DATABASE, Maildir
from p2pmta.mailindex import MailboxIndex, MessageRecord


class MessageBodies:
    """
    The part of a L{p2pmta.mailstore.MailStore} that has its messages'
    bodies read, pulled and attached.  The store resolves mailbox names and
    hands it their L{MailboxIndex}; it reads the store's C{bodyFetcher},
    C{attachedHook} and C{writeBehindBytes} when it needs them, and runs its
    thread work through the store's C{runInThread}.
    """

    # Only for a message still there: one expunged meanwhile leaves no body.
    _PUT_BODY = (
        "INSERT OR REPLACE INTO mail_bodies (mailbox, uid, body)"
        " SELECT mailbox, uid, ? FROM mail_messages WHERE mailbox = ? AND uid = ?"
    )

    def __init__(self, store, reactor, database: MailDatabase, files: Maildir, writeLock: DeferredLock) -> None:
        """
        @param store: The L{p2pmta.mailstore.MailStore} this is part of.
        @param reactor: The reactor to read queued bodies in the next turn of.
        @param database: The store's database.
        @param files: The store's Maildir.
        @param writeLock: The store's lock, that every write holds.
        """
        self._store = store
        self._reactor = reactor
        self._database = database
        self._files = files
        self._writeLock = writeLock
        self.log = store.log  # these are the store's events
        self._fetching: dict[tuple[str, int], list[Deferred]] = {}
        self._attaching: list = []  # (box, uid, path or bytes, Deferred) to attach
        self._pendingBodies: dict[tuple[str, int], bytes] = {}  # served while attached
        self._pendingBytes = 0
        self._writeWaiters: dict[tuple[str, int], list[Deferred]] = {}
        self._attachScheduled = False
        self._reading: list = []  # (mailbox, uid, Deferred): bodies to read from the database

    def body(self, box: MailboxIndex, uid: int) -> Deferred:
        """
        L{p2pmta.mailstore.MailStore.body} in C{box}: the path of a file,
        or the message's L{bytes}, pulling it first if it is not held.
        """
        record = box.records.get(uid)
        if record is None:
            return fail(BodyUnavailable(f"no message {uid} in {box.name}"))
        if record.held:
            name = box.files[uid]
            if name == IN_DATABASE:
                return self._bodyFromDatabase(box.name, uid)
            return succeed(self._files.filePath(name))
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

    def written(self, name: str, uids) -> Deferred:
        """
        L{p2pmta.mailstore.MailStore.written} in the mailbox C{name}.
        """
        waiters = []
        for uid in uids:
            key = (name, uid)
            if key in self._pendingBodies:
                waiter: Deferred = Deferred()
                self._writeWaiters.setdefault(key, []).append(waiter)
                waiters.append(waiter)
        return DeferredList(waiters).addCallback(lambda _: None)

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

        self._store.runInThread(self._database.readBodies, [(mailbox, uid) for mailbox, uid, _ in queued]).addCallbacks(read, failed)

    def _pull(self, box: MailboxIndex, record: MessageRecord) -> Deferred:
        fetcher = self._store.bodyFetcher
        if fetcher is None:
            return fail(BodyUnavailable("nothing can pull message bodies"))
        key = (box.name, record.uid)

        def attach(pulled):
            if not isinstance(pulled, bytes):
                path = os.fsdecode(pulled)
                d = self._store.attachBody(box.name, record.uid, path)
                return d.addCallbacks(attached, refused, errbackArgs=(path,))
            if not pulled.startswith(record.headers):
                return refused(Failure(HeaderMismatch("the pulled message")))
            d = self._store.attachData(box.name, record.uid, pulled)
            if self._pendingBytes + len(pulled) > self._store.writeBehindBytes:
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
            hook = self._store.attachedHook
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

    def attach(self, box: MailboxIndex, uid: int, source) -> Deferred:
        """
        Queue C{source} (the path of a complete message file, or the message
        as L{bytes}) to be attached as the body of C{uid} in C{box}: see
        L{p2pmta.mailstore.MailStore.attachBody}.
        """
        d: Deferred = Deferred()
        self._attaching.append((box, uid, source, d))
        if not self._attachScheduled:
            self._attachScheduled = True
            self._writeLock.run(self._attachQueued)
        return d

    def _attachQueued(self) -> Deferred:
        """
        Attach the bodies queued by L{attach} (for C{attachBody} and
        C{attachData}) so far, in one thread call (under the write lock).
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
                        name, size = self._files.takeBytes(source, record.headers)
                    else:
                        name, size = self._files.takeFile(source, record.headers, syncDir=False)
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
                        self._files.sync()
                    self._database.transaction(statements, durable=True)
                except BaseException:
                    self._files.removeFiles(names)
                    raise
            return results

        def done(results: list):
            orphans = []
            for (box, record, source, d), result in zip(jobs, results):
                if isinstance(result, Failure):
                    fail(result).addErrback(translateDiskFull).chainDeferred(d)
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
                d.callback(source if name == IN_DATABASE else self._files.filePath(name))
            if orphans:
                # Still under the write lock: no later write sees them.
                return self._store.runInThread(self._files.removeFiles, orphans).addErrback(
                    lambda f: self.log.failure("removing the bodies of expunged messages failed", f)
                )
            return None

        def failed(failure: Failure) -> None:
            for _, _, _, d in jobs:
                d.errback(failure)

        return self._store.runInThread(work).addErrback(translateDiskFull).addCallbacks(done, failed)
