# -*- test-case-name: tests.test_imapselected,tests.test_imap -*-
"""
The IMAP commands of the Selected state (RFC 3501 section 6.4, and RFC
3691's UNSELECT): CHECK, CLOSE, UNSELECT, EXPUNGE, SEARCH, STORE, COPY and
FETCH, which work on the session's selected mailbox.  L{SelectedCommands}
is mixed into L{p2pmta.imap.IMAPServer}, which reads and runs them.

Messages named by sequence number are resolved against the session's own
view (L{p2pmta.imapmailbox.SelectedMailbox}); one expunged by another
session meanwhile makes the command end C{NO [EXPUNGEISSUED]}.  FETCH
answers in windows of messages of about L{BODY_WINDOW} bytes together: the
bodies of two windows are had (and pulled, if need be) at a time, the next
one's while the one before it is sent.
"""

from __future__ import annotations

import re

from twisted.python.failure import Failure

from p2pmta import imapfetch, imapsearch, imapsyntax, piecesender
from p2pmta.errors import BodyUnavailable
from p2pmta.imapmailbox import SelectedMailbox
from p2pmta.imapsyntax import Args, BadCommand, No

#: About how many bytes of bodies one window of a FETCH holds: a FETCH
#: answers in windows of messages this big together (one at least), and
#: holds two at a time, the next one's bodies had while one is sent.  The
#: bodies of a window are all asked for at once: the receiver pulls small
#: ones in batches, and bounds how many requests it makes at a time (see
#: L{p2pmta.receiving}).
BODY_WINDOW = 16 * 1024 * 1024
#: The most messages in one window.
BODY_WINDOW_MESSAGES = 256

_STORE_ITEM = re.compile(rb"([+-]?)FLAGS(\.SILENT)?", re.IGNORECASE)


class SelectedCommands:
    """
    The Selected state's commands, as C{do_}I{NAME} methods of the session.

    They use the session's C{selected} mailbox, C{store} and C{factory};
    they answer with its C{_send}, check a destination mailbox with
    C{_checkMailbox}, leave the Selected state with C{_deselect}, and
    stream FETCH responses to its C{transport} while it can write (not
    C{_outputFull} nor C{_closed}; C{_close} if writing fails), through a
    L{piecesender.PieceSender} it keeps as C{_sender}.
    """

    def _requireSelected(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    async def do_CHECK(self, args: Args, uid: bool) -> bytes:
        args.end()
        return b"OK CHECK completed"

    async def do_CLOSE(self, args: Args, uid: bool) -> bytes:
        args.end()
        box = self._requireSelected()
        if box.rw:
            deleted = self._deleted(box, box.uids)
            if deleted:
                await self.store.expunge(box.name, deleted)
        self._deselect()
        return b"OK CLOSE completed"

    async def do_UNSELECT(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._deselect()
        return b"OK UNSELECT completed"

    def _deleted(self, box: SelectedMailbox, uids) -> list:
        store = self.store
        return [
            u
            for u in uids
            if (r := store.record(box.name, u)) is not None and "\\Deleted" in r.flags
        ]

    async def do_EXPUNGE(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        uids = box.uids
        if uid:
            args.sp()
            uids = [u for _, u in box.resolve(args.sequenceSet(), True)]
        args.end()
        if not box.rw:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        deleted = self._deleted(box, uids)
        if deleted:
            await self.store.expunge(box.name, deleted)
        return b"OK EXPUNGE completed"

    async def do_SEARCH(self, args: Args, uid: bool) -> bytes:
        args.sp()
        charset, key = imapsearch.parseSearch(args)
        if charset not in (None, "US-ASCII", "UTF-8"):
            raise No(b"[BADCHARSET (US-ASCII UTF-8)] Unsupported charset")
        result = await self._requireSelected().evaluate(key, uid)
        if result.unsearched:
            self._send(
                b"* NO Searched only the headers of %d message(s) not pulled yet"
                % result.unsearched
            )
        self._send(b"* SEARCH" + b"".join(b" %d" % n for n in result.found))
        return b"OK SEARCH completed"

    def _live(self, box: SelectedMailbox, args: Args, uid: bool) -> tuple[list, bool]:
        """
        The C{(seq, uid, record)} a sequence set names that still exist,
        and whether some named messages were expunged meanwhile.
        """
        targets = box.resolve(args.sequenceSet(), uid)
        store = self.store
        live = [
            (s, u, r)
            for s, u in targets
            if (r := store.record(box.name, u)) is not None
        ]
        return live, len(live) != len(targets)

    async def do_STORE(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        m = args.match(_STORE_ITEM)
        if m is None:
            raise BadCommand("expected FLAGS, +FLAGS or -FLAGS")
        args.sp()
        flags = args.flagList(parenthesised=False)
        args.end()
        if not box.rw:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        mode = {b"+": "add", b"-": "remove", b"": "set"}[m.group(1)]
        flags = [f for f in flags if f != "\\Recent"]
        result = await self.store.setFlags(
            box.name, [u for _, u, _ in live], flags, mode
        )
        box.flagsReported(result)
        # Expunged by another session while the change waited its turn.
        gone = gone or any(u not in result for _, u, _ in live)
        if not m.group(2):
            for seq, u, _ in live:
                if u in result:
                    extra = b" UID %d" % u if uid else b""
                    self._send(
                        b"* %d FETCH (FLAGS %s%s)"
                        % (seq, imapsyntax.flagList(result[u]), extra)
                    )
        if gone:
            raise No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return b"OK STORE completed"

    async def do_COPY(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        destination = self._checkMailbox(args.mailbox())
        args.end()
        if destination in self.factory.noAppend:
            raise No(b"[CANNOT] Messages cannot be added to " + destination.encode())
        store = self.store
        pairs = await store.copy(box.name, [u for _, u, _ in live], destination)
        if gone or len(pairs) < len(live):
            raise No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        if not pairs:
            return b"OK COPY completed"
        return b"OK [COPYUID %d %s %s] COPY completed" % (
            store.uidValidity(destination),
            imapsyntax.formatSet(a for a, _ in pairs),
            imapsyntax.formatSet(b for _, b in pairs),
        )

    async def do_FETCH(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        items = list(dict.fromkeys(imapfetch.parseFetch(args)))
        if uid and imapfetch.FetchItem("UID") not in items:
            items.insert(0, imapfetch.FetchItem("UID"))
        # Bodies go in windows, and only two windows' worth are held at a
        # time (pulled bodies may be held in memory): the bodies of the
        # first two are asked for together, then each next one's while the
        # one before it is sent.  Pulls of the second wait behind those of
        # the first (the receiver takes them in order), but keep its slots
        # busy while the first's last pulls finish.  A message is answered
        # as soon as its body is had.
        needsBody = any(i.needsBody for i in items)
        windows = _windows(live, BODY_WINDOW, BODY_WINDOW_MESSAGES) if needsBody else [live]
        unavailable, inMemory = None, []
        asked = [self._askBodies(box, w, needsBody) for w in windows[:2]]
        for n, part in enumerate(windows):
            bodies = asked.pop(0)
            vanished = await self._sendWindow(box, part, items, bodies)
            if bodies is not None:
                inMemory += [u for u, (body, _) in bodies.had.items() if isinstance(body, bytes)]
                if bodies.missing and all(self.store.record(box.name, u) is None for u in bodies.missing):
                    gone = True  # expunged by another session while their bodies were pulled
                else:
                    unavailable = unavailable or bodies.failure
            gone, unavailable = _leftOut(self.store, box.name, vanished, gone, unavailable)
            if n + 2 < len(windows):
                asked.append(self._askBodies(box, windows[n + 2], needsBody))
        # Bodies sent from memory are on disk before the OK: a crash before
        # it leaves a client that retries, not one that thinks it has them
        # while their senders were never told.
        await self.store.written(box.name, inMemory)
        if unavailable is not None:
            unavailable.raiseException()
        if gone:
            raise No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return b"OK FETCH completed"

    def _askBodies(self, box, live: list, needsBody: bool):
        """
        Ask the store for the bodies of C{live}, if the FETCH needs them.

        @return: their L{imapfetch.BodyRequests}, or L{None}.
        """
        if not needsBody:
            return None
        return imapfetch.BodyRequests(self.store, box.name, [u for _, u, _ in live])

    async def _sendWindow(self, box, live: list, items: list, bodies) -> list:
        """
        Send the FETCH responses of C{live}, each as soon as its body (if
        C{items} need it) is had, and mark C{\\Seen} those whose body was
        had, if C{items} say so.

        @param bodies: The L{imapfetch.BodyRequests} of their bodies, or
            L{None}.
        @return: the UIDs whose file could not be opened (left out).
        """
        store = self.store
        setsSeen = box.rw and any(i.setsSeen for i in items)

        def marked(uid: int, record) -> bool:
            return setsSeen and "\\Seen" not in record.flags

        marking: list = []
        failed = False

        def mark(_=None) -> None:
            # Stored while the responses go (they show the flag), once it
            # is known which bodies were had: the store's write waits
            # behind the bodies being committed.
            unseen = [u for _, u, r in live if marked(u, r) and (bodies is None or u in bodies.had)]
            if unseen and not failed:
                marking.append(store.setFlags(box.name, unseen, ["\\Seen"], "add"))

        if setsSeen:
            if bodies is None:
                mark()
            else:
                bodies.settled().addCallback(mark)
        structures = self.factory.structures if any(i.needsStructure for i in items) else None
        vanished: list = []
        pieces = imapfetch.fetchPieces(store, box.name, live, items, bodies, structures, marked, vanished)
        self._sender = piecesender.PieceSender(
            self.transport,
            pieces,
            canWrite=lambda: not (self._outputFull or self._closed),
            abort=self._close,
        )
        try:
            await self._sender.start()
        except BaseException:
            failed = True  # what was not sent is not marked
            for d in marking:
                d.addErrback(lambda _: None)  # the command fails anyway
            raise
        finally:
            self._sender = None
        if bodies is not None:
            await bodies.settled()  # every response sent: all are settled already
        for d in marking:
            # Stored before the command's OK; a failure makes it a NO.
            box.flagsReported(set(await d))
        return vanished


def _leftOut(store, mailbox: str, uids, gone: bool, unavailable):
    """
    Account for messages left out of a FETCH for want of their file: one
    expunged meanwhile makes C{gone} true, any other is the first failure
    (C{unavailable}) if there is none yet.

    @return: C{(gone, unavailable)}.
    """
    for u in uids:
        if store.record(mailbox, u) is None:
            gone = True
        elif unavailable is None:
            unavailable = Failure(BodyUnavailable("the message file is missing"))
    return gone, unavailable


def _windows(live: list, size: int, count: int) -> list:
    """
    C{live} (C{(seq, uid, record)}s) cut into runs of at most C{count}
    messages of at most C{size} bytes together, or of one message; one
    empty run if none.
    """
    windows, current, total = [], [], 0
    for x in live:
        if current and (total + x[2].size > size or len(current) == count):
            windows.append(current)
            current, total = [], 0
        current.append(x)
        total += x[2].size
    return [*windows, current]
