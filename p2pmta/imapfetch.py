# -*- test-case-name: tests.test_imap -*-
"""
IMAP FETCH: parsing fetch attributes, having the bodies and MIME structures
they need, and making the answer's pieces.

Everything is served from stored bytes: header sections and
C{HEADER.FIELDS} are cut from the exact header section the store keeps (case,
order, duplicates and the blank line kept), and body sections are byte
ranges of the message file (L{p2pmta.piecesender.FileRange}s), which
L{p2pmta.piecesender.PieceSender} streams to the client in chunks rather
than read whole.  C{BODYSTRUCTURE} and numbered parts use the message's
structure, found by L{p2pmta.mimestructure} in a thread and kept in a
L{StructureCache}.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pmta.errors import BodyUnavailable
from p2pmta.imapsyntax import Args, BadCommand, flagList, sexp
from p2pmta.mimestructure import bodyStructure, describe, envelopeOf, resolvePart
from p2pmta.piecesender import FileRange

_log = Logger()

_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()  # noqa: SIM905
_SIMPLE = (  # noqa: SIM905
    "ENVELOPE FLAGS INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT UID "
    "BODYSTRUCTURE"
).split()
_MACROS = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_NAME = re.compile(rb"[A-Za-z0-9.]+")
_PART = re.compile(rb"[1-9][0-9]{0,8}(?:\.[1-9][0-9]{0,8}){0,100}")
_PARTIAL = re.compile(rb"<([0-9]{1,12})\.([1-9][0-9]{0,11})>")
_SECTION_TEXTS = ("HEADER.FIELDS.NOT", "HEADER.FIELDS", "HEADER", "TEXT", "MIME")


@dataclass(frozen=True)
class FetchItem:
    """
    One FETCH data item.  C{name} is one of L{_SIMPLE}, C{"BODY"} (the
    structure) or C{"SECTION"} (C{BODY[...]}, C{BODY.PEEK[...]}).
    """

    name: str
    peek: bool = False
    part: tuple = ()
    text: str = ""
    fields: tuple = ()
    partial: tuple | None = None

    @property
    def needsBody(self) -> bool:
        if self.name in ("RFC822", "RFC822.TEXT", "BODYSTRUCTURE", "BODY"):
            return True
        return self.name == "SECTION" and bool(self.part or self.text in ("", "TEXT"))

    @property
    def needsStructure(self) -> bool:
        return self.name in ("BODYSTRUCTURE", "BODY") or bool(self.part)

    @property
    def setsSeen(self) -> bool:
        return (self.name == "SECTION" and not self.peek) or self.name in (
            "RFC822",
            "RFC822.TEXT",
        )

    def label(self) -> bytes:
        """
        The item's name in the response.
        """
        if self.name != "SECTION":
            return self.name.encode()
        spec = ".".join(str(p) for p in self.part)
        if self.text:
            spec += ("." if spec else "") + self.text
        if self.fields:
            spec += (
                " (" + " ".join(f.decode("ascii", "replace") for f in self.fields) + ")"
            )
        origin = "" if self.partial is None else f"<{self.partial[0]}>"
        return f"BODY[{spec}]{origin}".encode()


def parseFetch(args: Args) -> list:
    """
    Parse the fetch attributes of FETCH (after the sequence set).
    """
    if args.take(b"("):
        items = [_parseAtt(args)]
        while not args.take(b")"):
            args.sp()
            items.append(_parseAtt(args))
    else:
        items = _parseAtt(args, macros=True)
        items = items if isinstance(items, list) else [items]
    args.end()
    return items


def _parseAtt(args: Args, macros: bool = False):
    m = args.match(_NAME)
    if m is None:
        raise BadCommand("expected a fetch attribute")
    name = m.group().decode().upper()
    if macros and name in _MACROS:
        return [FetchItem(n) for n in _MACROS[name]]
    if name in _SIMPLE:
        return FetchItem(name)
    if name not in ("BODY", "BODY.PEEK"):
        raise BadCommand(f"unknown fetch attribute {name}")
    peek = name == "BODY.PEEK"
    if not args.take(b"["):
        if peek:
            raise BadCommand("BODY.PEEK needs a section")
        return FetchItem("BODY")
    part: tuple = ()
    text, fields = "", ()
    m = args.match(_PART)
    if m is not None:
        part = tuple(int(p) for p in m.group().split(b"."))
    if not part or args.take(b"."):
        for candidate in _SECTION_TEXTS:
            if args.take(candidate.encode()):
                text = candidate
                break
        else:
            if part:
                raise BadCommand("malformed section")
    if text == "MIME" and not part:
        raise BadCommand("MIME needs a part number")
    if text.startswith("HEADER.FIELDS"):
        args.sp()
        args.expect(b"(")
        names = [args.astring().upper()]
        while not args.take(b")"):
            args.sp()
            names.append(args.astring().upper())
        fields = tuple(names)
    args.expect(b"]")
    partial = None
    m = args.match(_PARTIAL)
    if m is not None:
        partial = (int(m.group(1)), int(m.group(2)))
    return FetchItem("SECTION", peek, part, text, fields, partial)


# -- formatting ------------------------------------------------------------


def internalDate(when: float) -> bytes:
    t = time.gmtime(when)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def headerFields(headers: bytes, names: tuple, negate: bool) -> bytes:
    """
    The raw header fields named C{names} (or, with C{negate}, all others)
    in their stored order, followed by the blank line.
    """
    wanted = {n.upper() for n in names}
    out, keep = [], False
    for line in headers.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().upper()
            keep = (name in wanted) != negate
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"


# -- sections --------------------------------------------------------------


def sectionData(item: FetchItem, headers: bytes, path, fileSize: int, root):
    """
    The data of a C{BODY[...]} item (before any partial): L{bytes} or a
    L{FileRange}.
    """
    if item.part:
        entity = resolvePart(root, item.part)
        if entity is None:
            return b""
        if item.text == "":
            return FileRange(path, entity.bodyStart, entity.end - entity.bodyStart)
        if item.text == "MIME":
            return entity.header
        if not entity.isMessage:
            return b""
        inner = entity.children[0]
        if item.text == "TEXT":
            return FileRange(path, inner.bodyStart, inner.end - inner.bodyStart)
        headers = inner.header
    elif item.text == "":
        return FileRange(path, 0, fileSize)
    elif item.text == "TEXT":
        start = min(len(headers), fileSize)
        return FileRange(path, start, fileSize - start)
    if item.text == "HEADER":
        return headers
    return headerFields(headers, item.fields, item.text.endswith(".NOT"))


def literal(data) -> list:
    """
    The pieces of a literal holding C{data} (L{bytes} or L{FileRange}).
    """
    if isinstance(data, FileRange):
        return [b"{%d}\r\n" % data.length, data]
    return [b"{%d}\r\n" % len(data), data]


def partial(data, window):
    """
    Cut C{data} (L{bytes} or L{FileRange}) to C{window = (start, length)}.
    """
    if window is None:
        return data
    start, length = window
    if isinstance(data, FileRange):
        if start >= data.length:
            return b""
        return FileRange(
            data.path, data.offset + start, min(length, data.length - start)
        )
    return data[start : start + length]


# -- the FETCH command's work ------------------------------------------------


class BodyRequests:
    """
    The bodies of some messages of a mailbox, asked of the store all at
    once (pulling those not held: the receiver bounds how many requests
    that makes at a time), each had as it comes: a FETCH answers for a
    message as soon as its body is had, not once the last one is.

    @ivar had: C{{uid: (path, size)}} of the bodies had so far (the path
        being the message's L{bytes} for one the store holds in memory).
    @ivar missing: The UIDs whose body could not be had.
    @ivar failure: The first failure (a L{BodyUnavailable}), or L{None}.
    """

    def __init__(self, store, mailbox: str, uids) -> None:
        self.had: dict = {}
        self.missing: list = []
        self.failure: Failure | None = None
        uids = list(dict.fromkeys(uids))
        self._unsettled = len(uids)
        self._whenSettled: list = []
        self._requests = {
            u: maybeDeferred(store.body, mailbox, u).addBoth(self._settle, u) for u in uids
        }

    def _settle(self, result, uid: int) -> None:
        try:
            self._keep(result, uid)
        finally:
            self._unsettled -= 1
            if not self._unsettled:
                waiters, self._whenSettled = self._whenSettled, []
                for d in waiters:
                    d.callback(None)

    def _keep(self, result, uid: int) -> None:
        if isinstance(result, bytes):
            self.had[uid] = (result, len(result))
            return
        if not isinstance(result, Failure):
            try:
                self.had[uid] = (result, os.path.getsize(result))
                return
            except OSError:
                result = Failure(BodyUnavailable("the message file is missing"))
        self.missing.append(uid)
        if self.failure is None:
            if not result.check(BodyUnavailable):
                _log.failure("body of {uid} failed", result, uid=uid)
                result = Failure(BodyUnavailable("internal error"))
            self.failure = result

    def waitFor(self, uid: int) -> Deferred | None:
        """
        @return: L{None} if the body of C{uid} is had or failed already,
            else a Deferred firing (with L{None}) once it is.
        """
        request = self._requests[uid]
        return None if request.called else request

    def settled(self) -> Deferred:
        """
        @return: a Deferred firing (with L{None}) once every body is had
            or has failed.
        """
        if not self._unsettled:
            return succeed(None)
        d: Deferred = Deferred()
        self._whenSettled.append(d)
        return d


class StructureCache:
    """
    The MIME structures of the messages FETCHed last, up to about
    C{maxCost} bytes of memory: a message file never changes for its UID.
    """

    def __init__(self, maxCost: int = 16 * 1024 * 1024) -> None:
        self._maxCost = maxCost
        self._cost = 0
        self._entries: OrderedDict = OrderedDict()

    async def get(self, store, mailbox: str, files: dict) -> dict:
        """
        @param store: The store the files are in (its threadpool parses).
        @param files: C{{uid: (path, size)}}.
        @return: C{{uid: root Entity}}, without the messages whose file
            vanished (expunged meanwhile).
        """
        validity = store.uidValidity(mailbox)
        structures = {}
        for u, (path, _) in files.items():
            key = (mailbox, validity, u)
            entity = self._entries.get(key)
            if entity is None:
                try:
                    entity = await store.runInThread(describe, path)
                except OSError:
                    continue
                if entity.cost <= self._maxCost:
                    self._entries[key] = entity
                    self._cost += entity.cost
                while self._cost > self._maxCost:
                    self._cost -= self._entries.popitem(last=False)[1].cost
            else:
                self._entries.move_to_end(key)
            structures[u] = entity
        return structures


def fetchPieces(store, mailbox: str, live, items, bodies, structures, marked, vanished):
    """
    The FETCH responses, as pieces for L{PieceSender}, made as they are
    sent.  Before a message whose body is not had yet, a Deferred is
    yielded: the sender waits for it.  A message whose body could not be
    had is left out (C{bodies.missing} says which).  Each message's file
    is opened when its response starts and closed when it ends, so an
    expunge by another session meanwhile cannot cut it short.

    @param live: C{(seq, uid, record)} of each message.
    @param bodies: The L{BodyRequests} of their bodies, or L{None} if
        C{items} need none.
    @param structures: The L{StructureCache} to have their MIME
        structures from, or L{None} if C{items} need none.
    @param marked: Called with each message's C{(uid, record)}: whether
        it is being marked C{\\Seen}, whose FLAGS (with it) must be sent.
    @param vanished: A list the UIDs whose file could not be opened, or
        whose structure could not be read (and whose response was left
        out), are appended to.
    """
    for seq, u, record in live:
        files: dict = {}
        if bodies is not None:
            wait = bodies.waitFor(u)
            if wait is not None:
                yield wait
            if u not in bodies.had:
                continue
            files[u] = bodies.had[u]
        root = None
        if structures is not None:
            found: dict = {}
            wait = Deferred.fromCoroutine(structures.get(store, mailbox, files)).addBoth(_keepStructure, found)
            if not wait.called:
                yield wait
            root = found.get("result", {}).get(u)
            if root is None:
                vanished.append(u)
                continue
        seen = marked(u, record)
        record = store.record(mailbox, u) or record
        wanted, flags = items, record.flags
        if seen:
            flags = flags | {"\\Seen"}
            if FetchItem("FLAGS") not in items:
                wanted = [*items, FetchItem("FLAGS")]
        path, size = files.get(u, (None, record.size))
        handle = None
        if isinstance(path, bytes):
            handle = io.BytesIO(path)
        elif path is not None:
            try:
                handle = open(path, "rb")  # noqa: SIM115
            except OSError:
                vanished.append(u)
                continue
        try:
            yield b"* %d FETCH (" % seq
            for i, item in enumerate(wanted):
                if i:
                    yield b" "
                yield from _itemPieces(item, record, flags, path, size, root, handle)
            yield b")\r\n"
        finally:
            if handle is not None:
                handle.close()


def _keepStructure(result, into: dict) -> None:
    """
    Keep a structure look-up's outcome for L{fetchPieces}: a failure other
    than a vanished file is logged, and its message left out.
    """
    if isinstance(result, Failure):
        _log.failure("reading a message's structure failed", result)
    else:
        into["result"] = result


def _itemPieces(item: FetchItem, record, flags, path, size: int, root, handle) -> list:
    name = item.name
    if name == "FLAGS":
        return [b"FLAGS " + flagList(flags)]
    if name == "UID":
        return [b"UID %d" % record.uid]
    if name == "INTERNALDATE":
        return [b"INTERNALDATE " + internalDate(record.internalDate)]
    if name == "RFC822.SIZE":
        return [b"RFC822.SIZE %d" % record.size]
    if name == "ENVELOPE":
        return [b"ENVELOPE " + sexp(envelopeOf(record.headers))]
    if name == "RFC822.HEADER":
        return [b"RFC822.HEADER ", *literal(record.headers)]
    if name in ("BODYSTRUCTURE", "BODY"):
        rendered = root.rendered.get(name)
        if rendered is None:
            rendered = sexp(bodyStructure(root, name == "BODYSTRUCTURE"))
        return [name.encode() + b" " + rendered]
    if name == "RFC822":
        item = FetchItem("SECTION")
    elif name == "RFC822.TEXT":
        item = FetchItem("SECTION", text="TEXT")
    data = partial(sectionData(item, record.headers, path, size, root), item.partial)
    if isinstance(data, FileRange):
        data = FileRange(data.path, data.offset, data.length, handle)
    label = name.encode() if name.startswith("RFC822") else item.label()
    return [label + b" ", *literal(data)]
