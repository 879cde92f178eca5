# -*- test-case-name: tests.test_imapsyntax,tests.test_imap -*-
"""
The IMAP syntax (RFC 3501 section 9) a session reads and writes: the
arguments of commands, and the strings, parenthesised lists, flag lists
and sequence sets of its answers.

L{Args} reads the arguments of one command: text and literals as the
server's reader collected them.  Every syntax error raises L{BadCommand}, which
the server answers with one tagged BAD; a command that fails raises L{No},
answered with a tagged NO, and one that asks for more work than allowed
raises L{TooComplex}.

Sequence sets are resolved against the ids held (L{resolveSet}), never
materialised: the work they cost is bounded by the messages held, not by
the range a client wrote.
"""

from __future__ import annotations

import bisect
import calendar
import datetime
import re
import time


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
