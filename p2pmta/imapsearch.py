# -*- test-case-name: tests.test_imap -*-
"""
IMAP command arguments (RFC 3501 section 9), a session's view of its
selected mailbox, and SEARCH over the mail store.

L{Args} reads the arguments of one command: text and literals as the
server's reader collected them.  Every syntax error raises L{BadCommand}, which
the server answers with one tagged BAD; a command that fails raises L{No},
answered with a tagged NO.

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
strings (more is L{TooComplex}), and each held file is read at most once per
SEARCH.
"""

from __future__ import annotations

import bisect
import calendar
import datetime
import email.header
import email.utils
import re
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.mail.imap4 import IMailboxInfo, ISearchableMailbox
from zope.interface import implementer

from p2pmta.mailindex import MessageRecord

_UTC = datetime.timezone.utc  # noqa: UP017 - Python 3.10 has no datetime.UTC

#: How deep parentheses, NOT and OR may nest in one SEARCH.
MAX_SEARCH_DEPTH = 50
#: How many keys one SEARCH may hold (each is evaluated for every message).
MAX_SEARCH_KEYS = 250
#: How many different C{TEXT} and C{BODY} strings one SEARCH may hold (each
#: is looked for in every held message file).
MAX_TEXT_KEYS = 32


class BadCommand(Exception):
    """The command is malformed."""


class TooComplex(Exception):
    """The command is well formed but asks for more work than allowed."""


class No(Exception):
    """
    Answer the command C{NO}, with this text.
    """


class Literal(bytes):
    """
    A literal's bytes, as collected by the server's reader.
    """


_CTL = bytes(range(32)) + b"\x7f"
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]' + _CTL)
_ASTRING_SPECIALS = frozenset(b'(){ %*"\\' + _CTL)
_LIST_SPECIALS = frozenset(b'(){ "\\' + _CTL)
_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()  # noqa: SIM905
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")
_NUMBER = rb"(?:[0-9]{1,40}|\*)"
_SEQSET = re.compile(
    _NUMBER
    + rb"(?::"
    + _NUMBER
    + rb")?(?:,"
    + _NUMBER
    + rb"(?::"
    + _NUMBER
    + rb")?)*\Z"
)


class Args:
    """
    A cursor over one command's text and literals.

    @param parts: Alternating L{bytes} (text) and L{Literal}s, text first
        and last.
    """

    def __init__(self, parts: list) -> None:
        self._parts = parts or [b""]
        self._i = 0
        self._pos = 0

    def _text(self) -> bytes:
        return self._parts[self._i]

    def peek(self):
        """
        @return: the next byte (as L{bytes}), C{b""} at the end, or L{None}
            when a literal comes next.
        """
        text = self._text()
        if self._pos < len(text):
            return text[self._pos : self._pos + 1]
        if self._i + 1 < len(self._parts):
            return None
        return b""

    def more(self) -> bool:
        """
        @return: whether anything is left.
        """
        return self.peek() != b""

    def take(self, expected: bytes) -> bool:
        """
        Consume C{expected} (case-insensitively) if it comes next.
        """
        text = self._text()
        if text[self._pos : self._pos + len(expected)].upper() == expected.upper():
            self._pos += len(expected)
            return True
        return False

    def match(self, pattern):
        """
        Consume what the compiled C{pattern} matches at the cursor, if it
        does.

        @return: the match, or L{None}.
        """
        m = pattern.match(self._text(), self._pos)
        if m is not None:
            self._pos = m.end()
        return m

    def expect(self, expected: bytes) -> None:
        if not self.take(expected):
            raise BadCommand(f"expected {expected.decode()!r}")

    def sp(self) -> None:
        """
        Consume the space between two arguments.
        """
        if not self.take(b" "):
            raise BadCommand("missing argument")

    def end(self) -> None:
        """
        Require the end of the command.
        """
        while self.take(b" "):
            pass
        if self.more():
            raise BadCommand("too many arguments")

    def _run(self, specials) -> bytes:
        text = self._text()
        start = self._pos
        while self._pos < len(text) and text[self._pos] not in specials:
            self._pos += 1
        return text[start : self._pos]

    def atom(self) -> bytes:
        word = self._run(_ATOM_SPECIALS)
        if not word:
            raise BadCommand("missing or malformed argument")
        return word

    def word(self) -> bytes:
        """
        Everything up to the next space or parenthesis (sequence sets).
        """
        word = self._run(frozenset(b" ()"))
        if not word:
            raise BadCommand("missing argument")
        return word

    def _literal(self) -> bytes:
        value = self._parts[self._i + 1]
        self._i += 2
        self._pos = 0
        return bytes(value)

    def _quoted(self) -> bytes:
        text = self._text()
        out = bytearray()
        i = self._pos + 1
        while i < len(text):
            c = text[i]
            if c == 0x5C and i + 1 < len(text) and text[i + 1] in b'"\\':
                out.append(text[i + 1])
                i += 2
            elif c == 0x22:
                self._pos = i + 1
                return bytes(out)
            elif c in b"\r\n":
                break
            else:
                out.append(c)
                i += 1
        raise BadCommand("unterminated quoted string")

    def string(self) -> bytes:
        """
        A quoted string or a literal.
        """
        c = self.peek()
        if c is None:
            return self._literal()
        if c == b'"':
            return self._quoted()
        raise BadCommand("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c is None or c == b'"':
            return self.string()
        word = self._run(_ASTRING_SPECIALS)
        if not word:
            raise BadCommand("missing or malformed argument")
        return word

    def listMailbox(self) -> bytes:
        c = self.peek()
        if c is None or c == b'"':
            return self.string()
        word = self._run(_LIST_SPECIALS)
        if not word:
            raise BadCommand("missing mailbox pattern")
        return word

    def mailbox(self) -> str:
        """
        A mailbox name, decoded from modified UTF-7; C{INBOX} in any case is
        C{"INBOX"}.
        """
        return decodeMailbox(self.astring())

    def flag(self) -> str:
        backslash = self.take(b"\\")
        if backslash and self.take(b"*"):
            raise BadCommand("\\* is not a flag")
        name = self.atom().decode("ascii", "replace")
        if not backslash:
            return name
        for system in SYSTEM_FLAGS:
            if system.lower() == "\\" + name.lower():
                return system
        if name.lower() == "recent":
            return "\\Recent"
        raise BadCommand(f"unknown system flag \\{name}")

    def flagList(self, parenthesised: bool = True) -> list:
        """
        C{(flag ...)}, or (when not C{parenthesised}) flags separated by
        spaces up to the end.
        """
        flags = []
        if self.take(b"("):
            while not self.take(b")"):
                if flags:
                    self.sp()
                flags.append(self.flag())
            return flags
        if parenthesised:
            raise BadCommand("expected a flag list")
        flags.append(self.flag())
        while self.take(b" "):
            flags.append(self.flag())
        return flags

    def sequenceSet(self) -> list:
        return parseSequenceSet(self.word())


SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def flagList(flags) -> bytes:
    """
    Flags as an IMAP parenthesised list.
    """
    return b"(" + " ".join(sorted(flags)).encode("utf-8", "replace") + b")"


def formatSet(numbers) -> bytes:
    """
    Numbers as a compact IMAP sequence set.
    """
    out, run = [], None
    for n in sorted(numbers):
        if run and n == run[1] + 1:
            run[1] = n
            continue
        if run:
            out.append(run)
        run = [n, n]
    if run:
        out.append(run)
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in out)


def decodeMailbox(name: bytes, pattern: bool = False) -> str:
    """
    A mailbox name (or, with C{pattern}, a LIST pattern) from modified
    UTF-7; C{INBOX} in any case is C{"INBOX"}.
    """
    try:
        text = name.decode("imap4-utf-7")
    except Exception as e:  # any codec error: a bad name
        raise BadCommand("malformed mailbox name") from e
    return "INBOX" if text.upper() == "INBOX" and not pattern else text


def parseSequenceSet(token: bytes) -> list:
    """
    @return: the ranges of an IMAP sequence set: a list of C{(low, high)}
        where L{None} stands for C{*}.
    @raise BadCommand: if it is malformed or holds a zero.
    """
    if not _SEQSET.match(token):
        raise BadCommand("malformed sequence set")
    ranges = []
    for item in token.split(b","):
        ends = [None if x == b"*" else int(x) for x in item.split(b":")]
        if 0 in ends:
            raise BadCommand("0 is not a message number")
        ranges.append((ends[0], ends[-1]))
    return ranges


def mergeRanges(ranges: list, last: int) -> tuple[list, list]:
    """
    The ranges of a sequence set as sorted, disjoint spans, C{*} being
    C{last}: a list of their starts and a list of their ends.
    """
    spans = sorted(
        (min(low, high), max(low, high))
        for low, high in (
            (last if a is None else a, last if b is None else b) for a, b in ranges
        )
    )
    starts: list = []
    ends: list = []
    for low, high in spans:
        if ends and low <= ends[-1] + 1:
            ends[-1] = max(ends[-1], high)
        else:
            starts.append(low)
            ends.append(high)
    return starts, ends


def inSpans(n: int, spans: tuple[list, list]) -> bool:
    """
    Whether C{n} is in the spans L{mergeRanges} made.
    """
    starts, ends = spans
    i = bisect.bisect_right(starts, n) - 1
    return i >= 0 and n <= ends[i]


def resolveSet(ranges: list, ids) -> list:
    """
    The members of the sorted C{ids} (a list or a L{range}) that a sequence
    set names, in order.  Only the ids held are visited, never the whole
    range a client wrote, and overlapping ranges are merged first:
    C{1:99999999999999999999} or 15,000 times C{2:*} cost no more than
    C{1:*}.
    """
    if not len(ids):
        return []
    found: list = []
    for low, high in zip(*mergeRanges(ranges, ids[-1])):
        found.extend(ids[bisect.bisect_left(ids, low) : bisect.bisect_right(ids, high)])
    return found


def parseDate(raw: bytes) -> datetime.date:
    m = _DATE.match(raw)
    if m is None or m.group(2).decode().lower() not in _MONTHS:
        raise BadCommand("malformed date")
    month = _MONTHS.index(m.group(2).decode().lower()) + 1
    try:
        return datetime.date(int(m.group(3)), month, int(m.group(1)))
    except ValueError as e:
        raise BadCommand("invalid date") from e


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


_DATETIME = re.compile(
    rb'"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) '
    rb'([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"'
)


def parseDateTime(args: Args):
    """
    An optional quoted date-time (APPEND).

    @return: seconds since the epoch, or L{None} if none comes next.
    """
    m = args.match(_DATETIME)
    if m is None:
        return None
    day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
    if month.decode().lower() not in _MONTHS:
        raise BadCommand("malformed date-time")
    try:
        fields = (
            int(year),
            _MONTHS.index(month.decode().lower()) + 1,
            int(day.strip()),
            int(hh),
            int(mm),
            int(ss),
            0,
            0,
            0,
        )
        time.struct_time(fields)
        when = calendar.timegm(fields)
    except (ValueError, OverflowError) as e:
        raise BadCommand("malformed date-time") from e
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(when - offset if sign == b"+" else when + offset)


# -- a session's view of its selected mailbox ----------------------------------


@implementer(IMailboxInfo, ISearchableMailbox)
class SelectedMailbox:
    """
    One session's view of a selected mailbox: its own sequence-number to
    UID list, and the changes made by others that it has not announced
    yet.

    @ivar uids: The UIDs the session knows, in order: sequence number
        C{n} is C{uids[n - 1]}.
    @ivar onChange: Called (no argument) after each change of the mailbox.
    """

    def __init__(self, store, name: str, rw: bool) -> None:
        self.store = store
        self.name = name
        self.rw = rw
        self.uids = store.uids(name)
        self.onChange = None
        self._expunged: set = set()
        self._added: set = set()
        self._flagged: set = set()
        store.addListener(name, self._changed)

    def close(self) -> None:
        self.store.removeListener(self.name, self._changed)
        self.onChange = None

    def _changed(self, event: str, uid: int) -> None:
        known = self.seqOf(uid) is not None
        if event == "added" and not known:
            self._added.add(uid)
        elif event == "expunged":
            if known:
                self._expunged.add(uid)
                self._flagged.discard(uid)
            self._added.discard(uid)
        elif event == "flags" and known:
            self._flagged.add(uid)
        if self.onChange is not None:
            self.onChange()

    def seqOf(self, uid: int):
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, ranges: list, byUid: bool) -> list:
        """
        @return: C{(seq, uid)} of the messages a sequence set names in this
            view.
        """
        if byUid:
            return [(self.seqOf(u), u) for u in resolveSet(ranges, self.uids)]
        return [
            (n, self.uids[n - 1])
            for n in resolveSet(ranges, range(1, len(self.uids) + 1))
        ]

    def flagsReported(self, uids) -> None:
        self._flagged.difference_update(uids)

    def announcements(self, expunges: bool) -> list:
        """
        Apply the pending changes to the view and return the untagged
        lines that announce them: EXPUNGE (only if C{expunges}), FETCH
        FLAGS, EXISTS.
        """
        lines = []
        if expunges and self._expunged:
            for uid in sorted(self._expunged, reverse=True):
                seq = self.seqOf(uid)
                if seq is not None:
                    del self.uids[seq - 1]
                    lines.append(b"* %d EXPUNGE" % seq)
            self._expunged.clear()
        for uid in sorted(self._flagged):
            record = self.store.record(self.name, uid)
            seq = self.seqOf(uid)
            if record is not None and seq is not None:
                lines.append(b"* %d FETCH (FLAGS %s)" % (seq, flagList(record.flags)))
        self._flagged.clear()
        added = sorted(
            u for u in self._added if self.store.record(self.name, u) is not None
        )
        self._added.clear()
        if added:
            self.uids.extend(u for u in added if not self.uids or u > self.uids[-1])
            lines.append(b"* %d EXISTS" % len(self.uids))
        return lines

    def getFlags(self) -> list:
        keywords = set()
        for record in self.store.messages(self.name):
            keywords.update(f for f in record.flags if not f.startswith("\\"))
        return [*SYSTEM_FLAGS, *sorted(keywords)]

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def evaluate(self, query, uid: bool) -> Deferred:
        """
        Evaluate a key parsed by L{parseSearch} over this view.

        @return: a Deferred firing with a L{SearchResult} whose C{found} are
            the matching UIDs (C{uid}) or sequence numbers.
        """
        candidates = []
        for seq, u in enumerate(self.uids, 1):
            record = self.store.record(self.name, u)
            if record is not None:
                path = self.store.bodySource(self.name, u) if record.held else None
                candidates.append((seq, record, path))
        last = (len(self.uids), self.uids[-1] if self.uids else 0)
        if needsBody(query) or len(candidates) > 500:
            d = self.store.runInThread(search, query, candidates, *last)
        else:
            d = maybeDeferred(search, query, candidates, *last)

        def numbers(result: SearchResult) -> SearchResult:
            result.found = [u if uid else s for s, u in result.found]
            return result

        return d.addCallback(numbers)

    def search(self, query, uid) -> Deferred:
        """
        C{ISearchableMailbox.search}: L{evaluate}'s numbers.
        """
        return self.evaluate(query, uid).addCallback(lambda result: result.found)
