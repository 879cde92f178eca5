# -*- test-case-name: tests.test_mimestructure,tests.test_hostile_imap -*-
"""
The MIME structure of a message file, as IMAP shows it: its entities
(L{parseStructure}), their C{BODY} and C{BODYSTRUCTURE} (L{bodyStructure}),
the entity a section's part number names (L{resolvePart}), and the
C{ENVELOPE} of a header section (L{envelopeOf}).

The structure (for C{BODYSTRUCTURE} and numbered parts) is found by
scanning the file for boundaries in a thread, and C{BODY} and
C{BODYSTRUCTURE} are written out there too (L{describe}), so the reactor
never walks a large structure.  The structure is bounded: a multipart or
attached message deeper than L{MAX_MIME_DEPTH} levels is shown as one
C{application/octet-stream} part (its bytes still served whole by
C{BODY[...]}), and after L{MAX_MIME_PARTS} entities the remaining parts of a
multipart are not listed (C{BODY[n]} of such a part is empty).  A message
nested 2,000 deep or made of 100,000 parts is answered in a few seconds
at most.
"""

from __future__ import annotations

import mmap
import os
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value, getaddresses

from p2pmta.imapsyntax import sexp, toBytes

#: How deep multiparts and attached messages are followed.
MAX_MIME_DEPTH = 100
#: How many MIME entities of one message are looked at.
MAX_MIME_PARTS = 10000
#: How much of an entity's header is parsed.
MAX_HEADER = 64 * 1024


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


def resolvePart(root: Entity, part: tuple):
    """
    The entity a section's part number names (C{(1, 2)} for C{BODY[1.2]}),
    or L{None} if there is none.
    """
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
