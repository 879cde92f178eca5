# -*- test-case-name: tests.test_imap -*-
"""
IMAP SEARCH over the mail store: its keys (L{parseSearch}) and their
evaluation (L{search}).

SEARCH is evaluated here over L{p2pmta.mailindex.MessageRecord}s, never by
Twisted's broken one.  Header keys use the stored header section.  C{TEXT}
and C{BODY} read the message file when it is held; for a message whose body
is not here yet they search its header section only: a search never pulls a
body from its sender (pulling every body would cost the traffic that pulling
on demand saves), and the server warns with an untagged C{NO} when that
happened.  Bodies are searched as raw bytes, ASCII case-insensitively (no
charset or transfer decoding).

The work of one command is bounded: sequence sets are merged and resolved
against the ids held (never the range a client wrote), one SEARCH holds at
most L{MAX_SEARCH_KEYS} keys and L{MAX_TEXT_KEYS} different C{TEXT}/C{BODY}
strings (more is L{p2pmta.imapsyntax.TooComplex}), and each held file is
read at most once per SEARCH.
"""

from __future__ import annotations

import datetime
import email.header
import email.utils
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from p2pmta.imapsyntax import (
    Args,
    BadCommand,
    TooComplex,
    inSpans,
    mergeRanges,
    parseDate,
)
from p2pmta.mailindex import MessageRecord

_UTC = datetime.timezone.utc  # noqa: UP017 - Python 3.10 has no datetime.UTC

#: How deep parentheses, NOT and OR may nest in one SEARCH.
MAX_SEARCH_DEPTH = 50
#: How many keys one SEARCH may hold (each is evaluated for every message).
MAX_SEARCH_KEYS = 250
#: How many different C{TEXT} and C{BODY} strings one SEARCH may hold (each
#: is looked for in every held message file).
MAX_TEXT_KEYS = 32


# -- SEARCH keys -------------------------------------------------------------

_FLAG_KEYS = {
    b"ANSWERED": ("\\Answered", True),
    b"DELETED": ("\\Deleted", True),
    b"DRAFT": ("\\Draft", True),
    b"FLAGGED": ("\\Flagged", True),
    b"SEEN": ("\\Seen", True),
    b"UNANSWERED": ("\\Answered", False),
    b"UNDELETED": ("\\Deleted", False),
    b"UNDRAFT": ("\\Draft", False),
    b"UNFLAGGED": ("\\Flagged", False),
    b"UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {b"FROM", b"TO", b"CC", b"BCC", b"SUBJECT"}
_DATE_KEYS = {b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"}


def parseSearch(args: Args):
    """
    Parse C{[CHARSET name] key *(SP key)}.

    @return: C{(charset, key)}, the charset L{None} when not given.
    """
    charset = None
    if args.take(b"CHARSET "):
        charset = args.astring().decode("ascii", "replace").upper()
        args.sp()
    budget = _Budget()
    keys = [_parseKey(args, 0, budget)]
    while args.more():
        args.sp()
        if not args.more():
            break
        keys.append(_parseKey(args, 0, budget))
    args.end()
    return charset, keys[0] if len(keys) == 1 else ("and", keys)


class _Budget:
    """
    What one SEARCH has used of L{MAX_SEARCH_KEYS} and L{MAX_TEXT_KEYS}.
    """

    def __init__(self) -> None:
        self.keys = 0
        self.texts: set = set()

    def key(self) -> None:
        self.keys += 1
        if self.keys > MAX_SEARCH_KEYS:
            raise TooComplex(f"more than {MAX_SEARCH_KEYS} search keys")

    def text(self, needle: bytes) -> None:
        self.texts.add(needle.lower())
        if len(self.texts) > MAX_TEXT_KEYS:
            raise TooComplex(f"more than {MAX_TEXT_KEYS} TEXT or BODY strings")


def _text(args: Args) -> str:
    return args.astring().decode("utf-8", "replace")


def _parseKey(args: Args, depth: int, budget: _Budget):
    if depth > MAX_SEARCH_DEPTH:
        raise BadCommand("search keys nested too deeply")
    budget.key()
    if args.take(b"("):
        keys = [_parseKey(args, depth + 1, budget)]
        while not args.take(b")"):
            args.sp()
            keys.append(_parseKey(args, depth + 1, budget))
        return ("and", keys)
    c = args.peek()
    if c and (c.isdigit() or c == b"*"):
        return ("seq", args.sequenceSet())
    key = args.atom().upper()
    if key == b"ALL":
        return ("all",)
    if key in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[key]
        return ("flag", flag, present)
    if key in (b"NEW", b"RECENT"):
        return ("none",)
    if key == b"OLD":
        return ("all",)
    args.sp()
    if key == b"NOT":
        return ("not", _parseKey(args, depth + 1, budget))
    if key == b"OR":
        first = _parseKey(args, depth + 1, budget)
        args.sp()
        return ("or", first, _parseKey(args, depth + 1, budget))
    if key in _HEADER_KEYS:
        return ("header", key.decode().lower(), _text(args))
    if key == b"HEADER":
        name = args.astring().decode("ascii", "replace").lower()
        args.sp()
        return ("header", name, _text(args))
    if key in (b"TEXT", b"BODY"):
        needle = args.astring()
        budget.text(needle)
        return (key.decode().lower(), needle.lower())
    if key in (b"KEYWORD", b"UNKEYWORD"):
        return ("flag", args.flag(), key == b"KEYWORD")
    if key in (b"LARGER", b"SMALLER"):
        number = args.atom()
        if not number.isdigit() or len(number) > 40:
            raise BadCommand("expected a number")
        return ("size", key == b"LARGER", int(number))
    if key == b"UID":
        return ("uid", args.sequenceSet())
    if key in _DATE_KEYS:
        sent = key.startswith(b"SENT")
        return ("date", key[4:] if sent else key, sent, parseDate(args.astring()))
    raise BadCommand(f"unknown search key {key.decode('ascii', 'replace')}")


def needsBody(key) -> bool:
    """
    @return: whether C{key} reads message bodies (C{TEXT} or C{BODY}).
    """
    kind = key[0]
    if kind in ("text", "body"):
        return True
    if kind == "and":
        return any(needsBody(k) for k in key[1])
    if kind == "or":
        return needsBody(key[1]) or needsBody(key[2])
    if kind == "not":
        return needsBody(key[1])
    return False


def _bodyNeedles(key, found: set) -> set:
    """
    The C{TEXT} and C{BODY} strings of C{key}.
    """
    kind = key[0]
    if kind in ("text", "body"):
        found.add(key[1])
    elif kind == "and":
        for k in key[1]:
            _bodyNeedles(k, found)
    elif kind == "or":
        _bodyNeedles(key[1], found)
        _bodyNeedles(key[2], found)
    elif kind == "not":
        _bodyNeedles(key[1], found)
    return found


def _prepare(key, lastSeq: int, lastUid: int):
    """
    C{key} with its sequence sets merged into spans, C{*} resolved.
    """
    kind = key[0]
    if kind == "seq":
        return ("seq", mergeRanges(key[1], lastSeq))
    if kind == "uid":
        return ("uid", mergeRanges(key[1], lastUid))
    if kind == "and":
        return ("and", [_prepare(k, lastSeq, lastUid) for k in key[1]])
    if kind == "or":
        return (
            "or",
            _prepare(key[1], lastSeq, lastUid),
            _prepare(key[2], lastSeq, lastUid),
        )
    if kind == "not":
        return ("not", _prepare(key[1], lastSeq, lastUid))
    return key


class _Candidate:
    """
    One message being searched; what several keys read (its parsed headers,
    which strings its body holds) is worked out once.
    """

    def __init__(self, seq: int, record: MessageRecord, path, needles) -> None:
        self.seq = seq
        self.record = record
        self.path = path
        self._needles = needles
        self._headers = None
        self._lowerHeaders = None
        self._values: dict = {}
        self._inBody = None
        self.unsearched = False

    def headers(self):
        if self._headers is None:
            self._headers = BytesHeaderParser(policy=compat32).parsebytes(
                self.record.headers
            )
        return self._headers

    def headerValues(self, name: str) -> list:
        """
        The casefolded values of the header fields C{name}, unfolded, each
        as written and RFC 2047-decoded.
        """
        values = self._values.get(name)
        if values is None:
            values = []
            for value in self.headers().get_all(name) or []:
                value = _unfold(str(value))
                values += [value.casefold(), _decoded(value).casefold()]
            self._values[name] = values
        return values

    def lowerHeaders(self) -> bytes:
        if self._lowerHeaders is None:
            self._lowerHeaders = self.record.headers.lower()
        return self._lowerHeaders

    def bodyHas(self, needle: bytes) -> bool:
        """
        Whether the held body (after the header section) holds C{needle}
        (lower case).  The file is read once for all the strings searched.
        """
        if self._inBody is None:
            try:
                if callable(self.path):
                    # Held in the mail store's database.
                    self._inBody = _bytesContain(
                        self.path(), len(self.record.headers), self._needles
                    )
                else:
                    self._inBody = _fileContains(
                        self.path, len(self.record.headers), self._needles
                    )
            except OSError:
                # Expunged while we searched.
                self._inBody = set()
        return needle in self._inBody


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def _decoded(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


def _headerMatches(msg: _Candidate, name: str, needle: str) -> bool:
    needle = needle.casefold()
    return any(needle in value for value in msg.headerValues(name))


def _fileContains(path: str, start: int, needles) -> set:
    """
    Which of C{needles} (lower case) the file at C{path} holds, ASCII
    case-insensitively, at or after C{start}; read once, in chunks.
    """
    chunkSize = 1 << 20
    overlap = max((len(n) for n in needles), default=1) - 1
    left = {n for n in needles if n}
    found = set(needles) - left
    tail = b""
    with open(path, "rb") as f:
        f.seek(start)
        while left and (chunk := f.read(chunkSize)):
            data = tail + chunk.lower()
            hits = {n for n in left if n in data}
            found |= hits
            left -= hits
            tail = data[-overlap:] if overlap else b""
    return found


def _bytesContain(data: bytes, start: int, needles) -> set:
    """L{_fileContains} for a message held as L{bytes}."""
    data = data[start:].lower()
    return {n for n in needles if n in data}


def _matchesText(msg: _Candidate, needle: bytes, headers: bool) -> bool:
    if not needle:
        return True
    if (msg.path is None or headers) and needle in msg.lowerHeaders():
        return True
    if msg.path is None:
        msg.unsearched = True
        return False
    return msg.bodyHas(needle)


def _sentDate(msg: _Candidate):
    value = msg.headers().get("date")
    if value is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(_unfold(str(value))).date()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _matches(key, msg: _Candidate) -> bool:
    kind = key[0]
    record = msg.record
    if kind == "all":
        return True
    if kind == "none":
        return False
    if kind == "and":
        return all(_matches(k, msg) for k in key[1])
    if kind == "or":
        return _matches(key[1], msg) or _matches(key[2], msg)
    if kind == "not":
        return not _matches(key[1], msg)
    if kind == "flag":
        _, flag, present = key
        has = any(f.lower() == flag.lower() for f in record.flags)
        return has == present
    if kind == "header":
        return _headerMatches(msg, key[1], key[2])
    if kind == "text":
        return _matchesText(msg, key[1], headers=True)
    if kind == "body":
        return _matchesText(msg, key[1], headers=False)
    if kind == "size":
        _, larger, n = key
        return record.size > n if larger else record.size < n
    if kind == "seq":
        return inSpans(msg.seq, key[1])
    if kind == "uid":
        return inSpans(record.uid, key[1])
    if kind == "date":
        _, when, sent, date = key
        if sent:
            day = _sentDate(msg)
            if day is None:
                return False
        else:
            day = datetime.datetime.fromtimestamp(record.internalDate, _UTC).date()
        if when == b"BEFORE":
            return day < date
        if when == b"ON":
            return day == date
        return day >= date
    raise AssertionError(kind)


@dataclass
class SearchResult:
    """
    What a SEARCH found.

    @ivar found: The C{(seq, uid)} of the messages that match.
    @ivar unsearched: How many messages had a C{TEXT} or C{BODY} key
        evaluated over their headers only, their body not being here yet.
    """

    found: list
    unsearched: int = 0


def search(key, candidates: list, lastSeq: int, lastUid: int) -> SearchResult:
    """
    Evaluate a parsed SEARCH key.  This may read message files (for
    C{TEXT} and C{BODY} on held messages): then run it in a thread.

    @param candidates: C{(seq, record, path)} for every message of the
        session's view; C{path} is the held file, a callable returning
        the body held in the mail store's database, or L{None}.
    """
    key = _prepare(key, lastSeq, lastUid)
    needles = frozenset(_bodyNeedles(key, set()))
    result = SearchResult([])
    for seq, record, path in candidates:
        msg = _Candidate(seq, record, path, needles)
        if _matches(key, msg):
            result.found.append((seq, record.uid))
        result.unsearched += msg.unsearched
    return result
