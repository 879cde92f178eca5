"""
Random command streams through the submission server (issue 6): valid and
invalid commands, message bodies, hostile fragments and random bytes, cut
into random reads, with recipient checks answering now or later, STARTTLS
available or not, and a spool that may be full.

After each stream, whatever the server said is read back against the
client's bytes: each reply answers the next unit of input (a command line,
an AUTH response, or a message up to its C{CRLF . CRLF}), so every complete
unit has exactly one reply, in order, and the server frames the input as
RFC 5321 does.  Also: no exception escapes and none is logged, no internal
error (451) is ever answered, every error reply carries its enhanced status
code, what is accepted is stored byte for byte, nothing is left in the
spool, and no read keeps the reactor more than ~100 ms per reply.

``P2PMTA_STRESS_SCALE`` scales the number of streams (about a minute at 1).
"""

from __future__ import annotations

import base64
import gc
import os
import re
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.mail.smtp import IMessageDelivery
from twisted.trial.unittest import SynchronousTestCase

from p2pmta import spool
from p2pmta.auth import makePortal
from p2pmta.smtp import SubmissionFactory
from p2pmta.spool import TEMP_PREFIX
from tests.test_hostile_smtp import Disk, spoolOpener
from tests.test_smtp import (
    ALICE,
    AUTH_PLAIN,
    LOGIN,
    PASSWORD,
    SMUGGLED,
    Avatar,
    FakeSubmission,
    TLSStringTransport,
    runNow,
)

SCALE = float(os.environ.get("P2PMTA_STRESS_SCALE", "1"))

#: The longest a read may keep the reactor, per reply it produces.
STALL = 0.1

MAX_SIZE = 400_000


def b64(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\r\n"


ENVELOPE = b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n"
MANY_RCPTS = b"".join(b"RCPT TO:<r%d@demo>\r\n" % (i,) for i in range(1005))

COMMANDS = [
    LOGIN,
    b"EHLO client.example\r\n",
    b"HELO x\r\n",
    b"EHLO\r\n",
    b"ehlo a\x01b\r\n",
    AUTH_PLAIN,
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + b64(b"alice@demo"),
    b64(b"alice@demo"),
    b64(PASSWORD.encode()),
    b64(b"\0alice@demo\0" + PASSWORD.encode()),
    b"AUTH PLAIN " + b64(b"\0alice@demo\0guess"),
    b"AUTH PLAIN =\r\n",
    b"AUTH CRAM-MD5\r\n",
    b"*\r\n",
    b"MAIL FROM:<alice@demo>\r\n",
    b"mail from: <ALICE@demo> SIZE=100 BODY=8BITMIME AUTH=<>\r\n",
    b"MAIL FROM:<alice@demo> SIZE=" + b"9" * 5000 + b"\r\n",
    b"MAIL FROM:<alice@demo> SIZE=999999999\r\n",
    b"MAIL FROM:<bob@demo>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:" + b"<" * 3000 + b"\r\n",
    b"RCPT TO:<carol@demo>\r\n",
    b"RCPT TO:<dave@demo>\r\n",
    b"RCPT TO:<bob@demo>\r\n",
    b"RCPT TO:<mallory@demo>\r\n",
    b"RCPT TO:<a@b@c>\r\n",
    b"RCPT TO:<carol@demo> NOTIFY=NEVER\r\n",
    MANY_RCPTS,
    b"DATA\r\n",
    b"data\r\n",
    b"DATA x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"  noop  \r\n",
    b"VRFY alice\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"__init__\r\n",
    b"\r\n",
    b"x" * 17000 + b"\r\n",
    b"NOOP " + b"y" * 16380 + b"\r\n",
    ENVELOPE,
]

BODIES = [
    b"Subject: a\r\n\r\nbody\r\n.\r\n",
    b".\r\n",
    b"..\r\n.\r\n",
    b"\r\n.\r\n",
    b"Subject: a\r\n\r\n" + b"x" * 20000 + b"\r\n" + SMUGGLED + b".\r\n",
    b"hello\n.\r\n" + SMUGGLED + b".\r\n",
    b"hello\n.\n" + SMUGGLED + b".\r\n",
    b"hello\r\n.\n" + SMUGGLED + b".\r\n",
    b"hello\r.\r\n" + SMUGGLED + b".\r\n",
    b"Subject: a\0b\r\n\r\n.\r\n",
    b"Subject: a\rb\r\n\r\n.\r\n",
    (b"z" * 98 + b"\r\n") * 4100 + b".\r\n",
    b"".join(b"X-H-%06d: %s\r\n" % (i, b"v" * 60) for i in range(4000)) + b"\r\n.\r\n",
    b"Subject: folded\r\n continued\r\n\r\n..dot\r\n.\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 300
    + b".\r\n",
]

FRAGMENTS = [b"\r", b"\n", b"\r\n", b".", b"\0", b" ", b"\xff", b"\r\n.\r\n"]

#: What starts a message, or a login of several lines.
OPENINGS = [
    ENVELOPE,
    (
        b"MAIL FROM:<alice@demo>\r\nRCPT TO:<bob@demo>\r\nRCPT TO:<dave@demo>\r\n"
        b"RCPT TO:<carol@demo>\r\nDATA\r\n"
    ),
    b"MAIL FROM:<alice@demo>\r\n" + MANY_RCPTS + b"DATA\r\n",
    b"RSET\r\nMAIL FROM:<alice@demo> SIZE=50\r\nRCPT TO:<carol@demo>\r\nDATA\r\n",
    b"AUTH LOGIN\r\n" + b64(b"alice@demo") + b64(PASSWORD.encode()),
    b"AUTH PLAIN\r\n" + b64(b"\0alice@demo\0" + PASSWORD.encode()),
]

PIECE = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(COMMANDS),
    st.tuples(st.sampled_from(OPENINGS), st.sampled_from(BODIES)).map(b"".join),
    st.sampled_from(BODIES),
    st.sampled_from(FRAGMENTS),
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b + b"\r\n"),
    st.text(max_size=30).map(lambda t: t.encode("utf-8") + b"\r\n"),
)

STREAM = st.tuples(
    st.sampled_from([LOGIN, LOGIN, b""]), st.lists(PIECE, max_size=25)
).map(lambda t: t[0] + b"".join(t[1]))

#: Read sizes, used in turn.
CHUNKS = st.lists(
    st.one_of(st.integers(1, 16), st.integers(17, 2048), st.integers(2049, 70_000)),
    min_size=1,
    max_size=6,
)

_REPLY = re.compile(rb"([2-5])(\d\d)([ -])(.*)\r\n", re.DOTALL)
_ENHANCED = re.compile(rb"([245])\.\d{1,3}\.\d{1,3}(?: |$)")


class _Transport(StringTransport):
    """
    Records, for each write, how many bytes the client had sent by then.
    """

    def __init__(self, session, **kw) -> None:
        StringTransport.__init__(self, **kw)
        self.session = session
        self.writes: list = []

    def write(self, data) -> None:
        self.writes.append((data, self.session.fed))
        StringTransport.write(self, data)

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))


class _TLSTransport(TLSStringTransport, _Transport):
    pass


class _Submission(FakeSubmission):
    """
    Recipient checks answer now or C{delay} seconds later; never fail
    unexpectedly.
    """

    def __init__(self, spool, clock, delay) -> None:
        FakeSubmission.__init__(self, spool, MAX_SIZE)
        self.clock = clock
        self.delay = delay

    def checkRecipient(self, address):
        if self.delay is None:
            return FakeSubmission.checkRecipient(self, address)
        return deferLater(self.clock, self.delay, lambda: None).addCallback(
            lambda _: FakeSubmission.checkRecipient(self, address)
        )


class Session:
    """
    One server, fed one stream.
    """

    def __init__(self, case, spool: str, delay, tls: bool, disk: Disk) -> None:
        self.case = case
        self.clock = Clock()
        self.fed = 0
        self.spool = spool
        self.disk = disk
        self.submission = _Submission(spool, self.clock, delay)
        portal = makePortal(self.clock, ALICE, PASSWORD, {IMessageDelivery: Avatar})
        self.factory = SubmissionFactory(
            portal,
            self.submission,
            tlsOptions=object() if tls else None,
            hostname=b"fuzz.p2pmta",
            clock=self.clock,
            runBlocking=runNow,
        )
        kind = _TLSTransport if tls else _Transport
        self.transport = kind(self, peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)

    def timed(self, f, *args) -> None:
        """
        Run C{f(*args)}; fail if it kept the reactor too long for the
        replies it produced.  (CPU time, without the garbage collector: the
        server's own cost, not that of a busy machine or a big heap.)
        """
        before = len(self.transport.writes)
        gc.disable()
        try:
            started = time.process_time()
            f(*args)
            elapsed = time.process_time() - started
        finally:
            gc.enable()
        replies = sum(
            1 for data, _ in self.transport.writes[before:] if data[3:4] != b"-"
        )
        self.case.assertLess(
            elapsed,
            STALL * max(1, replies),
            f"stalled {elapsed:.3f} s for {replies} replies",
        )

    def feed(self, data: bytes, chunks: list, advances: list, fullness: list) -> None:
        step = max(1, len(data) // 3000)
        i = 0
        n = 0
        while i < len(data):
            size = max(chunks[n % len(chunks)], step)
            piece = data[i : i + size]
            self.disk.full = fullness[n % len(fullness)]
            self.fed += len(piece)
            self.timed(self.proto.dataReceived, piece)
            i += size
            if advances[n % len(advances)] is not None:
                self.timed(self.clock.advance, advances[n % len(advances)])
            n += 1
        self.disk.full = fullness[n % len(fullness)]
        # Let every pending step finish, short of the idle timeout.
        for _ in range(5000):
            now = self.clock.seconds()
            due = [
                c.getTime()
                for c in self.clock.getDelayedCalls()
                if c.getTime() - now < 250
            ]
            if not due:
                break
            self.timed(self.clock.advance, min(due) - now)

    def replies(self) -> list:
        """
        @return: C{(code, text, fed)} of each reply, C{fed} being the bytes
            the client had sent when it was written.
        """
        out = []
        for data, fed in self.transport.writes:
            m = _REPLY.fullmatch(data)
            self.case.assertIsNotNone(m, data)
            self.case.assertNotIn(b"\r", m.group(4))
            self.case.assertNotIn(b"\n", m.group(4))
            if m.group(3) == b" ":
                out.append((int(m.group(1) + m.group(2)), m.group(4), fed))
        return out


def unstuff(data: bytes) -> bytes:
    """
    The message a data unit (up to, not with, its final dot line) holds.
    """
    lines = data.split(b"\r\n")[:-1]
    return b"".join(
        (line[1:] if line[:1] == b"." else line) + b"\r\n" for line in lines
    )


class Walker:
    """
    Reads the replies against the stream, unit by unit.
    """

    def __init__(self, case, stream: bytes) -> None:
        self.case = case
        self.stream = stream
        self.pos = 0
        self.inData = False
        self.inAuth = False
        self.closed = False
        self.messages: list = []

    def line(self) -> bytes:
        end = self.stream.find(b"\r\n", self.pos)
        self.case.assertGreaterEqual(end, 0, "a reply with no line to answer")
        line = self.stream[self.pos : end]
        self.pos = end + 2
        return line

    def reply(self, code: int, text: bytes, fed: int) -> None:
        c = self.case
        c.assertFalse(self.closed, (code, text))
        c.assertNotEqual(code, 451, text)
        if code >= 400:
            m = _ENHANCED.match(text)
            c.assertIsNotNone(m, (code, text))
            c.assertEqual(int(m.group(1)), code // 100, (code, text))
        if code == 421 and not self.inData:
            # The server closes (idle, or too many failed logins).
            self.closed = True
            return
        if self.inData:
            view = b"\r\n" + self.stream[self.pos :]
            end = view.find(b"\r\n.\r\n")
            c.assertGreaterEqual(end, 0, "a reply to data not ended")
            data = view[2 : end + 2]
            self.pos += end + 3
            self.inData = False
            c.assertIn(code, (250, 452, 500, 550, 552), text)
            if code == 250:
                self.messages.append(unstuff(data))
            return
        line = self.line()
        command = line.strip().split(None, 1)[:1]
        name = command[0].upper() if command else b""
        wasAuth, self.inAuth = self.inAuth, False
        if code == 354:
            c.assertEqual(name, b"DATA", line)
            self.inData = True
        elif code == 334:
            c.assertTrue(wasAuth or name == b"AUTH", line)
            self.inAuth = True
        elif code == 235:
            c.assertTrue(wasAuth or name == b"AUTH", line)
        elif code == 221:
            c.assertEqual(name, b"QUIT", line)
            self.closed = True
        elif code == 220:
            c.assertEqual(name, b"STARTTLS", line)
            # What the client had sent by then was dropped, unread.
            c.assertGreaterEqual(fed, self.pos)
            self.pos = fed
        elif code == 250 and text.startswith(b"2.0.0 Ok: queued"):
            c.fail(line)

    def finish(self) -> None:
        """
        Nothing complete is left unanswered.
        """
        if self.closed:
            return
        rest = self.stream[self.pos :]
        if self.inData:
            self.case.assertEqual(
                (b"\r\n" + rest).find(b"\r\n.\r\n"), -1, "data end unanswered"
            )
        else:
            self.case.assertNotIn(b"\r\n", rest, "a line unanswered")


SEEDS = [
    # 1: a long line, then a spelled-out transaction.
    LOGIN + ENVELOPE + BODIES[4] + b"NOOP\r\n",
    # 2: the bare end-of-data look-alikes.
    LOGIN + b"".join(ENVELOPE + BODIES[i] for i in (5, 6, 7, 8)) + ENVELOPE + BODIES[0],
    # 3: a whole session in one write.
    LOGIN + b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nRCPT TO:<bob@demo>\r\n"
    b"RCPT TO:<dave@demo>\r\nDATA\r\n" + BODIES[0] + b"NOOP\r\nQUIT\r\n",
    # 4: over the size limit, then NOOP and a message.
    LOGIN + ENVELOPE + BODIES[11] + b"NOOP\r\n" + ENVELOPE + BODIES[0],
    # 5: too many recipients.
    LOGIN + b"MAIL FROM:<alice@demo>\r\n" + MANY_RCPTS + b"DATA\r\n" + BODIES[0],
    # 6: headers: a bare CR, many of them, a NUL.
    LOGIN + ENVELOPE + BODIES[10] + ENVELOPE + BODIES[12] + ENVELOPE + BODIES[9],
    # 7: nested MIME.
    LOGIN + ENVELOPE + BODIES[14],
    # 8: STARTTLS with a transaction in the same packet.
    LOGIN + b"STARTTLS\r\n" + ENVELOPE + BODIES[0] + b"MAIL FROM:<alice@demo>\r\n",
    # Three failed logins close the session.
    b"EHLO c\r\n" + (b"AUTH PLAIN " + b64(b"\0alice@demo\0guess")) * 4 + b"NOOP\r\n",
]


class FuzzTests(SynchronousTestCase):
    """
    Random streams through the server on a L{StringTransport}.
    """

    def run_stream(self, stream, chunks, advances, delay, tls, fullness) -> None:
        self.flushLoggedErrors()  # a failed example's, already reported
        spool = tempfile.mkdtemp(prefix="fuzz-smtp-", dir=self.root)
        self.disk.full = False
        session = Session(self, spool, delay, tls, self.disk)
        session.transport.clear()
        del session.transport.writes[:]
        session.feed(stream, chunks, advances, fullness)
        walker = Walker(self, stream)
        for code, text, fed in session.replies():
            walker.reply(code, text, fed)
        walker.finish()
        stored = [
            data.split(b"\r\n", 3)[3] for _, _, data in session.submission.accepted
        ]
        self.assertEqual(stored, walker.messages)
        session.proto.connectionLost(None)
        self.assertEqual(
            [n for n in os.listdir(spool) if n.startswith(TEMP_PREFIX)], []
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.disk = Disk()
        self.patch(spool, "openSpoolFile", spoolOpener(self.disk))

    @settings(
        max_examples=max(1, int(4000 * SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(
        stream=STREAM,
        chunks=CHUNKS,
        advances=st.lists(
            st.sampled_from([None, None, 0, 0.3, 1, 9]), min_size=1, max_size=5
        ),
        delay=st.sampled_from([None, 0, 1.0]),
        tls=st.booleans(),
        fullness=st.one_of(
            st.just([False]), st.lists(st.booleans(), min_size=1, max_size=5)
        ),
    )
    def test_streams(self, stream, chunks, advances, delay, tls, fullness) -> None:
        """
        Any stream, however cut up and timed: one reply per complete unit,
        in order and framed as RFC 5321 says; no escaped or logged
        exception, no internal error, no stall; accepted mail byte-exact.
        """
        self.run_stream(stream, chunks, advances, delay, tls, fullness)

    def test_seeds(self) -> None:
        """
        The issue's cases, each whole, in 1-byte reads, and in 1000-byte
        reads with look-ups answered later, with and without TLS.
        """
        for stream in SEEDS:
            for chunks, advances, delay in (
                ([len(stream)], [None], None),
                ([1], [None], None),
                ([1000], [0, 1], 1.0),
            ):
                for tls in (False, True):
                    self.run_stream(stream, chunks, advances, delay, tls, [False])
        self.run_stream(SEEDS[0] + SEEDS[3], [997], [None], None, False, [False, True])
