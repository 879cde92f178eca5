# -*- test-case-name: tests.test_imap -*-
"""
IMAP FETCH: parsing fetch attributes, building the data items, MIME
structure, and streaming the answer.

Everything is served from stored bytes: header sections and
C{HEADER.FIELDS} are cut from the exact header section the store keeps (case,
order, duplicates and the blank line kept), and body sections are byte
ranges of the message file, streamed to the client in chunks rather than
read whole.  The MIME structure (for C{BODYSTRUCTURE} and numbered parts)
is found by scanning the file for boundaries in a thread, and C{BODY} and
C{BODYSTRUCTURE} are written out there too, so the reactor never walks a
large structure.  The structure is bounded: a multipart or attached message
deeper than L{MAX_MIME_DEPTH} levels is shown as one
C{application/octet-stream} part (its bytes still served whole by
C{BODY[...]}), and after L{MAX_MIME_PARTS} entities the remaining parts of a
multipart are not listed (C{BODY[n]} of such a part is empty).  A message
nested 2,000 deep or made of 100,000 parts is answered in a few seconds
at most.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value, getaddresses

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pmta.errors import BodyUnavailable
from p2pmta.imapsyntax import Args, BadCommand, flagList

_log = Logger()

#: How deep multiparts and attached messages are followed.
MAX_MIME_DEPTH = 100
#: How many MIME entities of one message are looked at.
MAX_MIME_PARTS = 10000
#: How much of an entity's header is parsed.
MAX_HEADER = 64 * 1024

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


def toBytes(value: str) -> bytes:
    """
    Header text back to its bytes (the parser keeps 8-bit bytes as
    surrogates).
    """
    try:
        return value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def quote(value: bytes | None) -> bytes:
    """
    An nstring: C{NIL}, a quoted string, or a literal for bytes a quoted
    string cannot hold.
    """
    if value is None:
        return b"NIL"
    if len(value) > 1000 or any(c in b"\r\n\0" or c > 0x7F for c in value):
        return b"{%d}\r\n%s" % (len(value), value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def sexp(items) -> bytes:
    """
    A parenthesised list of nested lists, L{bytes} (quoted), L{str}
    (quoted), L{int} and L{None}.
    """
    out = []
    for item in items:
        if item is None:
            out.append(b"NIL")
        elif isinstance(item, int):
            out.append(b"%d" % item)
        elif isinstance(item, str):
            out.append(quote(toBytes(item)))
        elif isinstance(item, bytes):
            out.append(quote(item))
        else:
            out.append(sexp(item))
    return b"(" + b" ".join(out) + b")"


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


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def _parseHeader(headers: bytes):
    return BytesHeaderParser(policy=compat32).parsebytes(headers[:MAX_HEADER])


def _addresses(msg, name: str):
    values = msg.get_all(name)
    if not values:
        return None
    result = []
    for display, address in getaddresses([_unfold(str(v)) for v in values]):
        if not display and not address:
            continue
        local, _, domain = (
            address.rpartition("@") if "@" in address else (address, "", "")
        )
        result.append([display or None, None, local or None, domain or None])
    return result or None


def envelopeOf(headers: bytes) -> list:
    """
    The ENVELOPE fields of a header section, as a nested list for L{sexp}.
    """
    msg = _parseHeader(headers)

    def field(name):
        value = msg.get(name)
        return None if value is None else toBytes(_unfold(str(value)))

    sender = _addresses(msg, "from")
    return [
        field("date"),
        field("subject"),
        sender,
        _addresses(msg, "sender") or sender,
        _addresses(msg, "reply-to") or sender,
        _addresses(msg, "to"),
        _addresses(msg, "cc"),
        _addresses(msg, "bcc"),
        field("in-reply-to"),
        field("message-id"),
    ]


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


# -- MIME structure --------------------------------------------------------


class Entity:
    """
    One MIME entity of a message file: its header at C{start}, its body
    from C{bodyStart} to C{end}; C{children} are a multipart's parts or an
    attached message (message/rfc822).
    """

    def __init__(self, start, bodyStart, end, header: bytes, defaultType: str) -> None:
        self.start, self.bodyStart, self.end = start, bodyStart, end
        self.header = header
        self.msg = _parseHeader(header)
        if defaultType != "text/plain":
            self.msg.set_default_type(defaultType)
        self.ctype = self.msg.get_content_type().lower()
        self.children: list = []
        self.lines = 0
        self.cost = 0
        self.rendered: dict = {}

    @property
    def isMessage(self) -> bool:
        return self.ctype == "message/rfc822" and bool(self.children)


def _headerEnd(buf, start: int, end: int) -> int:
    if buf[start : start + 2] == b"\r\n":
        return start + 2
    if buf[start : start + 1] == b"\n":
        return start + 1
    ends = []
    i = buf.find(b"\r\n\r\n", start, end)
    if i >= 0:
        ends.append(i + 4)
    j = buf.find(b"\n\n", start, i + 4 if i >= 0 else end)
    if j >= 0:
        ends.append(j + 2)
    return min(ends) if ends else end


def _countLines(buf, start: int, end: int) -> int:
    """
    The number of lines from C{start} to C{end}, a last line without its
    line end included.
    """
    count, step = 0, 1 << 20
    for i in range(start, end, step):
        count += buf[i : min(i + step, end)].count(b"\n")
    if end > start and buf[end - 1 : end] != b"\n":
        count += 1
    return count


def _entity(buf, start: int, end: int, depth: int, defaultType: str, budget: list):
    bodyStart = _headerEnd(buf, start, end)
    header = bytes(buf[start : min(bodyStart, start + MAX_HEADER)])
    entity = Entity(start, bodyStart, end, header, defaultType)
    budget[0] -= 1
    budget[1] += 4 * len(header) + 1024
    main = entity.ctype.split("/")[0]
    container = main == "multipart" or entity.ctype == "message/rfc822"
    if container and (depth >= MAX_MIME_DEPTH or budget[0] <= 0):
        entity.ctype = "application/octet-stream"
        return entity
    if main == "multipart":
        boundary = entity.msg.get_param("boundary")
        if boundary is not None:
            boundary = collapse_rfc2231_value(boundary).encode(
                "utf-8", "surrogateescape"
            )
            child = (
                "message/rfc822" if entity.ctype == "multipart/digest" else "text/plain"
            )
            for s, e in _split(buf, bodyStart, end, boundary, budget):
                entity.children.append(_entity(buf, s, e, depth + 1, child, budget))
        if not entity.children:
            entity.ctype = "text/plain"
    elif entity.ctype == "message/rfc822":
        entity.children.append(
            _entity(buf, bodyStart, end, depth + 1, "text/plain", budget)
        )
    if main == "text" or entity.ctype == "message/rfc822":
        entity.lines = _countLines(buf, bodyStart, end)
    return entity


def _split(buf, start: int, end: int, boundary: bytes, budget: list):
    """
    The C{(start, end)} of each part of a multipart body.
    """
    delimiter = re.compile(
        rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.MULTILINE
    )
    parts, partStart = [], None
    for m in delimiter.finditer(buf, start, end):
        if partStart is not None:
            partEnd = m.start()
            if buf[partEnd - 2 : partEnd] == b"\r\n":
                partEnd -= 2
            elif buf[partEnd - 1 : partEnd] == b"\n":
                partEnd -= 1
            parts.append((partStart, max(partStart, partEnd)))
            if len(parts) >= budget[0]:
                break
        if m.group(1):
            break
        partStart = min(m.end() + 1, end)
    return parts


def parseStructure(path) -> Entity:
    """
    The MIME structure of a message file, or of a message in L{bytes}
    (blocking: run it in a thread).  Its root's C{cost} estimates the
    memory the structure takes.
    """
    budget = [MAX_MIME_PARTS, 0]
    if isinstance(path, bytes):
        root = _entity(path, 0, len(path), 0, "text/plain", budget)
        root.cost = budget[1]
        return root
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            root = _entity(b"", 0, 0, 0, "text/plain", budget)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                root = _entity(buf, 0, size, 0, "text/plain", budget)
    root.cost = budget[1]
    return root


def describe(path) -> Entity:
    """
    L{parseStructure}, with the root's C{BODY} and C{BODYSTRUCTURE} written
    out in C{rendered} (blocking: run it in a thread).
    """
    root = parseStructure(path)
    for name in ("BODY", "BODYSTRUCTURE"):
        root.rendered[name] = sexp(bodyStructure(root, name == "BODYSTRUCTURE"))
        root.cost += len(root.rendered[name])
    return root


def _params(msg, header: str):
    params = msg.get_params(header=header) or []
    out = []
    for name, value in params[1:]:
        out += [name.upper(), collapse_rfc2231_value(value)]
    return out or None


def _disposition(msg):
    params = msg.get_params(header="content-disposition")
    if not params:
        return None
    return [params[0][0].upper(), _params(msg, "content-disposition")]


def _field(msg, name):
    value = msg.get(name)
    return None if value is None else _unfold(str(value)).strip()


def bodyStructure(entity: Entity, extended: bool) -> list:
    """
    BODYSTRUCTURE (C{extended}) or BODY, as a nested list for L{sexp}.
    """
    msg = entity.msg
    if entity.ctype.startswith("multipart/") and entity.children:
        result = [bodyStructure(c, extended) for c in entity.children]
        result.append(entity.ctype.split("/", 1)[1].upper())
        if extended:
            result += [
                _params(msg, "content-type"),
                _disposition(msg),
                _field(msg, "content-language"),
                _field(msg, "content-location"),
            ]
        return result
    main, _, sub = entity.ctype.partition("/")
    result = [
        main.upper(),
        sub.upper(),
        _params(msg, "content-type"),
        _field(msg, "content-id"),
        _field(msg, "content-description"),
        (_field(msg, "content-transfer-encoding") or "7BIT").upper(),
        entity.end - entity.bodyStart,
    ]
    if entity.isMessage:
        inner = entity.children[0]
        result += [
            envelopeOf(inner.header),
            bodyStructure(inner, extended),
            entity.lines,
        ]
    elif main == "text":
        result.append(entity.lines)
    if extended:
        result += [
            _field(msg, "content-md5"),
            _disposition(msg),
            _field(msg, "content-language"),
            _field(msg, "content-location"),
        ]
    return result


def _resolve(root: Entity, part: tuple):
    entity = root
    for n in part:
        if entity.isMessage:
            entity = entity.children[0]
        if entity.ctype.startswith("multipart/") and entity.children:
            if n > len(entity.children):
                return None
            entity = entity.children[n - 1]
        elif n != 1:
            return None
    return entity


# -- sections and streaming ------------------------------------------------


@dataclass(frozen=True)
class FileRange:
    """
    C{length} bytes of the file at C{path} from C{offset}; read through
    C{handle} when given (a file opened before the message was expunged
    stays readable).
    """

    path: str
    offset: int
    length: int
    handle: object = field(default=None, compare=False)


def sectionData(item: FetchItem, headers: bytes, path, fileSize: int, root):
    """
    The data of a C{BODY[...]} item (before any partial): L{bytes} or a
    L{FileRange}.
    """
    if item.part:
        entity = _resolve(root, item.part)
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


class PieceSender:
    """
    Writes a stream of pieces (L{bytes} and L{FileRange}s) to a transport
    while C{canWrite()} says the transport keeps up, reading files in
    chunks; L{resume} goes on when it has drained.  A file that turns out
    shorter than announced is padded, so the client's literal count stays
    right.
    """

    log = Logger()
    chunkSize = 64 * 1024

    def __init__(self, transport, pieces, canWrite=lambda: True, abort=None) -> None:
        """
        @param canWrite: Called before each write: whether the transport
            still takes data (the session's producer is not paused).
        @param abort: Called to drop the connection when writing fails
            (C{transport.loseConnection} by default).
        """
        self._transport = transport
        self._pieces = iter(pieces)
        self._canWrite = canWrite
        self._abort = abort or transport.loseConnection
        self._file = None
        self._ownFile = True
        self._left = 0
        self._done: Deferred = Deferred()
        self._finished = False

    def start(self) -> Deferred:
        """
        @return: a Deferred firing when everything is written.
        """
        self.resume()
        return self._done

    def resume(self) -> None:
        """
        Write until done or until the transport has enough.
        """
        try:
            while not self._finished and self._canWrite():
                if self._left:
                    data = (
                        self._file.read(min(self._left, self.chunkSize))
                        if self._file
                        else b""
                    )
                    if not data:
                        data = b" " * min(self._left, self.chunkSize)
                    self._left -= len(data)
                    self._transport.write(data)
                    if not self._left:
                        self._closeFile()
                    continue
                piece = next(self._pieces, None)
                if piece is None:
                    self._finish(None)
                elif isinstance(piece, FileRange):
                    self._left = piece.length
                    self._openFile(piece)
                else:
                    self._transport.write(piece)
        except Exception:
            self.log.failure("writing a FETCH response failed")
            self._abort()
            self._finish(Failure())

    def _openFile(self, piece: FileRange) -> None:
        self._ownFile = piece.handle is None
        try:
            if self._ownFile:
                self._file = open(piece.path, "rb")  # noqa: SIM115
            else:
                self._file = piece.handle
            self._file.seek(piece.offset)
        except OSError:
            self.log.warn("message file {path} vanished", path=piece.path)
            self._file = None

    def _closeFile(self) -> None:
        if self._file is not None:
            if self._ownFile:
                self._file.close()
            self._file = None

    def _closePieces(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def _finish(self, result) -> None:
        if self._finished:
            return
        self._finished = True
        self._closeFile()
        self._closePieces()
        if isinstance(result, Failure):
            self._done.errback(result)
        else:
            self._done.callback(result)

    def stop(self) -> None:
        """
        The connection is gone: give up.
        """
        self._finish(Failure(ConnectionError("connection lost")))


# -- the FETCH command's work ------------------------------------------------


async def fetchBodies(store, mailbox: str, uids: list):
    """
    Ask the store for the bodies of C{uids}, all at once (pulling those not
    held: the receiver bounds how many requests that makes at a time).

    @return: C{{uid: (path, size)}} of the bodies had (the path being the
        message's L{bytes} for one the store holds in memory), and the first
        failure (a L{BodyUnavailable}) or L{None}.
    """
    results = await DeferredList(
        [maybeDeferred(store.body, mailbox, u) for u in uids], consumeErrors=True
    )
    files, failure = {}, None
    for u, (ok, value) in zip(uids, results):
        if ok and isinstance(value, bytes):
            files[u] = (value, len(value))
        elif ok:
            try:
                files[u] = (value, os.path.getsize(value))
            except OSError:
                ok, value = (
                    False,
                    Failure(BodyUnavailable("the message file is missing")),
                )
        if not ok and failure is None:
            failure = value
            if not value.check(BodyUnavailable):
                _log.failure("body of {uid} failed", value, uid=u)
                failure = Failure(BodyUnavailable("internal error"))
    return files, failure


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


def fetchPieces(store, mailbox: str, live, items, files, structures, seen, vanished):
    """
    The FETCH responses, as pieces for L{PieceSender}, made as they are
    sent.  Each message's file is opened when its response starts and
    closed when it ends, so an expunge by another session meanwhile cannot
    cut it short.

    @param live: C{(seq, uid, record)} of each message.
    @param files: C{{uid: (path, size)}} of the bodies (see L{fetchBodies}).
    @param seen: UIDs being marked C{\\Seen}, whose FLAGS (with it) must
        be sent.
    @param vanished: A list the UIDs whose file could not be opened (and
        whose response was left out) are appended to.
    """
    for seq, u, record in live:
        record = store.record(mailbox, u) or record
        wanted = items
        if u in seen:
            if "\\Seen" not in record.flags:
                record = replace(record, flags=record.flags | {"\\Seen"})
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
                yield from _itemPieces(
                    item, record, path, size, structures.get(u), handle
                )
            yield b")\r\n"
        finally:
            if handle is not None:
                handle.close()


def _itemPieces(item: FetchItem, record, path, size: int, root, handle) -> list:
    name = item.name
    if name == "FLAGS":
        return [b"FLAGS " + flagList(record.flags)]
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
        data = replace(data, handle=handle)
    label = name.encode() if name.startswith("RFC822") else item.label()
    return [label + b" ", *literal(data)]
