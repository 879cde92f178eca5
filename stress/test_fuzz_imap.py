"""
Hypothesis-driven IMAP command streams (issue 6): valid, malformed and
hostile commands, seeded with the cases of C{tests.test_hostile_imap}, cut
at random places into C{dataReceived} calls, through L{p2pmta.imap} on a
string transport, logged in (or not) over a real L{MailStore} in a
temporary folder.

For every stream: each tagged command gets exactly one tagged completion
(OK, NO or BAD); no internal error is answered or logged; no command stalls
the reactor for more than about 100 ms of CPU (work the store does in its
threadpool not counted); the session still answers NOOP at
the end.  C{P2PMTA_STRESS_SCALE} scales the number of streams (about a
minute at 1).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import tempfile
import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import fail, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.errors import BodyUnavailable
from p2pmta.imapreader import MAX_COMMAND, MAX_LINE
from tests.test_hostile_imap import (
    MALFORMED,
    Session,
    SyncThreadPool,
    nestedMultipart,
    openSyncStore,
)
from tests.test_imap import MULTIPART, PASSWORD, USER, headersOf, message

SCALE = float(os.environ.get("P2PMTA_STRESS_SCALE", "1"))
#: Streams tried at scale 1 (about a minute on two shared cores).
EXAMPLES = 6500
#: The longest a C{dataReceived} may take, per command it completes ...
STALL = 0.1
#: ... plus this per byte it is given: a 64 KiB command of a thousand
#: ranges is parsed in Python, and one chunk may hold several (a stall is
#: time out of proportion to the input, not a long input).
STALL_PER_BYTE = 2e-6
LIMIT = 4096

_READS_LINES = re.compile(
    rb"\A(?:IDLE|AUTHENTICATE|STARTTLS|LOGOUT)(?:\Z|[^A-Za-z])", re.IGNORECASE
)
_ENDS_WITH_LITERAL = re.compile(rb"\{[0-9]*\+?\}?\Z")


class Unit:
    """
    What the client sends for one command, and whether it carries a tag of
    ours that must be completed once.
    """

    def __init__(self, text: bytes, tagged: bool = True, last: bool = False) -> None:
        self.text = text
        self.tagged = tagged
        self.last = last

    def __repr__(self) -> str:
        return f"Unit({self.text[:120]!r}, tagged={self.tagged})"


# -- strategies ------------------------------------------------------------

numbers = st.sampled_from(
    [
        b"1",
        b"2",
        b"3",
        b"*",
        b"7",
        b"4294967295",
        b"4294967296",
        b"99999999999999999999",
    ]
)


@st.composite
def sequenceSets(draw):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            parts.append(draw(numbers) + b":" + draw(numbers))
        else:
            parts.append(draw(numbers))
    return b",".join(parts)


fetchAtts = st.sampled_from(
    [
        b"FLAGS",
        b"UID",
        b"ENVELOPE",
        b"BODYSTRUCTURE",
        b"BODY",
        b"RFC822.SIZE",
        b"INTERNALDATE",
        b"BODY.PEEK[]",
        b"BODY[TEXT]",
        b"BODY.PEEK[HEADER]",
        b"BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)]",
        b"BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)]",
        b"BODY.PEEK[1]",
        b"BODY.PEEK[2.MIME]",
        b"BODY.PEEK[2.1.TEXT]",
        b"BODY.PEEK[]<0.10>",
        b"BODY.PEEK[1]<5.99999999999>",
        b"RFC822",
        b"RFC822.HEADER",
        b"RFC822.TEXT",
    ]
)
macros = st.sampled_from([b"FAST", b"ALL", b"FULL"])
flags = st.lists(
    st.sampled_from(
        [b"\\Seen", b"\\Deleted", b"\\Flagged", b"\\Answered", b"$Work", b"\\Draft"]
    ),
    max_size=3,
)
searchKeys = st.lists(
    st.sampled_from(
        [
            b"ALL",
            b"SEEN",
            b"UNSEEN",
            b"DELETED",
            b"FLAGGED",
            b"NEW",
            b"OLD",
            b"KEYWORD $Work",
            b"FROM bob",
            b"SUBJECT hello",
            b"TEXT body",
            b"BODY part",
            b'HEADER Message-ID "<2@demo>"',
            b"SINCE 1-Jan-2020",
            b"BEFORE 1-Jan-2099",
            b"SENTON 1-Jan-2024",
            b"LARGER 100",
            b"SMALLER 99999999999999999999",
            b"UID 2:*",
            b"1:3",
            b"NOT SEEN",
            b"OR SEEN FLAGGED",
            b"(FROM bob SUBJECT 2)",
            b"CHARSET UTF-8 TEXT x",
        ]
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def simpleCommands(draw) -> bytes:
    """
    One command line without literals (possibly valid in no state).
    """
    kind = draw(st.integers(0, 17))
    uid = b"UID " if draw(st.booleans()) else b""
    if kind == 0:
        return draw(st.sampled_from([b"NOOP", b"CHECK", b"CAPABILITY", b"NAMESPACE"]))
    if kind == 1:
        return draw(
            st.sampled_from(
                [
                    b"SELECT INBOX",
                    b"EXAMINE INBOX",
                    b"SELECT Sent",
                    b"SELECT Nope",
                    b"SELECT inbox",
                ]
            )
        )
    if kind == 2:
        return b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT)"
    if kind == 3:
        return draw(
            st.sampled_from(
                [b'LIST "" *', b'LSUB "" %', b'LIST "" ""', b"LIST x/ INBOX"]
            )
        )
    if kind in (4, 5):
        atts = draw(st.lists(fetchAtts, min_size=1, max_size=4))
        what = (
            draw(macros)
            if draw(st.integers(0, 5)) == 0
            else b"(" + b" ".join(atts) + b")"
        )
        return uid + b"FETCH " + draw(sequenceSets()) + b" " + what
    if kind == 6:
        item = draw(
            st.sampled_from(
                [b"FLAGS", b"+FLAGS", b"-FLAGS", b"+FLAGS.SILENT", b"FLAGS.SILENT"]
            )
        )
        return (
            uid
            + b"STORE "
            + draw(sequenceSets())
            + b" "
            + item
            + b" ("
            + b" ".join(draw(flags))
            + b")"
        )
    if kind in (7, 8):
        return uid + b"SEARCH " + b" ".join(draw(searchKeys))
    if kind == 9:
        return (
            uid
            + b"COPY "
            + draw(sequenceSets())
            + b" "
            + draw(st.sampled_from([b"Sent", b"Nope", b"Outbox"]))
        )
    if kind == 10:
        return draw(st.sampled_from([b"EXPUNGE", b"CLOSE", b"UNSELECT"]))
    if kind == 11:
        return b"UID EXPUNGE " + draw(sequenceSets())
    if kind == 12:
        return draw(
            st.sampled_from(
                [
                    b"CREATE x",
                    b"DELETE Sent",
                    b"RENAME a b",
                    b"SUBSCRIBE INBOX",
                    b"UNSUBSCRIBE Nope",
                ]
            )
        )
    if kind == 13:
        return b"LOGIN %s %s" % (
            USER.encode(),
            draw(st.sampled_from([PASSWORD.encode(), b"wrong"])),
        )
    if kind == 14:
        return b"AUTHENTICATE PLAIN " + base64.b64encode(
            b"\0" + USER.encode() + b"\0" + PASSWORD.encode()
        )
    if kind == 15:
        return draw(st.sampled_from(MALFORMED))
    if kind == 16:
        return b"SEARCH " + b",".join([b"2:*"] * draw(st.integers(1, 3000)))
    return b"FETCH 1:99999999999999999999 (UID)"


@st.composite
def mutated(draw) -> bytes:
    """
    A command line broken at random: slices removed, bytes inserted,
    truncated.
    """
    text = bytearray(draw(simpleCommands()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(text)))
        if op == 0:
            del text[at : at + draw(st.integers(1, 8))]
        elif op == 1:
            junk = (
                draw(st.binary(min_size=1, max_size=8))
                .replace(b"\r", b"")
                .replace(b"\n", b"")
            )
            text[at:at] = junk
        else:
            del text[at:]
    return bytes(text)


def _safe(text: bytes) -> bytes:
    """
    Keep a broken command from reading lines that belong to the next one
    (a trailing literal, IDLE, AUTHENTICATE) or ending the session.
    """
    if _ENDS_WITH_LITERAL.search(text) or _READS_LINES.match(text.lstrip()):
        text += b" x"
    return text


@st.composite
def units(draw) -> Unit:
    kind = draw(st.integers(0, 19))
    if kind <= 7:
        return Unit(draw(simpleCommands()))
    if kind <= 10:
        return Unit(_safe(draw(mutated())))
    if kind == 11:
        data = draw(st.sampled_from([message(9), MULTIPART, b"", b"x" * 100]))
        head = draw(
            st.sampled_from(
                [b"", b"(\\Seen) ", b'"05-Feb-2024 10:00:00 +0100" ', b"() "]
            )
        )
        plus = b"+" if draw(st.booleans()) else b""
        box = draw(st.sampled_from([b"INBOX", b"Sent", b"Outbox", b"Nope"]))
        return Unit(b"APPEND %s %s{%d%s}\r\n%s" % (box, head, len(data), plus, data))
    if kind == 12:
        size = draw(st.integers(LIMIT + 1, 3 * LIMIT))
        if draw(st.booleans()):
            # Synchronizing: the data goes only if the server asks for it.
            return Unit(b"APPEND INBOX {%d}\r\n%s" % (size, b"q" * size))
        return Unit(
            b"APPEND INBOX {%d+}\r\n%s {3+}\r\nabc"
            % (size, b"A1 EXPUNGE\r\n" * (size // 12) + b"x" * (size % 12))
        )
    if kind == 13:
        return Unit(
            b"LOGIN {%d}\r\n%s {%d}\r\n%s"
            % (len(USER), USER.encode(), len(PASSWORD), PASSWORD.encode())
        )
    if kind == 14:
        return Unit(b"IDLE\r\nDONE")
    if kind == 15:
        return Unit(b"AUTHENTICATE PLAIN\r\n*")
    if kind == 16:
        filler = draw(st.sampled_from([b" ", b"x", b"9"]))
        return Unit(
            b"SEARCH TEXT " + filler * draw(st.integers(MAX_LINE - 20, MAX_LINE + 2000))
        )
    if kind == 17:
        size = draw(st.integers(MAX_COMMAND - 10, MAX_COMMAND + 10))
        return Unit(b"LOGIN {%d+}\r\n%s x" % (size, b"p" * size))
    if kind == 18:
        junk = draw(st.binary(max_size=40)).replace(b"\r", b"").replace(b"\n", b"")
        return Unit(
            _safe(draw(st.sampled_from([b"(", b"*", b" ", b"+"])) + junk), tagged=False
        )
    return Unit(
        draw(
            st.sampled_from(
                [b"STARTTLS", b"LOGOUT", b"APPEND INBOX {99999999999999999999+}\r\nxx"]
            )
        ),
        last=True,
    )


def streams():
    return st.lists(units(), min_size=3, max_size=40)


# -- running a stream ----------------------------------------------------------


_SYNC_LITERAL = re.compile(rb"\{[0-9]+\}\r\n")


class Stream:
    """
    One stream: each command's bytes, split after each synchronizing
    literal announcement (where a client waits for the server's go-ahead),
    and the tags that must see a completion.
    """

    def __init__(self, items: list) -> None:
        self.commands: list = []
        self.tags: list = []
        self.final = False
        for i, unit in enumerate(items):
            if self.final:
                break
            if unit.tagged:
                tag = b"T%d" % i
                self.tags.append(tag)
                data = tag + b" " + unit.text + b"\r\n"
            else:
                data = unit.text + b"\r\n"
            segments, start = [], 0
            for m in _SYNC_LITERAL.finditer(data):
                segments.append(data[start : m.end()])
                start = m.end()
            segments.append(data[start:])
            self.commands.append(segments)
            self.final = unit.last


def cut(data: bytes, points: list) -> list:
    """
    C{data} cut at C{points} (fractions of its length).
    """
    at = sorted({int(p * len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at) if b > a]


class TimedThreadPool(SyncThreadPool):
    """
    Runs the store's thread work at once, keeping count of the CPU time it
    takes: in a real server that work runs in threads, not the reactor.
    """

    spent = 0.0

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        started = time.thread_time()

        def done(ok, result):
            self.spent += time.thread_time() - started
            onResult(ok, result)

        super().callInThreadWithCallback(done, f, *args, **kwargs)


class Errors:
    """
    Collects logged failures and errors while a stream runs.
    """

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        level = getattr(event.get("log_level"), "name", "")
        if "log_failure" in event or level in ("error", "critical"):
            self.events.append(event)


def fetcher(failures: list):
    """
    A body puller answering at once from C{message(n)}, failing for the
    messages listed in C{failures}.
    """

    def pull(mailbox, record):
        n = record.meta["n"]
        if n in failures:
            return fail(BodyUnavailable("sender offline"))
        path = os.path.join(pull.directory, f"pulled-{record.uid}")
        with open(path, "wb") as f:
            f.write(message(n))
        return succeed(path)

    return pull


SEEDS = [
    [Unit(b"SELECT INBOX")]
    + [
        Unit(text)
        for text in (
            b"FETCH 1:99999999999999999999 (UID)",
            b"UID FETCH 1:4294967295 (FLAGS)",
            b"UID FETCH * (FLAGS)",
            b"UID FETCH 4294967296 (FLAGS)",
            *MALFORMED,
            b"FETCH 1:* (BODYSTRUCTURE BODY.PEEK[1.1.1])",
            b"UID SEARCH TEXT hello",
        )
    ],
    [
        Unit(b"APPEND INBOX {4294967296}"),
        Unit(b"APPEND INBOX {%d+}\r\n%s" % (LIMIT + 1, b"y" * (LIMIT + 1))),
        Unit(b"NOOP " + b" " * (MAX_LINE + 10)),
        Unit(b"SEARCH TEXT " + b"z" * (MAX_LINE * 2)),
        Unit(b"NOOP"),
        Unit(b"STARTTLS", last=True),
    ],
    # Input piles up behind a delayed failed LOGIN, then the session ends.
    [
        Unit(b"LOGIN alice@demo wrong"),
        *[Unit(b"NOOP".ljust(60000, b" "))] * 5,
        Unit(b"APPEND INBOX {99999999999999999999+}\r\nxx", last=True),
    ],
]


class FuzzIMAPTests(SynchronousTestCase):
    """
    Random command streams through one IMAP session.
    """

    def run_stream(self, items: list, points: list, start: str) -> None:
        directory = tempfile.mkdtemp(
            prefix="p2pfuzz", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        errors = Errors()
        globalLogPublisher.addObserver(errors)
        try:
            self._runStream(directory, items, points, start, errors)
        finally:
            globalLogPublisher.removeObserver(errors)
            shutil.rmtree(directory, ignore_errors=True)

    def _runStream(self, directory, items, points, start, errors) -> None:
        pool = TimedThreadPool()
        store = openSyncStore(directory, pool)
        try:
            pull = fetcher([4])
            pull.directory = directory
            store.bodyFetcher = pull
            store.append("INBOX", message(1), ["\\Seen"])
            store.append("INBOX", MULTIPART)
            for n in (3, 4):
                data = message(n)
                store.deliver("INBOX", headersOf(data), len(data), {"n": n})
            store.append("INBOX", nestedMultipart(120))
            session = Session(
                store,
                login=start != "unauth",
                select=b"INBOX" if start == "selected" else None,
                tlsOptions=object(),
                maxMessageSize=LIMIT,
            )
            # Failed logins are answered after a delay on the session's
            # clock, advanced past them; idle timeouts are not the subject.
            session.proto.postAuthTimeout = None
            session.proto.setTimeout(None)
            stream = Stream(items)
            output: list = []

            def feed(data: bytes) -> None:
                for chunk in cut(data, points):
                    started, inPool = time.thread_time(), pool.spent
                    session.proto.dataReceived(chunk)
                    for _ in range(100):
                        if not session.clock.getDelayedCalls():
                            break
                        session.clock.advance(10)
                    elapsed = time.thread_time() - started - (pool.spent - inPool)
                    lines = session.output()
                    output.extend(lines)
                    completions = sum(
                        1 for line in lines if re.match(rb"T\d+ (OK|NO|BAD)", line)
                    )
                    self.assertLess(
                        elapsed,
                        STALL * max(1, completions) + STALL_PER_BYTE * len(chunk) + 0.05,
                        chunk[:200],
                    )

            first = max(store.uids("INBOX"))
            pending = b""
            for segments in stream.commands:
                for i, segment in enumerate(segments):
                    pending += segment
                    if i < len(segments) - 1:
                        # A client waits for the go-ahead, or gives up.
                        feed(pending)
                        pending = b""
                        if output[-1:] != [b"+ Ready for literal data"]:
                            break
            feed(pending)
            if not stream.final:
                session.feed(b"ZZ NOOP\r\n")
                output += session.output()
                self.assertEqual(output[-1:], [b"ZZ OK NOOP completed"], items)
            for tag in stream.tags:
                completions = [line for line in output if line.startswith(tag + b" ")]
                self.assertEqual(len(completions), 1, (tag, completions, items))
                self.assertRegex(completions[0], rb"\A\S+ (OK|NO|BAD)( |\Z)")
            for line in output:
                self.assertNotRegex(line, rb"SERVERBUG|[Ii]nternal error|Server error")
            for record in store.messages("INBOX"):
                if record.uid > first:
                    # Added by APPEND: never past the limit.
                    self.assertLessEqual(record.size, LIMIT)
            session.close()
            self.assertEqual(errors.events, [])
        finally:
            store.close()

    @settings(
        max_examples=max(1, int(EXAMPLES * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        items=streams(),
        points=st.lists(st.floats(0, 1), max_size=12),
        start=st.sampled_from(["selected", "auth", "unauth"]),
    )
    @example(items=SEEDS[0], points=[], start="selected")
    @example(items=SEEDS[0], points=[i / 500 for i in range(500)], start="selected")
    @example(items=SEEDS[1], points=[0.1, 0.5, 0.9], start="auth")
    @example(items=SEEDS[2], points=[], start="unauth")
    def test_everyCommandAnsweredOnce(self, items, points, start):
        """
        Every tagged command gets exactly one tagged completion, nothing
        internal fails, nothing stalls, and the session goes on.
        """
        self.run_stream(items, points, start)
