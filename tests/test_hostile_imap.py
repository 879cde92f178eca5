"""
Hostile and broken input against L{p2pmta.imap} (issue 6): enormous
ranges, malformed commands, huge lines and literals, sessions that expunge
under each other, a full disk, STARTTLS injection, SEARCH over mail not
pulled yet, absurd MIME.  Each case must end in a clear protocol answer, a
usable connection, nothing accepted earlier lost or changed, and bounded
memory.

Most cases drive L{IMAPServer} on a string transport over a real
L{MailStore} whose threadpool runs work at once, so a whole command is
answered within C{dataReceived}; the literal, long-line, STARTTLS, range
and disk-full cases also run over real TCP, and SEARCH over real peers.
C{tests.test_imap} already covers the plain cases; this module does not
repeat them.
"""

from __future__ import annotations

import errno
import gc
import imaplib
import os
import re
import shutil
import sqlite3
import ssl
import subprocess
import tempfile
import time
import tracemalloc

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.mail.imap4 import IAccount
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from p2pmta.address import Address
from p2pmta.auth import makePortal
from p2pmta.imap import IMAPFactory
from p2pmta.imapaccount import Account
from p2pmta.imapreader import MAX_COMMAND, MAX_LINE
from p2pmta.imapsearch import MAX_SEARCH_KEYS, MAX_TEXT_KEYS
from p2pmta.imapsyntax import parseSequenceSet, resolveSet
from p2pmta.mailstore import MailStore
from p2pmta.mimestructure import MAX_MIME_DEPTH, MAX_MIME_PARTS, describe
from tests.peers import PeerHarness
from tests.test_imap import PASSWORD, USER, RawClient, headersOf, message

# -- a store and a server without threads or sockets --------------------------


class SyncThreadPool:
    """
    A threadpool that runs each call at once, in the caller's thread.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - as Twisted's ThreadPool does
            onResult(False, Failure())
        else:
            onResult(True, result)


class SyncReactor:
    """
    What L{MailStore} needs of a reactor, with no thread to come back from.
    """

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class PumpingTransport(StringTransport):
    """
    A string transport that drains pull producers (FETCH streams its
    answers through one) and records C{startTLS}.
    """

    tlsStarted = None

    def registerProducer(self, producer, streaming):
        super().registerProducer(producer, streaming)
        if not streaming:
            while self.producer is producer:
                producer.resumeProducing()

    def startTLS(self, options):
        self.tlsStarted = options


def openSyncStore(directory: str, threadpool=None) -> MailStore:
    """
    An open L{MailStore} in C{directory} whose disk work runs at once (in
    C{threadpool}, a L{SyncThreadPool} by default).
    """
    store = MailStore(
        SyncReactor(),
        os.path.join(directory, "db"),
        os.path.join(directory, "md"),
        threadpool or SyncThreadPool(),
    )
    opened = []
    store.open().addBoth(opened.append)
    [result] = opened
    if isinstance(result, Failure):
        result.raiseException()
    return store


def syncStore(testCase) -> MailStore:
    """
    L{openSyncStore} in a temporary folder, closed at the end of the test.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    store = openSyncStore(directory)
    testCase.addCleanup(store.close)
    return store


def responseLines(data: bytes) -> list:
    """
    Server output as lines, each literal joined into its line.
    """
    lines, i = [], 0
    while i < len(data):
        end = data.find(b"\r\n", i)
        if end < 0:
            lines.append(data[i:])
            break
        line = data[i:end]
        i = end + 2
        while (m := re.search(rb"\{(\d+)\}$", line)) is not None:
            size = int(m.group(1))
            end = data.find(b"\r\n", i + size)
            end = len(data) if end < 0 else end
            line += b"\r\n" + data[i:end]
            i = end + 2
        lines.append(line)
    return lines


def tagged(lines: list, tag: bytes) -> list:
    """
    The tagged completions of C{tag} among C{lines}.
    """
    return [line for line in lines if line.startswith(tag + b" ")]


class Session:
    """
    One L{IMAPServer} over a L{PumpingTransport}.
    """

    def __init__(self, store, login=True, select=None, tlsOptions=None, **kwargs):
        self.clock = Clock()
        portal = makePortal(
            self.clock,
            Address.parse(USER),
            PASSWORD,
            {IAccount: lambda: Account(store)},
        )
        self.factory = IMAPFactory(
            portal, store, tlsOptions=tlsOptions, clock=self.clock, **kwargs
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = PumpingTransport()
        self.proto.makeConnection(self.transport)
        self.greeting = self.output()
        if login:
            self.command(b"L", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        if select is not None:
            self.command(b"S", b"SELECT " + select)

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        """
        Feed C{data}, in pieces of C{chunk} bytes if given.
        """
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            self.proto.dataReceived(data[i : i + step])

    def output(self) -> list:
        """
        The lines written since last asked.
        """
        lines = responseLines(self.transport.value())
        self.transport.clear()
        return lines

    def command(self, tag: bytes, text: bytes, chunk: int | None = None) -> list:
        """
        Send one command; return every line written up to its completion,
        which must have come.
        """
        self.feed(tag + b" " + text + b"\r\n", chunk)
        lines = self.output()
        assert len(tagged(lines, tag)) == 1, (text[:100], lines[-5:])
        assert lines[-1].startswith(tag + b" "), (text[:100], lines[-5:])
        return lines

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("test over")))


def fill(store: MailStore, count: int, mailbox: str = "INBOX") -> list:
    """
    Announce C{count} messages by their headers, as notifications do.
    """
    for n in range(1, count + 1):
        data = message(n)
        store.deliver(mailbox, headersOf(data), len(data), {"n": n})
    return store.uids(mailbox)


def snapshot(store: MailStore, mailbox: str = "INBOX") -> list:
    """
    What the store holds of a mailbox, to compare before and after.
    """
    result = []
    for record in store.messages(mailbox):
        path = store.filePath(mailbox, record.uid)
        body = None
        if path is not None:
            with open(path, "rb") as f:
                body = f.read()
        result.append((record.uid, record.flags, record.headers, record.size, body))
    return result


# -- 1. ranges -----------------------------------------------------------------


class RangeTests(SynchronousTestCase):
    """
    Enormous and repeated ranges cost what the messages held cost.
    """

    def setUp(self):
        self.store = syncStore(self)

    def test_hugeRanges(self):
        """
        C{1:99999999999999999999}, C{1:4294967295}, C{*} and numbers past
        2^32 answer the messages held (or none), each at once.
        """
        fill(self.store, 5)
        session = Session(self.store, select=b"INBOX")
        cases = [
            (b"FETCH 1:99999999999999999999 (UID)", [1, 2, 3, 4, 5]),
            (b"UID FETCH 1:4294967295 (FLAGS)", [1, 2, 3, 4, 5]),
            (b"UID FETCH * (FLAGS)", [5]),
            (b"UID FETCH 4294967296 (FLAGS)", []),
            (b"UID FETCH 4294967296:* (FLAGS)", [5]),
            (b"FETCH 4294967296 (UID)", []),
            (b"FETCH 99999999999999999999:* (UID)", [5]),
            (b"UID FETCH 18446744073709551616:18446744073709551617 (UID)", []),
            (b"UID STORE 6:4294967295 +FLAGS (\\Seen)", []),
            (b"UID SEARCH UID 3:99999999999999999999", None),
        ]
        for i, (text, expected) in enumerate(cases):
            tag = b"t%d" % i
            started = time.monotonic()
            lines = session.command(tag, text)
            self.assertLess(time.monotonic() - started, 1, text)
            self.assertTrue(lines[-1].startswith(tag + b" OK"), (text, lines))
            if expected is not None:
                uids = [
                    int(m.group(1))
                    for line in lines
                    if (m := re.search(rb"UID (\d+)", line))
                ]
                if text.startswith(b"UID STORE"):
                    self.assertEqual(lines, [tag + b" OK STORE completed"])
                else:
                    self.assertEqual(uids, expected, text)
        self.assertEqual(lines[0], b"* SEARCH 3 4 5")

    def test_overlappingRangesMerged(self):
        """
        A set of 15,000 overlapping ranges is merged before it is
        resolved: against a million ids it costs one pass, not 15,000.
        """
        ranges = parseSequenceSet(b",".join([b"2:*"] * 15000))
        started = time.monotonic()
        found = resolveSet(ranges, range(1, 1_000_001))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((len(found), found[0], found[-1]), (999_999, 2, 1_000_000))
        self.assertEqual(
            resolveSet(parseSequenceSet(b"5:3,9,4:6,1,*"), [1, 3, 4, 6, 9, 12]),
            [1, 3, 4, 6, 9, 12],
        )

    def test_repeatedRangesOverTheWire(self):
        """
        FETCH, SEARCH and UID SEARCH with 15,000 ranges over 3,000 messages
        answer in well under a second each.
        """
        fill(self.store, 3000)
        session = Session(self.store, select=b"INBOX")
        ranges = b",".join([b"2:*"] * 15000)
        for tag, text in [
            (b"a", b"FETCH " + ranges + b" (UID)"),
            (b"b", b"SEARCH " + ranges),
            (b"c", b"SEARCH UID " + ranges),
            (b"d", b"UID SEARCH NOT " + ranges),
        ]:
            started = time.monotonic()
            lines = session.command(tag, text)
            self.assertLess(time.monotonic() - started, 2, text[:20])
            self.assertTrue(lines[-1].startswith(tag + b" OK"), lines[-1])
        self.assertEqual(lines[0], b"* SEARCH 1")

    def test_searchWorkBounded(self):
        """
        A SEARCH of more than L{MAX_SEARCH_KEYS} keys, or more than
        L{MAX_TEXT_KEYS} different TEXT/BODY strings, gets C{NO [LIMIT]};
        one at the limits is answered quickly; the session goes on.
        """
        fill(self.store, 1000)
        self.store.append("INBOX", message(0, body=b"needle 7 in a haystack\r\n"))
        session = Session(self.store, select=b"INBOX")
        tooMany = b" ".join([b"SUBJECT x"] * (MAX_SEARCH_KEYS + 1))
        lines = session.command(b"a", b"SEARCH " + tooMany)
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith(b"a NO [LIMIT]"), lines)
        texts = b" ".join(b"TEXT n%d" % i for i in range(MAX_TEXT_KEYS + 1))
        lines = session.command(b"b", b"SEARCH " + texts)
        self.assertTrue(lines[0].startswith(b"b NO [LIMIT]"), lines)

        keys = [
            b"OR SUBJECT x%d FROM y%d" % (i, i)
            for i in range((MAX_SEARCH_KEYS - 2) // 3)
        ]
        started = time.monotonic()
        lines = session.command(b"c", b"SEARCH NOT (" + b" ".join(keys) + b")")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(len(lines[0].split()), 2 + 1001)
        texts = [b"BODY needle"] + [b"TEXT n%d" % i for i in range(MAX_TEXT_KEYS - 1)]
        lines = session.command(
            b"d", b"UID SEARCH OR (" + b" ".join(texts) + b") UID 1"
        )
        self.assertEqual(lines[-2], b"* SEARCH 1")
        lines = session.command(b"e", b"UID SEARCH BODY needle")
        self.assertIn(b"* SEARCH 1001", lines)
        self.assertTrue(session.command(b"f", b"NOOP")[-1].startswith(b"f OK"))


# -- 2. malformed commands -------------------------------------------------------

MALFORMED = [
    b"STATUS INBOX (FOO)",
    b"SEARCH (",
    b"SEARCH OR",
    b"STORE 1 FLAGS",
    b"FETCH 1 (FOO)",
    b"FETCH 1 BODY[",
    b"FETCH 1 BODY[HEADER.FIELDS ()]",
    b"STORE 1 +FLAGS (\\Seen",
    b"STORE 1 FLAGS.NOISY (\\Seen)",
    b"SEARCH UID 1:*:3",
    b"SEARCH HEADER",
    b"SEARCH SINCE 1-Jan-99999",
    b"FETCH 1:2,, FLAGS",
    b"COPY 1",
    b"UID EXPUNGE",
    b"EXPUNGE 1",
    b"APPEND INBOX (\\Seen) NOT-A-LITERAL",
    b'APPEND INBOX "05-Foo-2024 10:00:00 +0100"',
    b"SELECT INBOX EXTRA",
    b"FETCH 1 BODY[1.0]",
    b"FETCH 1 BODY.PEEK",
    b"FETCH 1 (FLAGS",
    b"STATUS INBOX (\x80MESSAGES)",
    b"SEARCH \xff\xfe",
    b"FETCH 1 BODY.PEEK[HEADER.FIELDS (\xe9)",
]


class MalformedCommandTests(SynchronousTestCase):
    """
    Malformed commands, however they arrive, get exactly one tagged BAD.
    """

    def setUp(self):
        self.store = syncStore(self)
        fill(self.store, 3)
        self.store.setFlags("INBOX", [2], ["\\Flagged"], "add")
        self.before = snapshot(self.store)

    def check(self, lines: list, tags: list) -> None:
        for tag, text in tags:
            completions = tagged(lines, tag)
            self.assertEqual(len(completions), 1, (text, completions))
            self.assertTrue(
                completions[0].startswith(tag + b" BAD "), (text, completions)
            )
        self.assertFalse([line for line in lines if line.startswith(b"+")], lines)
        self.assertFalse([line for line in lines if b"SERVERBUG" in line], lines)
        self.assertEqual(snapshot(self.store), self.before)

    def test_onePerPacket(self):
        """
        Sent one at a time, each gets one BAD and the next command works.
        """
        session = Session(self.store, select=b"INBOX")
        for i, text in enumerate(MALFORMED):
            tag = b"m%d" % i
            lines = session.command(tag, text)
            self.check(lines, [(tag, text)])
            ok = session.command(b"n%d" % i, b"FETCH 2 (UID FLAGS)")
            self.assertEqual(ok[0], b"* 2 FETCH (UID 2 FLAGS (\\Flagged))")

    def test_pipelinedAndChunked(self):
        """
        Pipelined in one packet, or fed a byte at a time or in odd pieces,
        the answers are the same and in order.
        """
        stream = b"".join(b"m%d %s\r\n" % (i, c) for i, c in enumerate(MALFORMED))
        stream += b"z FETCH 1:* (UID)\r\n"
        tags = [(b"m%d" % i, c) for i, c in enumerate(MALFORMED)]
        for chunk in (None, 1, 7, 4096):
            session = Session(self.store, select=b"INBOX")
            session.feed(stream, chunk)
            lines = session.output()
            self.check(lines, tags)
            order = [line.split()[0] for line in lines if not line.startswith(b"*")]
            self.assertEqual(order, [t for t, _ in tags] + [b"z"])
            self.assertEqual(
                lines[-4:-1], [b"* %d FETCH (UID %d)" % (n, n) for n in (1, 2, 3)]
            )
            session.close()

    def test_otherStates(self):
        """
        Before login and before SELECT, commands of other states and
        malformed ones get one BAD each; the session goes on.
        """
        session = Session(self.store, login=False)
        for i, text in enumerate(
            [b"FETCH 1 (UID)", b"SELECT INBOX", b"LOGIN", b"AUTHENTICATE", b"NOOP x"]
        ):
            self.check(session.command(b"u%d" % i, text), [(b"u%d" % i, text)])
        session.command(b"l", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        for i, text in enumerate(MALFORMED[:6] + [b"LOGIN a b", b"STARTTLS"]):
            self.check(session.command(b"a%d" % i, text), [(b"a%d" % i, text)])
        self.assertTrue(session.command(b"z", b"SELECT INBOX")[-1].startswith(b"z OK"))

    def test_noTagOrGarbage(self):
        """
        Lines without a tag, empty lines and control bytes get an untagged
        BAD; nothing else happens.
        """
        session = Session(self.store, select=b"INBOX")
        session.feed(b"\r\n \r\n(\r\n\x00\x01\xff\r\n*\r\n+ x\r\nz NOOP\r\n")
        lines = session.output()
        self.assertEqual(lines[:-1], [b"* BAD Missing or malformed tag"] * 6)
        self.assertTrue(lines[-1].startswith(b"z OK"))
        self.assertEqual(snapshot(self.store), self.before)


# -- 3. long lines -----------------------------------------------------------------


class LineLengthTests(SynchronousTestCase):
    """
    Lines up to 64 KiB are read; longer ones get one BAD with a bounded
    buffer.
    """

    def setUp(self):
        self.store = syncStore(self)

    def test_exactly64KiB(self):
        """
        A line of exactly 64 KiB (without its CRLF) is a command; one byte
        more is refused.
        """
        session = Session(self.store)
        line = b"a NOOP".ljust(MAX_LINE, b" ")
        session.feed(line + b"\r\n")
        self.assertEqual(session.output(), [b"a OK NOOP completed"])
        session.feed(b"b NOOP".ljust(MAX_LINE + 1, b" ") + b"\r\n")
        self.assertEqual(session.output(), [b"b BAD Command line too long"])

    def test_hugeLineBufferBounded(self):
        """
        A 16 MiB line, fed as the network would, never makes the buffer
        grow past one line and one read; it gets one BAD and the next
        command works.
        """
        session = Session(self.store)
        session.feed(b"big SEARCH TEXT ")
        peak = 0
        chunk = b"x" * 65536
        for _ in range(256):
            session.proto.dataReceived(chunk)
            peak = max(peak, len(session.proto._reader.buffer))
        self.assertEqual(session.output(), [])
        session.feed(b"\r\nc NOOP\r\n")
        self.assertEqual(
            session.output(), [b"big BAD Command line too long", b"c OK NOOP completed"]
        )
        self.assertLessEqual(peak, MAX_LINE + 2 * 65536)

    def test_longContinuationLine(self):
        """
        A line over 64 KiB after a literal fails its command, tagged by the
        command's first line.
        """
        session = Session(self.store, login=False)
        session.feed(b"a LOGIN {5}\r\n")
        self.assertEqual(session.output(), [b"+ Ready for literal data"])
        session.feed(b"alice " + b"p" * (MAX_LINE + 10) + b"\r\nb NOOP\r\n")
        self.assertEqual(
            session.output(), [b"a BAD Command line too long", b"b OK NOOP completed"]
        )

    def test_longLineWhileWaiting(self):
        """
        An over-long line where IDLE waits for DONE or AUTHENTICATE for its
        response ends that command with a BAD carrying its own tag.
        """
        session = Session(self.store, select=b"INBOX")
        session.feed(b"i IDLE\r\n")
        self.assertEqual(session.output(), [b"+ idling"])
        session.feed(b"DONE" * 20000 + b"\r\nn NOOP\r\n")
        lines = session.output()
        self.assertEqual(lines, [b"i BAD line too long", b"n OK NOOP completed"])

        session = Session(self.store, login=False)
        session.feed(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(session.output(), [b"+ "])
        session.feed(b"QUFB" * 20000 + b"\r\nn NOOP\r\n")
        self.assertEqual(
            session.output(), [b"a BAD line too long", b"n OK NOOP completed"]
        )


# -- 5. literals -------------------------------------------------------------------


class LiteralLimitTests(SynchronousTestCase):
    """
    Literals over the limits are refused before they are read; refused
    non-synchronizing ones are skipped, not stored.
    """

    def setUp(self):
        self.store = syncStore(self)
        self.store.append("INBOX", message(1))
        self.before = snapshot(self.store)

    def session(self, **kwargs):
        return Session(self.store, maxMessageSize=1000, **kwargs)

    def test_appendLimitAdvertised(self):
        """
        After login CAPABILITY advertises APPENDLIMIT (RFC 7889).
        """
        session = self.session()
        self.assertIn(b" APPENDLIMIT=1000", session.command(b"c", b"CAPABILITY")[0])

    def test_synchronizingNeverContinued(self):
        """
        C{{4294967296}} and C{{1001}} get C{NO [TOOBIG]} and no continuation;
        the literal is not awaited.
        """
        session = self.session()
        for size in (1001, 4294967296, 10**19):
            session.feed(b"a APPEND INBOX (\\Seen) {%d}\r\n" % size, 3)
            self.assertEqual(
                session.output(),
                [b"a NO [TOOBIG] Message too large (APPENDLIMIT=1000)"],
            )
        self.assertTrue(session.command(b"b", b"NOOP")[0].startswith(b"b OK"))
        self.assertEqual(snapshot(self.store), self.before)

    def test_nonSynchronizingSkipped(self):
        """
        A non-synchronizing APPEND literal over the limit gets
        C{NO [TOOBIG]} at once; its bytes (which may look like commands) and
        the rest of its command, further literals included, are dropped;
        the next command works.
        """
        body = b"x EXPUNGE\r\ny LOGOUT\r\n" * 200
        stream = b"a APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s\r\nb NOOP\r\n" % (
            len(body),
            body,
            len(body),
            body,
        )
        for chunk in (None, 1, 1000):
            session = self.session()
            session.feed(stream, chunk)
            lines = session.output()
            self.assertEqual(
                lines,
                [
                    b"a NO [TOOBIG] Message too large (APPENDLIMIT=1000)",
                    b"b OK NOOP completed",
                ],
            )
            self.assertEqual(session.proto._reader.buffer, b"")
        self.assertEqual(snapshot(self.store), self.before)

    def test_nonSynchronizingOtherCommand(self):
        """
        Outside APPEND a literal over the command limit gets
        C{BAD [TOOBIG]}, skipped the same way.
        """
        session = self.session(login=False)
        size = MAX_COMMAND + 1
        session.feed(
            b"a LOGIN {%d+}\r\n" % size + b"p" * size + b" x\r\nb NOOP\r\n", 65536
        )
        self.assertEqual(
            session.output(),
            [b"a BAD [TOOBIG] Literal too large", b"b OK NOOP completed"],
        )

    def test_literalOfCommandNotAllowedNow(self):
        """
        A literal of a command that cannot run in the session's state (or
        is unknown) gets BAD at once, without continuation; a
        non-synchronizing one is skipped.
        """
        session = self.session(login=False)
        session.feed(b"a APPEND INBOX {100}\r\n")
        session.feed(b"b FROB {5}\r\n")
        session.feed(b"c SELECT {5+}\r\nINBOX\r\nd NOOP\r\n")
        self.assertEqual(
            session.output(),
            [
                b"a BAD APPEND is not allowed now",
                b"b BAD unknown command",
                b"c BAD SELECT is not allowed now",
                b"d OK NOOP completed",
            ],
        )
        session.feed(b"e LOGIN {10}\r\n")
        self.assertEqual(session.output(), [b"+ Ready for literal data"])
        session.feed(b"alice@demo secret\r\n")
        self.assertTrue(session.output()[-1].startswith(b"e OK"))

    def test_nonSynchronizingTooLargeToSkip(self):
        """
        A non-synchronizing literal too large to be worth reading gets its
        tagged answer, then C{BYE} and the connection closes.
        """
        session = self.session()
        session.feed(b"a APPEND INBOX {99999999999999999999+}\r\nxxxx")
        self.assertEqual(
            session.output(),
            [
                b"a NO [TOOBIG] Message too large (APPENDLIMIT=1000)",
                b"* BYE Literal too large to skip",
            ],
        )
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(snapshot(self.store), self.before)

    def test_closedWhileReadingPaused(self):
        """
        Input piled up behind a slow command (reading paused) that ends in
        C{BYE}: the connection closes without reading being resumed.
        """
        session = self.session(login=False)
        session.feed(b"a LOGIN alice@demo wrong\r\n")
        noop = b"n NOOP".ljust(60000, b" ") + b"\r\n"
        session.feed(noop * 5 + b"c APPEND INBOX {99999999999999999999+}\r\n")
        self.assertEqual(session.transport.producerState, "paused")
        session.clock.advance(10)
        lines = session.output()
        self.assertEqual(
            lines[-2:],
            [b"c BAD APPEND is not allowed now", b"* BYE Literal too large to skip"],
        )
        self.assertEqual(lines.count(b"n OK NOOP completed"), 5)
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(session.transport.producerState, "paused")
        gc.collect()  # an error left in a Deferred is logged when collected
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_hugeHeaderSection(self):
        """
        APPEND of a message whose header section is over 256 KiB (the store
        keeps headers in memory) gets C{NO [LIMIT]}.
        """
        session = Session(self.store)
        data = b"X-Junk: " + b"j" * (300 * 1024) + b"\r\n\r\nbody\r\n"
        session.feed(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(data), data))
        self.assertEqual(session.output(), [b"a NO [LIMIT] Header section too large"])
        self.assertEqual(snapshot(self.store), self.before)


# -- 6. a full disk ----------------------------------------------------------------


class DiskFullTests(SynchronousTestCase):
    """
    A full disk fails the command with C{NO [OVERQUOTA]}; what was stored
    stays, and the same command works once there is room.
    """

    def setUp(self):
        self.store = syncStore(self)
        self.store.append("INBOX", message(1), ["\\Seen"])
        self.store.append("INBOX", message(2))
        self.before = snapshot(self.store)
        self.session = Session(self.store, select=b"INBOX")

    def append(self, tag: bytes, n: int) -> list:
        data = message(n)
        self.session.feed(b"%s APPEND INBOX {%d+}\r\n%s\r\n" % (tag, len(data), data))
        return self.session.output()

    def files(self) -> list:
        return sorted(os.listdir(os.path.join(self.store._maildir, "cur"))) + sorted(
            os.listdir(os.path.join(self.store._maildir, "tmp"))
        )

    def test_messageFileNoSpace(self):
        """
        ENOSPC writing the message file: C{NO [OVERQUOTA] Not enough disk
        space}, UIDNEXT unchanged, nothing logged as a bug; later APPEND
        works and gets the next UID.
        """
        real = self.store._files.writeMessage

        def full(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.store._files.writeMessage = full
        files = self.files()
        self.assertEqual(
            self.append(b"a", 3), [b"a NO [OVERQUOTA] Not enough disk space"]
        )
        self.assertEqual(self.store.uidNext("INBOX"), 3)
        self.assertEqual(snapshot(self.store), self.before)
        self.assertEqual(self.files(), files)
        self.store._files.writeMessage = real
        lines = self.append(b"b", 3)
        self.assertTrue(
            lines[-1].startswith(
                b"b OK [APPENDUID %d 3]" % self.store.uidValidity("INBOX")
            )
        )
        self.assertEqual(lines[0], b"* 3 EXISTS")
        self.assertEqual(snapshot(self.store)[:2], self.before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_pulledBodyNoSpace(self):
        """
        A pulled body that cannot be stored: C{NO [UNAVAILABLE]} saying the
        disk is full, the sender not told (C{attachedHook} not called);
        once there is room the next FETCH stores it and tells.
        """
        store = self.store
        data = message(3)
        store.deliver("INBOX", headersOf(data), len(data), {})
        pulled = os.path.abspath(self.mktemp())

        def pull(mailbox, record):
            with open(pulled, "wb") as f:
                f.write(data)
            return succeed(pulled)

        told = []
        store.bodyFetcher = pull
        store.attachedHook = lambda mailbox, record: told.append(record.uid)
        real = store._database.transaction

        def full(statements, durable=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.session.command(b"n", b"NOOP")
        store._database.transaction = full
        files = self.files()
        lines = self.session.command(b"a", b"UID FETCH 3 (BODY.PEEK[])")
        self.assertTrue(lines[-1].startswith(b"a NO [UNAVAILABLE]"), lines)
        self.assertIn(b"disk holding the mail store is full", lines[-1])
        self.assertEqual((told, self.files()), ([], files))
        store._database.transaction = real
        lines = self.session.command(b"b", b"UID FETCH 3 (BODY.PEEK[])")
        self.assertIn(data, lines[-2])
        self.assertEqual(told, [3])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_databaseFull(self):
        """
        SQLite's "database or disk is full" fails APPEND and STORE the same
        way; the file written for the APPEND is removed.
        """
        real = self.store._database.transaction

        def full(statements, durable=False):
            raise sqlite3.OperationalError("database or disk is full")

        self.store._database.transaction = full
        files = self.files()
        self.assertEqual(
            self.append(b"a", 3), [b"a NO [OVERQUOTA] Not enough disk space"]
        )
        self.assertEqual(
            self.session.command(b"b", b"STORE 1:2 +FLAGS (\\Flagged)"),
            [b"b NO [OVERQUOTA] Not enough disk space"],
        )
        self.assertEqual(self.files(), files)
        self.assertEqual(snapshot(self.store), self.before)
        self.store._database.transaction = real
        self.assertTrue(self.append(b"c", 3)[-1].startswith(b"c OK [APPENDUID"))
        lines = self.session.command(b"d", b"STORE 1:2 +FLAGS (\\Flagged)")
        self.assertEqual(lines[-1], b"d OK STORE completed")
        self.assertEqual(self.flushLoggedErrors(), [])


# -- 4. sessions expunging under each other ---------------------------------------


class ConcurrentExpungeTests(SynchronousTestCase):
    """
    Two sessions on one mailbox: one expunges while the other works by
    sequence number.  The other's numbers keep naming what they named.
    """

    def setUp(self):
        self.store = syncStore(self)
        self.pending: dict = {}
        self.store.bodyFetcher = self.pull
        self.uids = fill(self.store, 5)
        self.a = Session(self.store, select=b"INBOX")
        self.b = Session(self.store, select=b"INBOX")

    def pull(self, mailbox, record):
        d = Deferred()
        self.pending[record.uid] = (d, record.meta["n"])
        return d

    def release(self) -> None:
        """
        Complete the pulls under way, and those they let start.
        """
        while self.pending:
            d, n = self.pending.pop(min(self.pending))
            path = os.path.abspath(self.mktemp())
            with open(path, "wb") as f:
                f.write(message(n))
            d.callback(path)

    def expungeInB(self, *seqs: int) -> None:
        numbers = b",".join(b"%d" % s for s in seqs)
        self.b.command(b"b1", b"STORE " + numbers + b" +FLAGS.SILENT (\\Deleted)")
        self.b.command(b"b2", b"EXPUNGE")

    def test_storeBySequenceAfterExpunge(self):
        """
        After B expunges 2 and 4: A's STORE 2 is refused
        (C{NO [EXPUNGEISSUED]}) and flags nothing, STORE 3 flags UID 3,
        SEARCH answers A's numbers, no EXPUNGE is sent during them; a UID
        command then announces both, and STORE 2 names UID 3.
        """
        self.expungeInB(2, 4)
        gone = self.a.command(b"a1", b"STORE 2 +FLAGS (\\Flagged)")
        self.assertEqual(
            gone[-1], b"a1 NO [EXPUNGEISSUED] Some messages were expunged meanwhile"
        )
        three = self.a.command(b"a2", b"STORE 3 +FLAGS (\\Answered)")
        self.assertEqual(three[0], b"* 3 FETCH (FLAGS (\\Answered))")
        search = self.a.command(b"a3", b"SEARCH ANSWERED")
        self.assertEqual(search[0], b"* SEARCH 3")
        fetch = self.a.command(b"a4", b"FETCH 1:* (UID)")
        self.assertEqual(
            [line for line in fetch if b"FETCH" in line],
            [b"* 1 FETCH (UID 1)", b"* 3 FETCH (UID 3)", b"* 5 FETCH (UID 5)"],
        )
        for lines in (gone, three, search, fetch):
            self.assertFalse(
                [line for line in lines if line.endswith(b"EXPUNGE")], lines
            )
        announced = self.a.command(b"a5", b"UID STORE 5 +FLAGS (\\Draft)")
        self.assertEqual(
            announced,
            [
                b"* 5 FETCH (FLAGS (\\Draft) UID 5)",
                b"* 4 EXPUNGE",
                b"* 2 EXPUNGE",
                b"a5 OK STORE completed",
            ],
        )
        self.a.command(b"a6", b"STORE 2 +FLAGS (\\Seen)")
        flags = {r.uid: r.flags for r in self.store.messages("INBOX")}
        self.assertEqual(
            flags, {1: frozenset(), 3: {"\\Answered", "\\Seen"}, 5: {"\\Draft"}}
        )

    def test_expungeWhileFetchWaitsForBodies(self):
        """
        B expunges while A's FETCH waits for bodies to be pulled: A's
        answer names only messages that still exist, by A's numbers and
        with their own Message-IDs, then C{NO [EXPUNGEISSUED]}; the
        EXPUNGEs come with A's next NOOP.
        """
        self.a.feed(
            b"a1 FETCH 1:5 (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] BODY.PEEK[TEXT])\r\n"
        )
        self.assertEqual(self.a.output(), [])
        # A window's bodies are all asked for at once.
        self.assertEqual(sorted(self.pending), [1, 2, 3, 4, 5])
        self.expungeInB(2, 4)
        # B's 3 is UID 5 now; A still calls it 5.
        self.b.command(b"b3", b"STORE 3 +FLAGS.SILENT (\\Flagged)")
        self.release()
        lines = self.a.output()
        fetched = [line for line in lines if b" FETCH (UID" in line]
        self.assertEqual(len(fetched), 3)
        for line, (seq, uid) in zip(fetched, [(1, 1), (3, 3), (5, 5)]):
            self.assertTrue(line.startswith(b"* %d FETCH (UID %d " % (seq, uid)), line)
            self.assertIn(b"Message-ID: <%d@demo>" % uid, line)
            self.assertIn(b"Body of message %d." % uid, line)
        self.assertFalse([line for line in lines if line.endswith(b"EXPUNGE")])
        self.assertIn(b"* 5 FETCH (FLAGS (\\Flagged))", lines)
        self.assertEqual(self.store.record("INBOX", 5).flags, {"\\Flagged"})
        self.assertEqual(
            lines[-1], b"a1 NO [EXPUNGEISSUED] Some messages were expunged meanwhile"
        )
        noop = self.a.command(b"a2", b"NOOP")
        self.assertEqual(noop[:2], [b"* 4 EXPUNGE", b"* 2 EXPUNGE"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_searchAndCopyKeepTheView(self):
        """
        SEARCH and COPY by sequence number after B's expunge use A's
        numbers: SEARCH 1:5 lists the survivors by their old numbers; COPY
        copies exactly those and says some were expunged.
        """
        self.expungeInB(1, 3)
        search = self.a.command(b"a1", b"SEARCH 1:5")
        self.assertEqual(search[0], b"* SEARCH 2 4 5")
        copy = self.a.command(b"a2", b"COPY 1:3 Sent")
        self.assertEqual(
            copy, [b"a2 NO [EXPUNGEISSUED] Some messages were expunged meanwhile"]
        )
        self.assertEqual([r.meta["n"] for r in self.store.messages("Sent")], [2])
        noop = self.a.command(b"a3", b"NOOP")
        self.assertEqual(noop[:2], [b"* 3 EXPUNGE", b"* 1 EXPUNGE"])
        self.assertEqual(self.a.command(b"a4", b"SEARCH 1:*")[0], b"* SEARCH 1 2 3")


# -- 7. STARTTLS injection -------------------------------------------------------


class StartTLSInjectionTests(SynchronousTestCase):
    """
    Whatever comes with STARTTLS in the same read is dropped.
    """

    def test_injectedAfterPipelinedCommands(self):
        """
        C{a CAPABILITY}, C{b STARTTLS} and injected commands (one with a
        literal) in one packet: a and b are answered, the rest dropped
        before TLS starts; nothing is logged in, no continuation sent.
        """
        store = syncStore(self)
        session = Session(store, login=False, tlsOptions=object())
        login = b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode())
        session.feed(
            b"a CAPABILITY\r\nb STARTTLS\r\nc " + login + b"\r\nd SELECT INBOX\r\n"
            b"e LOGIN {9}\r\nalice@demo secret\r\n"
        )
        lines = session.output()
        self.assertIn(b"STARTTLS", lines[0])
        self.assertEqual(
            lines[1:], [b"a OK CAPABILITY completed", b"b OK Begin TLS negotiation now"]
        )
        self.assertIsNotNone(session.transport.tlsStarted)
        self.assertEqual(session.proto.state, "unauth")
        caps = session.command(b"f", b"CAPABILITY")
        self.assertNotIn(b"STARTTLS", caps[0])
        self.assertEqual(
            session.command(b"g", b"STARTTLS"), [b"g NO TLS not available"]
        )
        self.assertTrue(session.command(b"h", login)[-1].startswith(b"h OK"))


# -- 9. absurd MIME -------------------------------------------------------------


def nestedMultipart(depth: int) -> bytes:
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ncore" + tail


def nestedMessages(depth: int) -> bytes:
    return (
        b"Subject: outer\r\n"
        + b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" * depth
        + b"\r\ncore\r\n"
    )


def manyParts(count: int) -> bytes:
    return (
        b'Subject: wide\r\nContent-Type: multipart/mixed; boundary="w"\r\n\r\n'
        + b"".join(
            b"--w\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n%d\r\n" % i
            for i in range(count)
        )
        + b"--w--\r\n"
    )


def nesting(line: bytes) -> int:
    depth = top = 0
    for c in re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', line):
        if c == 0x28:
            depth += 1
            top = max(top, depth)
        elif c == 0x29:
            depth -= 1
    return top


class MimeBombTests(SynchronousTestCase):
    """
    MIME nested 101 and 2,000 deep, and 100,000 tiny parts: answered in
    bounded time and memory, the structure capped (at L{MAX_MIME_DEPTH}
    levels and L{MAX_MIME_PARTS} entities) and the bytes served whole.
    """

    def fetch(self, data: bytes, items: bytes) -> tuple:
        store = syncStore(self)
        store.append("INBOX", data)
        session = Session(store, select=b"INBOX")
        tracemalloc.start()
        started = time.monotonic()
        try:
            lines = session.command(b"f", b"FETCH 1 (" + items + b")")
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertTrue(lines[-1].startswith(b"f OK"), lines[-1])
        self.assertLess(elapsed, 20)
        self.assertLess(peak, 100 * 1024 * 1024)
        return lines[0], elapsed

    def test_nested101(self):
        """
        101 levels: the 101st multipart is shown as one opaque part, whose
        bytes (with the rest nested in it) C{BODY[1.1...]} serves.
        """
        data = nestedMultipart(101)
        line, _ = self.fetch(
            data,
            b"BODYSTRUCTURE BODY.PEEK[" + b".".join([b"1"] * MAX_MIME_DEPTH) + b"]",
        )
        self.assertIn(b'("APPLICATION" "OCTET-STREAM"', line)
        self.assertLessEqual(nesting(line), MAX_MIME_DEPTH + 5)
        header = b'Content-Type: multipart/mixed; boundary="b100"\r\n\r\n'
        start = data.index(header) + len(header)
        end = data.index(b"\r\n--b99--")
        self.assertTrue(line.endswith(b"\r\n" + data[start:end] + b")"))

    def test_nested2000Multipart(self):
        """
        2,000 nested multiparts: structure capped, whole message exact.
        """
        data = nestedMultipart(2000)
        line, _ = self.fetch(data, b"BODY BODYSTRUCTURE BODY.PEEK[]")
        self.assertLessEqual(nesting(line), 2 * MAX_MIME_DEPTH + 10)
        self.assertTrue(line.endswith(b"\r\n" + data + b")"))

    def test_nested2000Messages(self):
        """
        2,000 nested message/rfc822: structure (with envelopes) capped.
        """
        data = nestedMessages(2000)
        line, _ = self.fetch(data, b"BODYSTRUCTURE BODY.PEEK[1.1.1.TEXT] ENVELOPE")
        self.assertLessEqual(nesting(line), 4 * MAX_MIME_DEPTH + 10)
        self.assertIn(b'"inner"', line)

    def test_hundredThousandParts(self):
        """
        100,000 tiny parts: BODYSTRUCTURE lists the first
        L{MAX_MIME_PARTS} entities' worth, BODY[n] past them is empty,
        BODY[] is exact.
        """
        data = manyParts(100_000)
        line, _ = self.fetch(
            data, b"BODYSTRUCTURE BODY.PEEK[7] BODY.PEEK[99999] BODY.PEEK[]"
        )
        self.assertEqual(line.count(b'("TEXT" "PLAIN"'), MAX_MIME_PARTS - 1)
        self.assertIn(b"BODY[7] {1}\r\n6 ", line)
        self.assertIn(b"BODY[99999] {0}\r\n ", line)
        self.assertTrue(line.endswith(b"\r\n" + data + b")"))

    def test_structureWrittenInThread(self):
        """
        BODY and BODYSTRUCTURE are written out by L{describe} (which runs
        in the store's threadpool), not by the reactor.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(manyParts(20_000))
        root = describe(path)
        self.assertEqual(set(root.rendered), {"BODY", "BODYSTRUCTURE"})
        self.assertTrue(
            root.rendered["BODYSTRUCTURE"].endswith(
                b' "MIXED" ("BOUNDARY" "w") NIL NIL NIL)'
            )
        )
        self.assertGreater(root.cost, len(root.rendered["BODYSTRUCTURE"]))


# -- the same over real TCP ------------------------------------------------------


class TCPServerMixin:
    """
    A real server on 127.0.0.1 over a real L{MailStore} with a real
    threadpool, for raw sockets and C{imaplib} in threads.
    """

    maxMessageSize = 1024 * 1024

    @inlineCallbacks
    def startServer(self, maildir=None, tlsOptions=None):
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-hostile-imap")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.store = MailStore(
            reactor,
            os.path.join(self.dir, "db"),
            maildir or os.path.join(self.dir, "md"),
            self.pool,
        )
        yield self.store.open()
        portal = makePortal(
            reactor,
            Address.parse(USER),
            PASSWORD,
            {IAccount: lambda: Account(self.store)},
        )
        self.factory = IMAPFactory(
            portal, self.store, tlsOptions, maxMessageSize=self.maxMessageSize
        )
        self.servers: list = []
        self.clients: list = []
        build = self.factory.buildProtocol

        def buildProtocol(addr):
            proto = build(addr)
            self.servers.append(proto)
            return proto

        self.factory.buildProtocol = buildProtocol
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.stopServer)

    @inlineCallbacks
    def stopServer(self):
        for client in self.clients:
            try:
                client.close() if isinstance(client, RawClient) else client.shutdown()
            except OSError:
                pass
        yield self.port.stopListening()
        for _ in range(300):
            if all(p._closed for p in self.servers):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield self.store.close()

    def raw(self, login=True) -> RawClient:
        client = RawClient(self.port.getHost().port)
        self.clients.append(client)
        if login:
            client.login()
        return client

    def imap(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port.getHost().port, timeout=30)
        self.clients.append(client)
        client.login(USER, PASSWORD)
        return client


class TCPTests(TCPServerMixin, TestCase):
    """
    The range, line-length, literal and STARTTLS cases over real TCP.
    """

    timeout = 120

    def setUp(self):
        return self.startServer()

    @inlineCallbacks
    def test_ranges(self):
        """
        With C{imaplib}: huge FETCH and UID FETCH ranges answer the
        messages held, quickly.
        """
        for n in (1, 2, 3):
            yield self.store.append("INBOX", message(n))

        def session():
            client = self.imap()
            client.select("INBOX")
            started = time.monotonic()
            answers = [
                client.fetch("1:99999999999999999999", "(UID)"),
                client.uid("FETCH", "1:4294967295", "(UID)"),
                client.uid("FETCH", "*", "(UID)"),
                client.uid("FETCH", "4294967296", "(UID)"),
                client.fetch(",".join(["2:*"] * 10000), "(UID)"),
            ]
            return answers, time.monotonic() - started

        answers, elapsed = yield deferToThread(session)
        self.assertLess(elapsed, 5)
        self.assertEqual([typ for typ, _ in answers], ["OK"] * 5)
        self.assertEqual(
            [data for _, data in answers],
            [
                [b"1 (UID 1)", b"2 (UID 2)", b"3 (UID 3)"],
                [b"1 (UID 1)", b"2 (UID 2)", b"3 (UID 3)"],
                [b"3 (UID 3)"],
                [None],
                [b"2 (UID 2)", b"3 (UID 3)"],
            ],
        )

    @inlineCallbacks
    def test_longLines(self):
        """
        A line of exactly 64 KiB is a command; a 20 MiB line gets one BAD
        while the server's buffer stays under 64 KiB plus two reads; the
        connection goes on.
        """
        peaks = []
        client = yield deferToThread(self.raw)
        [proto] = self.servers
        received = proto.dataReceived

        def dataReceived(data):
            received(data)
            peaks.append(len(proto._reader.buffer))

        proto.dataReceived = dataReceived

        def session():
            exact = client.command(b"a", b"NOOP".ljust(MAX_LINE - 2, b" "))
            client.send(b"b SEARCH TEXT ")
            block = b"y" * (1 << 20)
            for _ in range(20):
                client.send(block)
            client.send(b"\r\n")
            return exact, client.response(b"b"), client.command(b"c", b"NOOP")

        exact, huge, noop = yield deferToThread(session)
        self.assertEqual(exact, [b"a OK NOOP completed"])
        self.assertEqual(huge, [b"b BAD Command line too long"])
        self.assertTrue(noop[-1].startswith(b"c OK"))
        self.assertLess(max(peaks), MAX_LINE + 2 * 65536 + 2)

    @inlineCallbacks
    def test_floodWithoutReading(self):
        """
        A client that sends a million bad lines and reads nothing gets no
        more answers queued than the socket buffers hold: the server stops
        reading until its answers are read, then answers every line.
        """
        client = yield deferToThread(self.raw, False)
        [proto] = self.servers
        sent = []
        send = proto._send

        def counting(line):
            sent.append(len(line))
            send(line)

        proto._send = counting
        lines = 1_000_000
        flood = b"\r\n" * lines + b"z NOOP\r\n"
        sender = deferToThread(client.send, flood)
        for _ in range(50):
            if sender.called:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        yield deferLater(reactor, 2.0, lambda: None)
        # While the client reads nothing, only what the socket buffers hold
        # is answered (without flow control all would be, 32 MB).
        self.assertLess(len(sent), lines // 5)
        self.assertLess(sum(sent), 8 * 1024 * 1024)

        def readAll():
            return client.response(b"z")

        answers = yield deferToThread(readAll)
        yield sender
        self.assertEqual(len(answers), lines + 1)
        self.assertEqual(set(answers[:-1]), {b"* BAD Missing or malformed tag"})
        self.assertEqual(answers[-1], b"z OK NOOP completed")

    @inlineCallbacks
    def test_literalLimits(self):
        """
        Over real TCP: imaplib's APPEND of a message over the limit gets NO
        [TOOBIG] without sending it; a non-synchronizing 2 MiB literal is
        answered at once and skipped; the session goes on and nothing was
        stored.
        """
        yield self.store.append("INBOX", message(1))
        big = message(2, body=b"z" * (self.maxMessageSize + 1))

        def session():
            client = self.imap()
            refused = client.append("INBOX", None, None, big)
            raw = self.raw()
            raw.send(b"a APPEND INBOX {%d+}\r\n" % (2 * len(big)))
            first = raw.readLine()
            raw.send(big + big + b"\r\n")
            noop = raw.command(b"b", b"NOOP")
            return refused, first, noop, client.noop()

        refused, first, noop, after = yield deferToThread(session)
        self.assertEqual(refused[0], "NO")
        self.assertTrue(refused[1][0].startswith(b"[TOOBIG]"), refused)
        self.assertTrue(first.startswith(b"a NO [TOOBIG]"), first)
        self.assertEqual(noop, [b"b OK NOOP completed"])
        self.assertEqual(after[0], "OK")
        self.assertEqual(self.store.uids("INBOX"), [1])


class StartTLSOverTCPTests(TCPServerMixin, TestCase):
    """
    STARTTLS injection over real TCP and real TLS.
    """

    timeout = 60

    def setUp(self):
        from twisted.internet.ssl import PrivateCertificate
        from twisted.test import __file__ as testDir

        with open(os.path.join(os.path.dirname(testDir), "server.pem"), "rb") as f:
            options = PrivateCertificate.loadPEM(f.read()).options()
        return self.startServer(tlsOptions=options)

    @inlineCallbacks
    def test_starttlsPipelinedInjection(self):
        """
        C{a NOOP}, C{b STARTTLS} and an injected LOGIN sent in one packet
        over TCP: the LOGIN never runs; the client must log in inside TLS.
        """
        client = yield deferToThread(self.raw, False)

        def session():
            client.send(
                b"a NOOP\r\nb STARTTLS\r\nc LOGIN %s %s\r\nd SELECT INBOX\r\n"
                % (USER.encode(), PASSWORD.encode())
            )
            lines = [client.readLine(), client.readLine()]
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.sock = context.wrap_socket(client.sock)
            client.file = client.sock.makefile("rb")
            selected = client.command(b"e", b"SELECT INBOX")
            client.login()
            return lines, selected, client.command(b"f", b"SELECT INBOX")

        lines, selected, after = yield deferToThread(session)
        self.assertEqual(
            lines, [b"a OK NOOP completed", b"b OK Begin TLS negotiation now"]
        )
        self.assertEqual(len(selected), 1)
        self.assertTrue(selected[0].startswith(b"e BAD"), selected)
        self.assertTrue(after[-1].startswith(b"f OK"))


class TmpfsDiskFullTests(TCPServerMixin, TestCase):
    """
    APPEND onto a really full disk: a 1 MiB tmpfs holds the Maildir
    (root only).
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        if os.geteuid() != 0 or not shutil.which("mount"):
            raise SkipTest("mounting a tmpfs needs root")
        self.mountPoint = tempfile.mkdtemp(prefix="p2pfull", dir="/tmp")
        self.addCleanup(os.rmdir, self.mountPoint)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", self.mountPoint],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            raise SkipTest(
                "cannot mount a tmpfs here: " + mounted.stderr.decode().strip()
            )
        self.addCleanup(subprocess.run, ["umount", "-l", self.mountPoint], check=True)
        yield self.startServer(maildir=os.path.join(self.mountPoint, "md"))

    @inlineCallbacks
    def test_appendOntoFullDisk(self):
        """
        Filling the disk: APPEND gets C{NO [OVERQUOTA]}, earlier mail reads
        back exact, no temporary file is left; once room is made APPEND
        works again.
        """
        earlier = message(1, body=b"kept\r\n" * 1000)
        big = message(2, body=b"f" * 200_000)

        def session():
            client = self.imap()
            answers = [client.append("INBOX", None, None, earlier)]
            for _ in range(8):
                answers.append(client.append("INBOX", None, None, big))
            client.select("INBOX")
            return answers, client.fetch("1", "(BODY.PEEK[])")

        answers, fetched = yield deferToThread(session)
        results = [typ for typ, _ in answers]
        self.assertEqual(results[:2], ["OK", "OK"])
        self.assertIn("NO", results)
        refused = [data for typ, data in answers if typ == "NO"]
        self.assertEqual(
            {d[0] for d in refused}, {b"[OVERQUOTA] Not enough disk space"}
        )
        self.assertEqual(fetched[1][0][1], earlier)
        self.assertEqual(os.listdir(os.path.join(self.mountPoint, "md", "tmp")), [])
        stored = self.store.uids("INBOX")
        self.assertEqual(len(stored), results.count("OK"))

        def makeRoom():
            client = self.imap()
            client.select("INBOX")
            client.store("2:*", "+FLAGS.SILENT", "(\\Deleted)")
            client.expunge()
            return client.append("INBOX", None, None, big), client.fetch(
                "1", "(BODY.PEEK[])"
            )

        again, fetched = yield deferToThread(makeRoom)
        self.assertEqual(again[0], "OK")
        self.assertEqual(fetched[1][0][1], earlier)
        self.assertEqual(self.flushLoggedErrors(), [])


# -- 8. SEARCH over real peers ----------------------------------------------------


def unpulledWarning(count: int) -> bytes:
    """
    The text of the untagged NO a SEARCH sends when TEXT or BODY had to
    skip bodies not pulled yet.
    """
    return b"Searched only the headers of %d message(s) not pulled yet" % count


class RealPeerSearchTests(TestCase):
    """
    SEARCH over mail really sent between peers, shown before its body is
    pulled.
    """

    timeout = 120

    async def _searchBeforeAndAfterPull(self):
        harness = PeerHarness(self)
        await harness.start("alice")
        await harness.start("bob")
        for subject, body in [
            ("Lunch plans", "pizza at noon"),
            ("Minutes", "budget approved"),
        ]:
            data = (
                f"From: alice@demo\r\nTo: bob@demo\r\nSubject: {subject}\r\n"
                f"Message-ID: <{subject.split()[0].lower()}@demo>\r\n\r\n{body}\r\n"
            ).encode()
            self.assertEqual(await harness.send("alice", ["bob@demo"], data), {})
        await harness.listed("bob", 2)

        def uidOf(client, name: str) -> int:
            client.select("INBOX")
            [found] = client.uid("SEARCH", "HEADER", "Message-ID", f"<{name}@demo>")[1]
            return int(found)

        # The two notifications may arrive in either order.
        lunch, minutes = await harness.imap(
            "bob", lambda c: (uidOf(c, "lunch"), uidOf(c, "minutes"))
        )
        both = {lunch, minutes}
        today = time.strftime("%d-%b-%Y", time.gmtime())
        tomorrow = time.strftime("%d-%b-%Y", time.gmtime(time.time() + 86400))
        queries = [
            (("FROM", "alice"), both, None),
            (("SUBJECT", "lunch"), {lunch}, None),
            (("SINCE", today), both, None),
            (("BEFORE", tomorrow), both, None),
            (("BEFORE", today), set(), None),
            (("UID", str(minutes)), {minutes}, None),
            (("UNSEEN",), both, None),
            (("TEXT", "minutes"), {minutes}, 1),
            (("TEXT", "pizza"), set(), 2),
            (("BODY", "pizza"), set(), 2),
            (("OR", "SUBJECT", "zzz", "TO", "bob"), both, None),
        ]

        def search(client):
            client.select("INBOX")
            results = []
            for query, _, _ in queries:
                client.untagged_responses.pop("NO", None)
                typ, data = client.uid("SEARCH", *query)
                assert typ == "OK", (query, typ, data)
                results.append(
                    (
                        {int(u) for u in data[0].split()},
                        client.untagged_responses.pop("NO", None),
                    )
                )
            return results

        def expected(counts):
            return [
                (found, None if count is None else [unpulledWarning(count)])
                for (_, found, _), count in zip(queries, counts)
            ]

        before = await harness.imap("bob", search)
        self.assertEqual(harness.access.bodyRequests(), [])
        self.assertEqual(before, expected([q[2] for q in queries]))

        def readLunch(client):
            client.select("INBOX")
            client.uid("FETCH", str(lunch), "(BODY[])")
            client.uid("STORE", str(minutes), "+FLAGS", "(\\Flagged)")
            return (
                search(client),
                client.uid("SEARCH", "FLAGGED")[1],
                client.uid("SEARCH", "SEEN")[1],
            )

        after, flagged, seen = await harness.imap("bob", readLunch)
        self.assertEqual(len(harness.access.bodyRequests()), 1)
        warning = [unpulledWarning(1)]
        self.assertEqual(after[8:10], [({lunch}, warning), ({lunch}, warning)])
        self.assertEqual(after[6], ({minutes}, None))
        self.assertEqual(after[7], ({minutes}, None))
        self.assertEqual((flagged, seen), ([b"%d" % minutes], [b"%d" % lunch]))

    def test_searchBeforeAndAfterPull(self):
        """
        FROM, SUBJECT, SINCE, BEFORE, UID, flags and HEADER work on mail
        not pulled yet; TEXT and BODY search only its headers (with an
        untagged NO saying so) and pull nothing; once a body is pulled
        TEXT finds words in it.
        """
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self._searchBeforeAndAfterPull())
