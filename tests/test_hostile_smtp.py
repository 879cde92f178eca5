"""
Hostile clients against L{p2pmta.smtp} (issue 6): smuggled transactions,
bare line ends, pipelining over slow look-ups, the size, recipient and
header limits, odd MIME, STARTTLS injection, connection floods and a full
disk.

For each: a clear protocol error, a session (and server) still usable,
nothing accepted earlier lost or changed, memory bounded.  The fast cases
feed bytes to a server on a L{StringTransport}; the others talk to a real
server on 127.0.0.1 (behind a L{WrappingFactory}, as L{p2pmta.service}
runs it) with the stdlib C{smtplib} or raw sockets, in threads.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
import tracemalloc
from typing import ClassVar

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.mail.smtp import IMessageDelivery
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from p2pmta import spool
from p2pmta.address import Address
from p2pmta.auth import makePortal
from p2pmta.smtp import SubmissionFactory
from p2pmta.spool import TEMP_PREFIX
from p2pmta.tls import loadOrCreateCertificate
from tests.test_smtp import (
    ALICE,
    LOGIN,
    PASSWORD,
    SMUGGLED,
    Avatar,
    FakeSubmission,
    ServerMixin,
    TLSStringTransport,
    codes,
    runNow,
)

CAROL = Address.parse("carol@demo")
DAVE = Address.parse("dave@demo")
ENVELOPE = b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n"
GOOD = b"Subject: good\r\n\r\nthe one real message\r\n"

#: The look-alikes of the end of data that RFC 5321 does not allow (2.3.8).
BARE_ENDINGS = [b"\n.\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r\n"]
BARE = b"550 5.5.2 Bare <CR> or <LF> in message: use <CR><LF> line ends"
LONG_LINE = b"500 5.5.2 Message line longer than 1000 octets"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size"
NO_SPACE = b"452 4.3.1 Insufficient system storage"


def withoutReceived(data: bytes) -> bytes:
    """
    A stored message without the 3-line C{Received} header the server adds.
    """
    return data.split(b"\r\n", 3)[3]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HostileSubmission(FakeSubmission):
    """
    A L{FakeSubmission} with slow recipient checks, failures on demand, and
    big messages kept as hashes only.

    @ivar checkDelay: if not L{None}, C{checkRecipient} answers after that
        many seconds of C{clock}.
    @ivar acceptError: if set, C{accept} fails with it.
    @ivar keep: if false, C{accepted} holds the SHA-256 of the message
        without its C{Received} header instead of the message.
    @ivar queue: if set, a folder C{accept} moves messages to (and
        C{accepted} holds their paths), as the real pipeline keeps them.
    """

    def __init__(self, spool, maxMessageSize=10_000, clock=None) -> None:
        FakeSubmission.__init__(self, spool, maxMessageSize)
        self.clock = clock
        self.checkDelay: float | None = None
        self.acceptError: Exception | None = None
        self.keep = True
        self.queue: str | None = None

    def checkRecipient(self, address):
        if self.checkDelay is None:
            return FakeSubmission.checkRecipient(self, address)
        return deferLater(self.clock, self.checkDelay, lambda: None).addCallback(
            lambda _: FakeSubmission.checkRecipient(self, address)
        )

    def accept(self, sender, recipients, path, flushing, check):
        if self.acceptError is not None:
            return fail(self.acceptError)
        return flushing.addCallback(lambda _: self._flushed(sender, recipients, path, check))

    def _flushed(self, sender, recipients, path, check):
        if self.queue is not None:
            moved = os.path.join(self.queue, f"{len(self.accepted)}.eml")
            os.rename(path, moved)
            self.accepted.append((sender, list(recipients), moved))
            return succeed(f"id{len(self.accepted)}")
        if self.keep:
            return FakeSubmission.accept(self, sender, recipients, path, succeed(None), check)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for _ in range(3):
                f.readline()
            for block in iter(lambda: f.read(65536), b""):
                h.update(block)
        os.unlink(path)
        self.accepted.append((sender, list(recipients), h.hexdigest()))
        return succeed(f"id{len(self.accepted)}")


class Disk:
    """
    The spool's file system, which a test can fill.
    """

    full = False


class _SpoolRaw(io.FileIO):
    """
    A raw spool file whose writes fail with ENOSPC while its L{Disk} is full.
    """

    def __init__(self, fd: int, disk: Disk) -> None:
        io.FileIO.__init__(self, fd, "wb")
        self.disk = disk

    def write(self, data) -> int:
        if self.disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return io.FileIO.write(self, data)


def spoolOpener(disk: Disk):
    """
    A replacement for L{spool.openSpoolFile}: buffered files on C{disk},
    so that a full disk shows when a buffer is flushed, as it does for real.
    """

    def openSpoolFile(directory: str):
        if disk.full and disk.failOpen:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        return io.BufferedWriter(_SpoolRaw(fd, disk)), path

    disk.failOpen = False
    return openSpoolFile


def peakMemory(f) -> int:
    """
    Run C{f()}; return the most memory (bytes) it had allocated at once.
    """
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class HostileMixin(ServerMixin):
    """
    A server on a L{StringTransport} with a L{HostileSubmission}, greeting
    read; C{factoryOptions} go to the factory.
    """

    maxMessageSize = 10_000
    factoryOptions: ClassVar[dict] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = self.mktemp()
        os.makedirs(self.spool)
        self.submission = HostileSubmission(self.spool, self.maxMessageSize, self.clock)
        self.portal = makePortal(
            self.clock, ALICE, PASSWORD, {IMessageDelivery: Avatar}
        )
        self.factory = SubmissionFactory(
            self.portal,
            self.submission,
            tlsOptions=getattr(self, "tlsOptions", None),
            hostname=b"test.p2pmta",
            clock=self.clock,
            runBlocking=runNow,
            **self.factoryOptions,
        )
        self.proto, self.transport = self.connect()
        self.lines()

    def feed(self, data: bytes, chunk: int = 65536) -> list:
        """
        Feed C{data} in pieces of C{chunk} bytes, as TCP reads would.
        """
        return self.send(data, chunk=chunk)

    def messages(self) -> list:
        """
        The accepted messages, without their C{Received} headers.
        """
        return [withoutReceived(data) for _, _, data in self.submission.accepted]

    def assertUsable(self) -> None:
        """
        The session answers NOOP, and a normal message goes through.
        """
        before = len(self.submission.accepted)
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(
            codes(self.send(ENVELOPE + GOOD + b".\r\n")), [250, 250, 354, 250]
        )
        self.assertEqual(len(self.submission.accepted), before + 1)
        self.assertEqual(withoutReceived(self.submission.accepted[-1][2]), GOOD)
        self.assertEqual(self.spoolNames(), [])


class SmugglingTests(HostileMixin, SynchronousTestCase):
    """
    Cases 1 and 2: nothing in a body runs as a command.
    """

    def setUp(self) -> None:
        HostileMixin.setUp(self)
        self.login()

    def test_longLineThenTransaction(self) -> None:
        """
        A 20,000-byte line, then body lines that spell a second transaction:
        one 500 after the real end of data, no message, the earlier one
        unchanged, the session usable; however the bytes are cut up.
        """
        self.assertEqual(
            codes(self.send(ENVELOPE + GOOD + b".\r\n")), [250, 250, 354, 250]
        )
        hostile = (
            ENVELOPE
            + b"Subject: a\r\n\r\n"
            + b"x" * 20000
            + b"\r\n"
            + SMUGGLED
            + b".\r\n"
        )
        for chunk in (0, 1, 7, 998, 1000, 16384, 65536):
            lines = self.send(hostile, chunk=chunk)
            self.assertEqual(lines[-1], LONG_LINE, chunk)
            self.assertEqual(codes(lines), [250, 250, 354, 500])
            self.assertEqual(self.messages(), [GOOD])
            self.assertEqual(self.spoolNames(), [])
        self.assertUsable()

    def test_bareEndingsThenTransaction(self) -> None:
        """
        C{\\n.\\r\\n}, C{\\n.\\n}, C{\\r\\n.\\n}, C{\\r.\\r\\n} do not end the
        data: the smuggled transaction after them is body text of a message
        refused with 550 5.5.2 at the real end; nothing is accepted.
        """
        for fake in BARE_ENDINGS:
            for chunk in (0, 1, 2, 3):
                data = (
                    ENVELOPE
                    + b"Subject: a\r\n\r\nhello"
                    + fake
                    + SMUGGLED
                    + b".\r\nNOOP\r\n"
                )
                lines = self.send(data, chunk=chunk)
                self.assertEqual(lines[-2:], [BARE, b"250 2.0.0 Ok"], (fake, chunk))
                self.assertEqual(codes(lines), [250, 250, 354, 550, 250])
                self.assertEqual(self.submission.accepted, [])
                self.assertEqual(self.spoolNames(), [])
        self.assertUsable()

    def test_bareEndingAtStart(self) -> None:
        """
        A bare-LF dot right after the DATA line does not end the data either.
        """
        for fake in [b".\n", b"\n.\n", b".\r"]:
            lines = self.send(ENVELOPE + fake + SMUGGLED + b".\r\n")
            self.assertEqual(lines[-1], BARE, fake)
            self.assertEqual(self.submission.accepted, [])
        self.assertUsable()


class PipeliningTests(HostileMixin, SynchronousTestCase):
    """
    Case 3: a whole transaction in one write while look-ups are pending.
    """

    def test_transactionOverSlowLookups(self) -> None:
        """
        With each recipient check answering a second later, a pipelined
        session (also cut into 1-byte reads) gets its replies in order and
        one message; the body's command-like lines stay body.
        """
        body = b"Subject: t\r\n\r\nRCPT TO:<eve@demo>\r\nQUIT\r\n..\r\n"
        data = (
            LOGIN + b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n"
            b"RCPT TO:<bob@demo>\r\nRCPT TO:<dave@demo>\r\nDATA\r\n"
            + body
            + b".\r\nNOOP\r\nQUIT\r\n"
        )
        for chunk in (0, 1):
            self.setUp()
            self.submission.checkDelay = 1.0
            lines = self.send(data, chunk=chunk)
            self.assertEqual(codes(lines), [250, 235, 250])
            for _ in range(3):
                # One look-up at a time, and no idle timer while it runs.
                self.assertEqual(len(self.clock.getDelayedCalls()), 1)
                self.clock.advance(1)
                lines += self.lines()
            self.assertEqual(
                codes(lines), [250, 235, 250, 250, 550, 250, 354, 250, 250, 221]
            )
            [(_, rcpts, stored)] = self.submission.accepted
            self.assertEqual(rcpts, [CAROL, DAVE])
            self.assertEqual(withoutReceived(stored), body.replace(b"\r\n..", b"\r\n."))
            self.assertTrue(self.transport.disconnecting)


class SizeLimitTests(HostileMixin, SynchronousTestCase):
    """
    Case 4: one byte over the size limit.
    """

    def setUp(self) -> None:
        HostileMixin.setUp(self)
        self.login()

    def test_oneByteOver(self) -> None:
        """
        One byte over the limit: 552 5.3.4 after the dot (also when MAIL's
        SIZE lied), NOOP still 250, the next message accepted.
        """
        exact = b"x" * 98 + b"\r\n"
        over = b"y" + exact * 100
        for mail in (
            b"MAIL FROM:<alice@demo>\r\n",
            b"MAIL FROM:<alice@demo> SIZE=100\r\n",
        ):
            for chunk in (0, 1000):
                lines = self.send(
                    mail + b"RCPT TO:<carol@demo>\r\nDATA\r\n" + over + b".\r\n",
                    chunk=chunk,
                )
                self.assertEqual(lines[-1], TOO_BIG)
                self.assertEqual(self.submission.accepted, [])
                self.assertEqual(self.spoolNames(), [])
                self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(
            codes(self.send(ENVELOPE + exact * 100 + b".\r\n")), [250, 250, 354, 250]
        )
        self.assertEqual(self.messages(), [exact * 100])
        self.assertUsable()

    def test_hugeSizeParameter(self) -> None:
        """
        A SIZE parameter of thousands of digits (more than C{int()} parses)
        gets 501, not an exception.
        """
        for value in (b"9" * 21, b"9" * 5000, b"0" * 21 + b"1"):
            lines = self.send(b"MAIL FROM:<alice@demo> SIZE=" + value + b"\r\n")
            self.assertEqual(lines, [b"501 5.5.4 Bad SIZE parameter"])
        self.assertEqual(
            codes(self.send(b"MAIL FROM:<alice@demo> SIZE=00000000000000000100\r\n")),
            [250],
        )

    def test_longCommandLine(self) -> None:
        """
        A command line over 16 KiB gets 500 5.5.2 whether it comes whole or
        in pieces; one of 16 KiB runs.
        """
        line = b"NOOP " + b"y" * (16384 - 5)
        for chunk in (0, 1000, 16384):
            self.assertEqual(self.send(line + b"\r\n", chunk=chunk), [b"250 2.0.0 Ok"])
            self.assertEqual(
                self.send(line + b"y\r\n", chunk=chunk), [b"500 5.5.2 Line too long"]
            )

    def test_oversizedDataMemory(self) -> None:
        """
        10 MB sent against a 10 kB limit is swallowed in bounded memory.
        """
        self.send(ENVELOPE)
        data = (b"z" * 998 + b"\r\n") * 10_000 + b".\r\n"
        out = []
        peak = peakMemory(lambda out=out, data=data: out.extend(self.feed(data)))
        self.assertEqual(out, [TOO_BIG])
        self.assertLess(peak, 1_000_000)


class RecipientLimitTests(HostileMixin, SynchronousTestCase):
    """
    Case 5: 2,000 recipients.
    """

    def test_twoThousandRecipients(self) -> None:
        """
        2,000 RCPTs pipelined over slow look-ups: 1,000 get 250, the rest
        452 4.5.3 (RFC 5321, 4.5.3.1.10), and the message goes to the 1,000.
        """
        self.login()
        self.submission.checkDelay = 0.5
        rcpts = b"".join(b"RCPT TO:<r%d@demo>\r\n" % (i,) for i in range(2000))
        lines = self.send(
            b"MAIL FROM:<alice@demo>\r\n" + rcpts + b"DATA\r\nhi\r\n.\r\n"
        )
        for _ in range(1000):
            self.clock.advance(0.5)
            lines += self.lines()
        self.assertEqual(codes(lines), [250] + [250] * 1000 + [452] * 1000 + [354, 250])
        self.assertEqual(
            set(lines[1001:2001]), {b"452 4.5.3 Error: too many recipients"}
        )
        [(_, recipients, _)] = self.submission.accepted
        self.assertEqual(recipients, [Address.parse(f"r{i}@demo") for i in range(1000)])


class HeaderTests(HostileMixin, SynchronousTestCase):
    """
    Case 6: odd headers; the policy is in L{smtpsession.SubmissionServer}'s docstring.
    """

    maxMessageSize = 50 * 1024 * 1024

    def setUp(self) -> None:
        HostileMixin.setUp(self)
        self.login()

    def assertStored(self, message: bytes) -> None:
        """
        C{message} is accepted and stored byte for byte.
        """
        self.submission.accepted = []
        stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
        self.assertEqual(
            codes(self.feed(ENVELOPE + stuffed + b".\r\n")), [250, 250, 354, 250]
        )
        self.assertEqual(self.messages(), [message])

    def test_crlfInHeaderValue(self) -> None:
        """
        A bare CR or LF inside a header value refuses the message (550
        5.5.2); a folded value and a header line that only looks injected
        are stored as sent.
        """
        for value in [b"a\rBcc: eve@demo", b"a\nBcc: eve@demo", b"a\r\rb", b"a\n\nb"]:
            lines = self.send(
                ENVELOPE + b"Subject: " + value + b"\r\n\r\nbody\r\n.\r\n"
            )
            self.assertEqual(lines[-1], BARE, value)
            self.assertEqual(self.submission.accepted, [])
        self.assertStored(
            b"Subject: folded\r\n across\r\n\tthree lines\r\n\r\nbody\r\n"
        )
        self.assertStored(b"Subject: a\r\nBcc: eve@demo\r\n\r\nbody\r\n")
        self.assertStored(b"Subject: =?utf-8?q?a=0D=0AX-Evil:_1?=\r\n\r\nbody\r\n")
        self.assertEqual(self.spoolNames(), [])

    def test_megabyteOfHeaders(self) -> None:
        """
        1 MB of headers (many fields, or one folded field) gets 552 5.3.4
        after the dot, in bounded memory; the session goes on.
        """
        many = b"".join(
            b"X-Filler-%06d: %s\r\n" % (i, b"v" * 80) for i in range(11_000)
        )
        folded = b"X-Long: start\r\n" + (b" " + b"w" * 96 + b"\r\n") * 11_000
        for headers in (many, folded):
            self.assertGreater(len(headers), 1_000_000)
            data = ENVELOPE + headers + b"\r\nbody\r\n.\r\n"
            out = []
            peak = peakMemory(lambda out=out, data=data: out.extend(self.feed(data)))
            self.assertEqual(out[-1], b"552 5.3.4 Message header section too large")
            self.assertLess(peak, 1_000_000)
            self.assertEqual(self.spoolNames(), [])
        self.assertUsable()

    def test_tenThousandHeaders(self) -> None:
        """
        10,000 header fields within the header limit are stored byte for byte.
        """
        headers = b"".join(b"X-H-%05d: %d\r\n" % (i, i) for i in range(10_000))
        self.assertStored(headers + b"\r\nbody\r\n")

    def test_nul(self) -> None:
        """
        A NUL byte in a header, in the body or in a command is refused (550
        5.6.0 after the dot; 500 for a command); the session goes on.
        """
        for message in [
            b"Subject: a\0b\r\n\r\nbody\r\n",
            b"S: a\r\n\r\n\0\r\n",
            b"S: a\r\n\r\n" + (b"b" * 98 + b"\r\n") * 50 + b"\0\r\n",
        ]:
            lines = self.feed(ENVELOPE + message + b".\r\n", chunk=1000)
            self.assertEqual(lines[-1], b"550 5.6.0 NUL character in message")
            self.assertEqual(self.submission.accepted, [])
        self.assertEqual(
            codes(self.send(b"NO\0OP\r\nMAIL FROM:<alice@demo\0>\r\n")), [500, 500]
        )
        self.assertUsable()


def nestedMime(depth: int) -> bytes:
    """
    A message whose MIME parts nest C{depth} deep.
    """
    lines = [b"Subject: nested", b"MIME-Version: 1.0"]
    closing = []
    for i in range(depth):
        lines += [
            b'Content-Type: multipart/mixed; boundary="b%d"' % (i,),
            b"",
            b"--b%d" % (i,),
        ]
        closing.insert(0, b"--b%d--" % (i,))
    return (
        b"\r\n".join(lines + [b"Content-Type: text/plain", b"", b"leaf"] + closing)
        + b"\r\n"
    )


def manyParts(count: int) -> bytes:
    """
    A message of C{count} tiny MIME parts.
    """
    part = b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return (
        b"Subject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n'
        + part * count
        + b"--p--\r\n"
    )


class MIMETests(HostileMixin, SynchronousTestCase):
    """
    Case 7: the SMTP layer does not parse MIME, so odd structure costs it
    nothing (the sending pipeline's MIME scan is tested with it).
    """

    maxMessageSize = 50 * 1024 * 1024

    def test_oddStructure(self) -> None:
        """
        MIME nested 101 and 2,000 deep, and 100,000 tiny parts, are each
        accepted byte for byte, in 64 KiB reads, in bounded memory and time.
        """
        self.login()
        self.submission.keep = False
        for message in (nestedMime(101), nestedMime(2000), manyParts(100_000)):
            data = ENVELOPE + message + b".\r\n"
            out = []
            started = time.perf_counter()
            peak = peakMemory(lambda out=out, data=data: out.extend(self.feed(data)))
            elapsed = time.perf_counter() - started
            self.assertEqual(codes(out), [250, 250, 354, 250])
            self.assertEqual(self.submission.accepted[-1][2], digest(message))
            self.assertLess(peak, 2_000_000, len(message))
            self.assertLess(elapsed, 10.0)
        self.assertGreater(len(manyParts(100_000)), 3_000_000)


class StartTLSInjectionTests(HostileMixin, SynchronousTestCase):
    """
    Case 8: commands sent with STARTTLS, in memory.
    """

    transportFactory = TLSStringTransport
    tlsOptions = object()

    def test_transactionInjected(self) -> None:
        """
        A whole transaction sent in the same packet as STARTTLS, after a
        login in the clear, is discarded: no message, and after TLS the
        session knows nothing of the login.
        """
        self.login()
        lines = self.send(
            b"STARTTLS\r\n" + ENVELOPE + b"Subject: x\r\n\r\ninjected\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(lines, [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.submission.accepted, [])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo>\r\n")), [530])
        self.assertEqual(self.spoolNames(), [])

    def test_injectedBehindPendingStep(self) -> None:
        """
        Input held behind a pending look-up and then STARTTLS is dropped too.
        """
        self.login()
        self.submission.checkDelay = 1.0
        lines = self.send(
            b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nSTARTTLS\r\n"
        )
        lines += self.send(b"DATA\r\ninjected\r\n.\r\n")
        self.clock.advance(1)
        lines += self.lines()
        self.assertEqual(codes(lines), [250, 250, 220])
        self.assertEqual(self.submission.accepted, [])
        self.assertEqual(self.spoolNames(), [])


class ConnectionLimitTests(HostileMixin, SynchronousTestCase):
    """
    Case 9, in memory: the connection cap, its grace and the idle timeout.
    """

    factoryOptions: ClassVar[dict] = {
        "maxConnections": 3,
        "timeout": 60,
        "loginGrace": 10,
    }

    def test_configurableTimeout(self) -> None:
        """
        The idle timeout is the factory's: 60 s here, then 421 4.4.2.
        """
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(
            self.lines(), [b"421 4.4.2 test.p2pmta Idle timeout, closing connection"]
        )
        self.assertTrue(self.transport.disconnecting)

    def test_defaults(self) -> None:
        """
        By default: 100 connections, 300 s idle timeout, 10 s login grace.
        """
        factory = SubmissionFactory(self.portal, self.submission, clock=self.clock)
        self.assertEqual(
            (factory.maxConnections, factory.timeout, factory.loginGrace),
            (100, 300, 10),
        )

    def test_fullWithinGrace(self) -> None:
        """
        When full of sessions younger than the grace, a newcomer gets
        C{421 4.7.0} and is closed; the others are untouched.
        """
        others = [self.connect() for _ in range(2)]
        self.clock.advance(9)
        _, transport = self.connect()
        self.assertEqual(
            transport.value(), b"421 4.7.0 Too many connections, try again later\r\n"
        )
        self.assertTrue(transport.disconnecting)
        for _, t in [(self.proto, self.transport)] + others:
            self.assertFalse(t.disconnecting)
        self.assertEqual(self.factory.connections, 3)

    def test_oldestUnauthenticatedEvicted(self) -> None:
        """
        When full, a newcomer takes the place of the oldest session that
        has not logged in within the grace; logged-in sessions stay.
        """
        self.login()
        second, secondTransport = self.connect()
        self.clock.advance(1)
        _, thirdTransport = self.connect()
        self.clock.advance(10)
        _, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"220 "))
        self.assertTrue(secondTransport.disconnecting)
        self.assertEqual(
            secondTransport.value().split(b"\r\n")[-2],
            b"421 4.7.0 test.p2pmta Too many connections, closing this one",
        )
        self.assertFalse(self.transport.disconnecting)
        self.assertFalse(thirdTransport.disconnecting)
        self.assertEqual(self.factory.connections, 3)
        # The evicted session's late connectionLost changes no count.
        second.connectionLost(None)
        self.assertEqual(self.factory.connections, 3)
        # Next: the third, then nothing (the newcomer is within its grace).
        self.connect()
        self.assertTrue(thirdTransport.disconnecting)
        _, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"421 4.7.0 Too many connections"))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(codes(self.send(b"NOOP\r\n")), [250])


class BackpressureTests(HostileMixin, SynchronousTestCase):
    """
    A client that does not read its replies, in memory.
    """

    def test_stopsReading(self) -> None:
        """
        When the transport's write buffer is full, the server stops reading
        until it drains; a pending step's own pause is kept apart.
        """
        producer = self.transport.producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.login()
        self.submission.checkDelay = 1.0
        self.send(
            b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n" + b"NOOP\r\n" * 20_000
        )
        self.assertEqual(self.transport.producerState, "paused")
        producer.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(codes(self.lines()), [250] * 20_001)
        self.assertEqual(self.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_closeAbortsUnreadReplies(self) -> None:
        """
        On QUIT the producer goes (so the transport may close), and if the
        last replies are not taken within C{abortTimeout} the connection is
        aborted.
        """
        self.transport.producer.pauseProducing()
        self.assertEqual(self.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(self.proto.abortTimeout - 1)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)

    def test_noAbortOnceClosed(self) -> None:
        """
        A connection that closes in time leaves no abort behind.
        """
        self.send(b"QUIT\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DiskFullTests(HostileMixin, SynchronousTestCase):
    """
    Case 10, in memory: the spool's writes fail with ENOSPC.
    """

    maxMessageSize = 1_000_000

    def setUp(self) -> None:
        HostileMixin.setUp(self)
        self.disk = Disk()
        self.patch(spool, "openSpoolFile", spoolOpener(self.disk))
        self.login()
        self.assertEqual(
            codes(self.send(ENVELOPE + GOOD + b".\r\n")), [250, 250, 354, 250]
        )
        self.earlier = list(self.submission.accepted)

    def assertFull(self, lines: list) -> None:
        self.assertEqual(lines[-1], NO_SPACE)
        self.assertEqual(self.submission.accepted, self.earlier)
        self.assertEqual(self.spoolNames(), [])
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_fullWhileWriting(self) -> None:
        """
        A message that fills the disk while it arrives gets 452 4.3.1 after
        the dot, a short one (failing at the flush) too; the session goes
        on, the earlier message is intact, and once space returns mail is
        accepted again.
        """
        big = b"Subject: big\r\n\r\n" + (b"b" * 98 + b"\r\n") * 1000
        self.disk.full = True
        for message in (big, GOOD):
            for chunk in (0, 1000):
                self.assertFull(self.feed(ENVELOPE + message + b".\r\n", chunk=chunk))
        self.disk.full = False
        self.assertEqual(
            codes(self.feed(ENVELOPE + big + b".\r\n")), [250, 250, 354, 250]
        )
        self.assertEqual(self.messages(), [GOOD, big])

    def test_fullWhenData(self) -> None:
        """
        When the spool file cannot even be created, DATA gets 452 4.3.1 and
        the transaction stays open for a later try.
        """
        self.disk.full = self.disk.failOpen = True
        self.assertFull(self.send(ENVELOPE))
        self.disk.full = False
        self.assertEqual(codes(self.send(b"DATA\r\n" + GOOD + b".\r\n")), [354, 250])
        self.assertEqual(len(self.submission.accepted), 2)

    def test_fullWhenAccepting(self) -> None:
        """
        When the pipeline finds the disk full, the client gets 452 4.3.1.
        """
        self.submission.acceptError = OSError(errno.ENOSPC, "No space left on device")
        self.assertFull(self.send(ENVELOPE + GOOD + b".\r\n"))
        self.submission.acceptError = None
        self.assertUsable()

    def test_otherWriteError(self) -> None:
        """
        Another write error (EIO) gets 451 4.3.0 and is logged.
        """
        self.submission.acceptError = OSError(errno.EIO, "I/O error")
        lines = self.send(ENVELOPE + GOOD + b".\r\n")
        self.assertEqual(codes(lines)[-1], 451)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.submission.acceptError = None
        self.assertUsable()


# Real TCP on 127.0.0.1.


class RawClient:
    """
    A line-level SMTP client on a plain socket, for use in a thread.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """
        @return: the last line of the next reply, or C{b""} at the end.
        """
        while True:
            line = self.file.readline()
            if not line:
                return b""
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    def replies(self, count: int) -> list:
        return [self.reply() for _ in range(count)]

    def untilClosed(self) -> list:
        """
        @return: the last lines of all replies until the server closes.
        """
        out = []
        while True:
            line = self.reply()
            if not line:
                return out
            out.append(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startTLS(self) -> None:
        self.sock = ssl._create_unverified_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class TCPMixin:
    """
    A real server on 127.0.0.1, wrapped as the service wraps it.
    """

    maxMessageSize = 100_000
    factoryOptions: ClassVar[dict] = {}

    def setUp(self) -> None:
        private = self.mktemp()
        os.makedirs(private, mode=0o700)
        self.spool = self.spoolDirectory()
        self.submission = HostileSubmission(self.spool, self.maxMessageSize, reactor)
        portal = makePortal(reactor, ALICE, PASSWORD, {IMessageDelivery: Avatar})
        self.factory = SubmissionFactory(
            portal,
            self.submission,
            loadOrCreateCertificate(private, "localhost"),
            hostname="test.p2pmta",
            **self.factoryOptions,
        )
        self.wrapper = WrappingFactory(self.factory)
        self.port = reactor.listenTCP(0, self.wrapper, interface="127.0.0.1")
        self.addCleanup(self.closeAll)
        self.portNumber = self.port.getHost().port

    def spoolDirectory(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    @inlineCallbacks
    def closeAll(self):
        """
        Stop listening; close what the server still holds open.
        """
        yield self.port.stopListening()
        for connection in list(self.wrapper.protocols):
            connection.transport.abortConnection()
        yield self.serverClosed()

    @inlineCallbacks
    def serverClosed(self, remaining: int = 0, timeout: float = 20.0):
        """
        Wait until the server has at most C{remaining} connections left.
        """
        waited = 0.0
        while len(self.wrapper.protocols) > remaining:
            if waited > timeout:
                raise AssertionError(
                    f"{len(self.wrapper.protocols)} connections still open"
                )
            yield deferLater(reactor, 0.01, lambda: None)
            waited += 0.01

    @inlineCallbacks
    def converse(self, data: bytes):
        """
        In a thread: read the greeting, send C{data} in one write, read the
        replies until the server closes (C{data} should end in QUIT).

        @return: a Deferred of the reply lines after the greeting.
        """

        def client():
            c = RawClient(self.portNumber)
            try:
                self.assertEqual(c.reply()[:4], b"220 ")
                c.send(data)
                return c.untilClosed()
            finally:
                c.close()

        lines = yield deferToThread(client)
        yield self.serverClosed()
        return lines

    @inlineCallbacks
    def smtplibSession(self, f, remaining: int = 0):
        """
        Run C{f(client)} in a thread with a logged-in C{smtplib} client;
        wait until the server has closed all but C{remaining} connections.
        """

        def session():
            with smtplib.SMTP("127.0.0.1", self.portNumber, timeout=20) as s:
                s.login("alice@demo", PASSWORD)
                return f(s)

        result = yield deferToThread(session)
        yield self.serverClosed(remaining)
        return result

    def messages(self) -> list:
        return [withoutReceived(data) for _, _, data in self.submission.accepted]


class TCPTests(TCPMixin, TestCase):
    """
    Smuggling, pipelining, limits and STARTTLS injection over real TCP.
    """

    @inlineCallbacks
    def test_longLineSmuggling(self):
        """
        Case 1: one write holding a real message, then a 20,000-byte line
        followed by a spelled-out second transaction: exactly one message.
        """
        hostile = b"Subject: a\r\n\r\n" + b"x" * 20000 + b"\r\n" + SMUGGLED + b".\r\n"
        lines = yield self.converse(
            LOGIN
            + ENVELOPE
            + GOOD
            + b".\r\n"
            + ENVELOPE
            + hostile
            + b"NOOP\r\nQUIT\r\n"
        )
        self.assertEqual(
            codes(lines), [250, 235, 250, 250, 354, 250, 250, 250, 354, 500, 250, 221]
        )
        self.assertEqual(lines[-3], LONG_LINE)
        self.assertEqual(self.messages(), [GOOD])
        self.assertEqual(os.listdir(self.spool), [])

    @inlineCallbacks
    def test_bareEndingSmuggling(self):
        """
        Case 2: each bare-LF/bare-CR end-of-data look-alike, followed by a
        second transaction, over TCP: four 550s, then the one real message.
        """
        data = LOGIN
        for fake in BARE_ENDINGS:
            data += ENVELOPE + b"Subject: a\r\n\r\nhello" + fake + SMUGGLED + b".\r\n"
        lines = yield self.converse(data + ENVELOPE + GOOD + b".\r\nQUIT\r\n")
        self.assertEqual(
            codes(lines),
            [250, 235] + [250, 250, 354, 550] * 4 + [250, 250, 354, 250, 221],
        )
        self.assertEqual(self.messages(), [GOOD])

    @inlineCallbacks
    def test_pipelinedOverSlowLookups(self):
        """
        Case 3: a whole session in one write while each recipient check
        takes 50 ms: replies in order, one message with the right
        recipients and the body as sent.
        """
        self.submission.checkDelay = 0.05
        body = b"Subject: t\r\n\r\nMAIL FROM:<alice@demo>\r\nRCPT TO:<eve@demo>\r\nDATA\r\n"
        lines = yield self.converse(
            LOGIN
            + b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nRCPT TO:<bob@demo>\r\n"
            b"RCPT TO:<dave@demo>\r\nDATA\r\n" + body + b".\r\nNOOP\r\nQUIT\r\n"
        )
        self.assertEqual(
            codes(lines), [250, 235, 250, 250, 550, 250, 354, 250, 250, 221]
        )
        [(_, rcpts, data)] = self.submission.accepted
        self.assertEqual(rcpts, [CAROL, DAVE])
        self.assertEqual(withoutReceived(data), body)

    @inlineCallbacks
    def test_oneByteOverSizeLimit(self):
        """
        Case 4: smtplib sends (without SIZE) one byte over the limit: 552
        after the data, NOOP 250, then a normal message is accepted.
        """
        line = b"x" * 98 + b"\r\n"
        over = b"y" + line * 1000

        def send(s):
            s.ehlo()
            self.assertEqual(s.mail("alice@demo")[0], 250)
            self.assertEqual(s.rcpt("carol@demo")[0], 250)
            refused = s.data(over)
            noop = s.noop()[0]
            accepted = s.sendmail("alice@demo", ["carol@demo"], line * 1000)
            return refused, noop, accepted

        refused, noop, accepted = yield self.smtplibSession(send)
        self.assertEqual(refused[0], 552)
        self.assertEqual(noop, 250)
        self.assertEqual(accepted, {})
        self.assertEqual(self.messages(), [line * 1000])

    @inlineCallbacks
    def test_twoThousandRecipients(self):
        """
        Case 5: 2,000 RCPTs in one write over asynchronous look-ups: 1,000
        250s, 1,000 452 4.5.3s, the message to the 1,000.
        """
        self.submission.checkDelay = 0
        rcpts = b"".join(b"RCPT TO:<r%d@demo>\r\n" % (i,) for i in range(2000))
        lines = yield self.converse(
            LOGIN
            + b"MAIL FROM:<alice@demo>\r\n"
            + rcpts
            + b"DATA\r\n"
            + GOOD
            + b".\r\nQUIT\r\n"
        )
        self.assertEqual(
            codes(lines),
            [250, 235, 250] + [250] * 1000 + [452] * 1000 + [354, 250, 221],
        )
        [(_, recipients, data)] = self.submission.accepted
        self.assertEqual(len(recipients), 1000)
        self.assertEqual(withoutReceived(data), GOOD)

    @inlineCallbacks
    def test_startTLSInjection(self):
        """
        Case 8: after a login in the clear, STARTTLS with a transaction and
        QUIT in the same packet: none of it runs inside TLS.
        """

        def inject():
            c = RawClient(self.portNumber)
            try:
                c.reply()
                c.send(LOGIN)
                self.assertEqual(codes(c.replies(2)), [250, 235])
                c.send(
                    b"STARTTLS\r\n"
                    + ENVELOPE
                    + b"Subject: x\r\n\r\ninjected\r\n.\r\nQUIT\r\n"
                )
                self.assertEqual(c.reply(), b"220 2.0.0 Ready to start TLS")
                c.startTLS()
                c.send(b"NOOP\r\nMAIL FROM:<alice@demo>\r\nQUIT\r\n")
                return c.untilClosed()
            finally:
                c.close()

        lines = yield deferToThread(inject)
        yield self.serverClosed()
        self.assertEqual(codes(lines), [250, 530, 221])
        self.assertEqual(self.submission.accepted, [])

    @inlineCallbacks
    def test_clientThatDoesNotRead(self):
        """
        A client that pipelines NOOPs (pre-auth) without reading a reply is
        no longer read from once its replies fill the transport's buffer:
        what the server holds for it stays bounded.
        """

        def flood():
            s = socket.create_connection(("127.0.0.1", self.portNumber), timeout=1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sent, chunk = 0, b"NOOP\r\n" * 10_000
            try:
                while sent < 48 * 2**20:
                    s.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass
            return s, sent

        sock, sent = yield deferToThread(flood)
        try:
            [connection] = self.wrapper.protocols
            tcp = connection.transport
            # The replies Twisted holds, not yet taken by the kernel.
            pending = len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
            self.assertLess(pending, 1_000_000)
            self.assertLess(sent, 48 * 2**20)
        finally:
            sock.close()
        yield self.serverClosed()


class ConnectionFloodTests(TCPMixin, TestCase):
    """
    Case 9 over TCP: 200 idle connections that never log in.
    """

    def setUp(self) -> None:
        # The factory's time (login grace, idle timeout) is ours to move.
        self.clock = Clock()
        self.factoryOptions = {
            "maxConnections": 100,
            "timeout": 300,
            "loginGrace": 10,
            "clock": self.clock,
        }
        TCPMixin.setUp(self)

    @inlineCallbacks
    def test_twoHundredIdle(self):
        """
        Of 200 idle connections, 100 are greeted and 100 get C{421 4.7.0};
        the idle ones stay served; once they are past the login grace, a
        real client is served (the oldest idle one is closed for it).
        """
        clients: list = []
        self.addCleanup(lambda: [c.close() for c in clients])

        def flood():
            greetings = []
            for _ in range(200):
                c = RawClient(self.portNumber)
                clients.append(c)
                greetings.append(c.reply())
            return greetings

        greetings = yield deferToThread(flood)
        self.assertEqual(greetings[:100], [b"220 test.p2pmta ESMTP p2pmta"] * 100)
        self.assertEqual(
            greetings[100:], [b"421 4.7.0 Too many connections, try again later"] * 100
        )
        self.assertEqual(self.factory.connections, 100)

        def idleStillServed():
            clients[50].send(b"NOOP\r\n")
            return clients[50].reply()

        self.assertEqual((yield deferToThread(idleStillServed)), b"250 2.0.0 Ok")
        self.clock.advance(10)

        def send(s):
            return s.sendmail("alice@demo", ["carol@demo"], GOOD)

        # The first takes the place of the oldest idle session; then there
        # is room for the second.
        for _ in range(2):
            self.assertEqual((yield self.smtplibSession(send, remaining=99)), {})
        self.assertEqual(self.messages(), [GOOD, GOOD])
        self.assertEqual(self.factory.connections, 99)

        def evicted():
            clients[1].send(b"NOOP\r\n")
            return clients[0].untilClosed(), clients[1].reply()

        self.assertEqual(
            (yield deferToThread(evicted)),
            (
                [b"421 4.7.0 test.p2pmta Too many connections, closing this one"],
                b"250 2.0.0 Ok",
            ),
        )

        def closeAll():
            for c in clients:
                c.close()

        yield deferToThread(closeAll)
        yield self.serverClosed()
        self.assertEqual(self.factory.connections, 0)


class TmpfsSpoolTests(TCPMixin, TestCase):
    """
    Case 10 for real: the spool on a 1 MiB tmpfs that fills up.
    """

    maxMessageSize = 10 * 1024 * 1024

    def spoolDirectory(self) -> str:
        if os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs needs root")
        self.mountPoint = tempfile.mkdtemp(prefix="p2pmta-tmpfs-")
        self.addCleanup(shutil.rmtree, self.mountPoint, True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", self.mountPoint],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise SkipTest(
                "cannot mount a tmpfs: " + result.stderr.decode(errors="replace")
            )
        self.addCleanup(self.unmount)
        spool = os.path.join(self.mountPoint, "spool")
        os.makedirs(spool)
        return spool

    def unmount(self) -> None:
        if subprocess.run(["umount", self.mountPoint], check=False).returncode != 0:
            subprocess.run(["umount", "-l", self.mountPoint], check=True)

    def setUp(self) -> None:
        TCPMixin.setUp(self)
        self.submission.queue = os.path.join(self.mountPoint, "queue")
        os.makedirs(self.submission.queue)

    def fill(self) -> None:
        """
        Fill the file system up to its last byte.
        """
        with open(os.path.join(self.mountPoint, "filler"), "wb", buffering=0) as f:
            block = b"\0" * 4096
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    self.assertEqual(e.errno, errno.ENOSPC)
                    if len(block) == 1:
                        return
                    block = block[: len(block) // 2]

    @inlineCallbacks
    def test_diskFull(self):
        """
        With the spool's file system full, a message gets 452 4.3.1 (big:
        while written; small: at the fsync), the session goes on, the
        earlier message is intact, and once space returns the same message
        is accepted.
        """
        earlier = b"Subject: earlier\r\n\r\n" + (b"e" * 98 + b"\r\n") * 20
        big = b"Subject: big\r\n\r\n" + (b"b" * 98 + b"\r\n") * 500

        def session(s):
            out = [s.sendmail("alice@demo", ["carol@demo"], earlier)]
            self.fill()
            for message in (big, GOOD):
                with self.assertRaises(smtplib.SMTPDataError) as e:
                    s.sendmail("alice@demo", ["carol@demo"], message)
                out.append((e.exception.smtp_code, e.exception.smtp_error))
                out.append(s.noop()[0])
            os.unlink(os.path.join(self.mountPoint, "filler"))
            out.append(s.sendmail("alice@demo", ["carol@demo"], big))
            return out

        result = yield self.smtplibSession(session)
        self.assertEqual(
            result,
            [
                {},
                (452, b"4.3.1 Insufficient system storage"),
                250,
                (452, b"4.3.1 Insufficient system storage"),
                250,
                {},
            ],
        )
        stored = []
        for _, _, path in self.submission.accepted:
            with open(path, "rb") as f:
                stored.append(withoutReceived(f.read()))
        self.assertEqual(stored, [earlier, big])
        self.assertEqual(os.listdir(self.spool), [])
