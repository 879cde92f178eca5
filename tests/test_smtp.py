"""
Tests for L{p2pmta.smtp}: the submission server, fed bytes directly and
driven over TCP on 127.0.0.1 by the stdlib C{smtplib}.
"""

import base64
import errno
import mmap
import os
import smtplib
import socket
import ssl
import threading
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent
from twisted.mail.smtp import IMessageDelivery
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from p2pmta import fileutil
from p2pmta.address import Address
from p2pmta.auth import makePortal
from p2pmta.errors import CryptoError, UnknownPeer
from p2pmta.interfaces import ISubmission
from p2pmta.smtp import SubmissionFactory
from p2pmta.smtpsession import SubmissionServer
from p2pmta.spool import ENVELOPE_ATTRIBUTE, TEMP_PREFIX, Envelope, findUnrecorded, keepsEnvelopes
from p2pmta.tls import loadOrCreateCertificate
from tests.test_fileutil import cachedPages, requireDirect

ALICE = Address.parse("alice@demo")
PASSWORD = "s3cret pass"
UNKNOWN = Address.parse("bob@demo")
NOKEY = Address.parse("mallory@demo")
BROKEN = Address.parse("broken@demo")
AUTH_PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice@demo\0s3cret pass") + b"\r\n"
LOGIN = b"EHLO client.example\r\n" + AUTH_PLAIN
SMUGGLED = (
    b"MAIL FROM:<alice@demo>\r\nRCPT TO:<eve@demo>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n"
)


@implementer(ISubmission)
class FakeSubmission:
    """
    An in-memory L{ISubmission}: records what it accepts.

    @ivar pending: if true, C{checkRecipient} returns unfired Deferreds,
        kept in C{checks}.
    @ivar failAccept: if true, C{accept} fails and leaves the file alone.
    """

    keepsEnvelopes = False

    def __init__(self, spool: str, maxMessageSize: int = 10_000) -> None:
        self.spoolDirectory = spool
        self.maxMessageSize = maxMessageSize
        self.accepted: list = []
        self.envelopes: list = []  # (what flushing fired with, the file's envelope)
        self.checks: list = []
        self.pending = False
        self.failAccept = False
        self.sessionCounts: list = []

    def sessions(self, count: int) -> None:
        self.sessionCounts.append(count)

    def checkRecipient(self, address):
        if address == UNKNOWN:
            return fail(UnknownPeer(str(address)))
        if address == NOKEY:
            return fail(CryptoError(str(address)))
        if address == BROKEN:
            return fail(RuntimeError("DHT exploded"))
        if self.pending:
            d = Deferred()
            self.checks.append((address, d))
            return d
        return succeed(None)

    def accept(self, sender, recipients, path, flushing, check):
        assert os.path.basename(path).startswith(TEMP_PREFIX), path
        if self.failAccept:
            return fail(OSError("spool full"))

        def flushed(kept):
            with open(path, "rb") as f:
                data = f.read()
                try:
                    envelope = Envelope.decode(os.getxattr(f.fileno(), ENVELOPE_ATTRIBUTE))
                except OSError:
                    envelope = None
            self.envelopes.append((kept, envelope))
            assert check == (len(data), zlib.crc32(data)), (check, len(data))
            os.unlink(path)
            self.accepted.append((sender, list(recipients), data))
            return "id%d" % (len(self.accepted),)

        return flushing.addCallback(flushed)


class Avatar:
    """
    The SMTP avatar: counts logouts.
    """

    logouts = 0

    def logout(self) -> None:
        Avatar.logouts += 1


def runNow(f, *args):
    """
    A C{runBlocking} that runs C{f} at once.
    """
    try:
        return succeed(f(*args))
    except Exception as e:
        return fail(e)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS}.
    """

    tlsStarted = None

    def startTLS(self, contextFactory) -> None:
        self.tlsStarted = contextFactory


def codes(lines: list) -> list:
    """
    The codes of the final lines of replies.
    """
    return [int(line[:3]) for line in lines if line[3:4] != b"-"]


class ServerMixin:
    """
    A server on a L{StringTransport}, with a L{Clock} for time.
    """

    transportFactory = StringTransport

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = self.mktemp()
        os.makedirs(self.spool)
        self.submission = FakeSubmission(self.spool)
        self.portal = makePortal(self.clock, ALICE, PASSWORD, {IMessageDelivery: Avatar})
        self.factory = SubmissionFactory(
            self.portal,
            self.submission,
            tlsOptions=getattr(self, "tlsOptions", None),
            hostname=b"test.p2pmta",
            clock=self.clock,
            runBlocking=runNow,
        )
        self.proto, self.transport = self.connect()

    def connect(self):
        transport = self.transportFactory(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes, chunk: int = 0) -> list:
        """
        Feed C{data} (in pieces of C{chunk} bytes, if given).

        @return: the lines sent back since the last call.
        """
        self.transport.clear()
        if chunk:
            for i in range(0, len(data), chunk):
                self.proto.dataReceived(data[i : i + chunk])
        else:
            self.proto.dataReceived(data)
        return self.lines()

    def lines(self) -> list:
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return lines

    def login(self) -> None:
        self.assertEqual(codes(self.send(LOGIN)), [250, 235])

    def spoolNames(self) -> list:
        return os.listdir(self.spool)


class SessionTests(ServerMixin, SynchronousTestCase):
    """
    Greeting, extensions, simple commands, timeouts, connection limits.
    """

    def test_fakeIsSubmission(self) -> None:
        """
        The fake submission pipeline honours L{ISubmission}.
        """
        verifyObject(ISubmission, self.submission)

    def test_greeting(self) -> None:
        """
        The server greets with 220 and its host name.
        """
        self.assertEqual(self.lines(), [b"220 test.p2pmta ESMTP p2pmta"])

    def test_extensions(self) -> None:
        """
        EHLO advertises SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES and
        AUTH PLAIN LOGIN; no STARTTLS without TLS options.
        """
        self.lines()
        lines = self.send(b"EHLO client.example\r\n")
        self.assertEqual(lines[0], b"250-test.p2pmta Hello 127.0.0.1")
        self.assertEqual(
            [line[4:] for line in lines[1:]],
            [b"SIZE 10000", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES",
             b"AUTH PLAIN LOGIN", b"HELP"],
        )
        self.assertEqual(codes(lines), [250])
        self.assertEqual(codes(self.send(b"STARTTLS\r\n")), [454])

    def test_badEhlo(self) -> None:
        """
        EHLO without a name, or with a control character in it, is refused.
        """
        self.lines()
        self.assertEqual(self.send(b"EHLO\r\n"), [b"501 5.5.4 Syntax: EHLO hostname"])
        self.assertEqual(codes(self.send(b"EHLO a\nb\r\n")), [500])
        self.assertEqual(codes(self.send(b"HELO a.b\r\n")), [250])

    def test_simpleCommands(self) -> None:
        """
        NOOP, VRFY, RSET, HELP and QUIT work without authentication.
        """
        self.lines()
        lines = self.send(b"NOOP\r\nVRFY alice\r\nRSET\r\nHELP\r\nnoop\r\n")
        self.assertEqual(codes(lines), [250, 252, 250, 214, 250])
        self.assertTrue(lines[3].startswith(b"214 2.0.0 Commands: "))
        self.assertEqual(self.send(b"QUIT\r\nNOOP\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(self.transport.disconnecting)

    def test_unknownCommand(self) -> None:
        """
        Unknown commands, empty lines and Python attribute names get 500.
        """
        self.lines()
        self.assertEqual(
            codes(self.send(b"FOO\r\n\r\n__init__\r\nUNKNOWN\r\n\xff\r\n")),
            [500] * 5,
        )

    def test_commandLineTooLong(self) -> None:
        """
        A command line over 16 KiB gets one 500 when it ends; the session goes on.
        """
        self.lines()
        self.assertEqual(self.send(b"NOOP " + b"x" * 20000, chunk=1000), [])
        self.assertEqual(self.send(b"y" * 30000 + b"\r\nNOOP\r\n"), [
            b"500 5.5.2 Line too long", b"250 2.0.0 Ok"])

    def test_idleTimeout(self) -> None:
        """
        After 300 s of silence the server says 421 and hangs up.
        """
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.send(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(codes(self.lines()), [421])
        self.assertTrue(self.transport.disconnecting)

    def test_connectionLimit(self) -> None:
        """
        Past C{maxConnections} sessions, a connection gets 421 and is closed;
        once one ends, a new one is served.
        """
        self.factory.maxConnections = 2
        second, _ = self.connect()
        third, transport = self.connect()
        self.assertEqual(transport.value(), b"421 4.7.0 Too many connections, try again later\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.connections, 2)
        second.connectionLost(None)
        fourth, transport = self.connect()
        self.assertIsInstance(fourth, SubmissionServer)
        self.assertTrue(transport.value().startswith(b"220 "))

    def test_sessionsTold(self) -> None:
        """
        The submission is told how many sessions are open at each change,
        an eviction included: with none, no message is on its way.
        """
        self.assertEqual(self.submission.sessionCounts, [1])
        second, _ = self.connect()
        self.assertEqual(self.submission.sessionCounts, [1, 2])
        second.connectionLost(None)
        self.proto.connectionLost(None)
        self.assertEqual(self.submission.sessionCounts, [1, 2, 1, 0])
        self.factory.maxConnections = 1
        self.factory.loginGrace = 0
        first, _ = self.connect()
        self.connect()  # evicts the first, which has not logged in
        self.assertEqual(self.submission.sessionCounts, [1, 2, 1, 0, 1, 0, 1])
        first.connectionLost(None)  # already not counted
        self.assertEqual(self.submission.sessionCounts[-1], 1)

    def test_logoutOnDisconnect(self) -> None:
        """
        Losing the connection logs the avatar out.
        """
        self.login()
        before = Avatar.logouts
        self.proto.connectionLost(None)
        self.assertEqual(Avatar.logouts, before + 1)
        self.assertEqual(self.factory.connections, 0)


class AuthTests(ServerMixin, SynchronousTestCase):
    """
    AUTH PLAIN and LOGIN through the portal; nothing without it.
    """

    def test_authRequired(self) -> None:
        """
        MAIL, RCPT and DATA get 530 5.7.0 before authentication.
        """
        self.lines()
        lines = self.send(
            b"EHLO c\r\nMAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n"
        )
        self.assertEqual(lines[-3:], [b"530 5.7.0 Authentication required"] * 3)

    def test_authPlain(self) -> None:
        """
        AUTH PLAIN with an initial response logs in.
        """
        self.lines()
        lines = self.send(LOGIN)
        self.assertEqual(lines[-1], b"235 2.7.0 Authentication successful")
        self.assertEqual(codes(self.send(b"AUTH PLAIN\r\n")), [503])

    def test_authPlainChallenge(self) -> None:
        """
        AUTH PLAIN without an initial response gets an empty 334 challenge.
        """
        self.lines()
        self.assertEqual(self.send(b"EHLO c\r\nAUTH PLAIN\r\n")[-1], b"334 ")
        response = base64.b64encode(b"\0alice@demo\0s3cret pass") + b"\r\n"
        self.assertEqual(codes(self.send(response)), [235])

    def test_authLogin(self) -> None:
        """
        AUTH LOGIN asks for the user name, then the password.
        """
        self.lines()
        self.assertEqual(self.send(b"EHLO c\r\nAUTH LOGIN\r\n")[-1], b"334 VXNlcm5hbWU6")
        self.assertEqual(self.send(base64.b64encode(b"Alice@Demo") + b"\r\n"),
                         [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(codes(self.send(base64.b64encode(b"s3cret pass") + b"\r\n")), [235])
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo>\r\n")), [250])

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets 535 once the portal's delay is over; commands
        pipelined behind it wait for that answer.
        """
        self.lines()
        bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice@demo\0guess") + b"\r\n"
        self.assertEqual(codes(self.send(b"EHLO c\r\n" + bad + b"MAIL FROM:<alice@demo>\r\n")),
                         [250])
        self.clock.advance(1)
        self.assertEqual(
            self.lines(),
            [b"535 5.7.8 Authentication credentials invalid",
             b"530 5.7.0 Authentication required"],
        )

    def test_wrongUser(self) -> None:
        """
        Another user name with the right password gets 535.
        """
        self.lines()
        self.send(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\0bob@demo\0s3cret pass") + b"\r\n")
        self.clock.advance(1)
        self.assertEqual(codes(self.lines()), [535])

    def test_tooManyFailures(self) -> None:
        """
        The third failed AUTH in a session closes it with 421.
        """
        self.lines()
        bad = b"AUTH LOGIN " + base64.b64encode(b"alice@demo") + b"\r\n" + \
            base64.b64encode(b"guess") + b"\r\n"
        lines = self.send(b"EHLO c\r\n" + bad * 3)
        for _ in range(5):
            self.clock.advance(10)
        self.assertEqual(codes(lines + self.lines()), [250, 334, 535, 334, 535, 334, 421])
        self.assertTrue(self.transport.disconnecting)

    def test_malformedAuth(self) -> None:
        """
        Bad AUTH commands and responses get 5xx and leave the session usable.
        """
        self.lines()
        self.send(b"EHLO c\r\n")
        for line, code in [
            (b"AUTH\r\n", 501),
            (b"AUTH CRAM-MD5\r\n", 504),
            (b"AUTH PLAIN !!!notbase64\r\n", 501),
            (b"AUTH PLAIN " + base64.b64encode(b"only\0two") + b"\r\n", 501),
            (b"AUTH PLAIN =\r\n", 501),
            (b"AUTH LOGIN\r\n*\r\n", 501),
        ]:
            self.assertEqual(codes(self.send(line))[-1], code, line)
        self.assertEqual(codes(self.send(b"NOOP\r\n")), [250])

    def test_authNeedsEhlo(self) -> None:
        """
        AUTH before EHLO gets 503.
        """
        self.lines()
        self.assertEqual(codes(self.send(AUTH_PLAIN)), [503])


class EnvelopeTests(ServerMixin, SynchronousTestCase):
    """
    MAIL FROM and RCPT TO.
    """

    def setUp(self) -> None:
        ServerMixin.setUp(self)
        self.login()

    def test_mailFromOther(self) -> None:
        """
        MAIL FROM another address than the user's gets 553 5.7.1.
        """
        for path in [b"<bob@demo>", b"<>", b"<alice@other>", b"<not an address>"]:
            lines = self.send(b"MAIL FROM:" + path + b"\r\n")
            self.assertEqual(codes(lines), [553 if path != b"<not an address>" else 501], path)
        self.assertEqual(codes(self.send(b"MAIL FROM:<ALICE@demo>\r\n")), [250])

    def test_mailSyntax(self) -> None:
        """
        Parameters: SIZE, BODY and AUTH are understood, others refused.
        """
        self.assertEqual(codes(self.send(b"MAIL TO:<alice@demo>\r\n")), [501])
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo> SMTPUTF8\r\n")), [555])
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo> SIZE=x\r\n")), [501])
        self.assertEqual(
            codes(self.send(b"MAIL FROM:<alice@demo> SIZE=10000 BODY=8BITMIME AUTH=<>\r\n")),
            [250],
        )
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo>\r\n")), [503])

    def test_sizeParameterTooBig(self) -> None:
        """
        A SIZE parameter over the limit gets 552 5.3.4 at MAIL time.
        """
        self.assertEqual(
            self.send(b"MAIL FROM:<alice@demo> SIZE=10001\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )

    def test_rcptBeforeMail(self) -> None:
        """
        RCPT or DATA before MAIL gets 503.
        """
        self.assertEqual(codes(self.send(b"RCPT TO:<carol@demo>\r\nDATA\r\n")), [503, 503])

    def test_malformedRecipient(self) -> None:
        """
        A recipient that is no p2pmta address gets 501 5.1.3.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\n")
        for line in [b"RCPT TO:<carol>", b"RCPT TO:<a@b@c>", b"RCPT TO:<\xff@demo>"]:
            self.assertEqual(self.send(line + b"\r\n"), [b"501 5.1.3 Bad recipient address syntax"])
        self.assertEqual(codes(self.send(b"RCPT carol@demo\r\n")), [501])
        self.assertEqual(codes(self.send(b"RCPT TO:<carol@demo> NOTIFY=NEVER\r\n")), [555])

    def test_unknownRecipient(self) -> None:
        """
        A recipient without a live peer gets 550 5.1.1 with a clear reason;
        the others still get the message.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\n")
        lines = self.send(
            b"RCPT TO:<bob@demo>\r\nRCPT TO:<carol@demo>\r\nRCPT TO:<mallory@demo>\r\n"
            b"RCPT TO:<broken@demo>\r\n"
        )
        self.assertEqual(lines, [
            b"550 5.1.1 bob@demo: no live p2pmta peer (no descriptor in the DHT)",
            b"250 2.1.5 Ok",
            b"550 5.1.1 mallory@demo: no usable OpenPGP key for that peer",
            b"451 4.4.3 broken@demo: recipient look-up failed, try again later",
        ])
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(codes(self.send(b"DATA\r\nhi\r\n.\r\n")), [354, 250])
        self.assertEqual(self.submission.accepted[0][1], [Address.parse("carol@demo")])

    def test_noValidRecipient(self) -> None:
        """
        DATA with no accepted recipient gets 554.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<bob@demo>\r\n")
        self.assertEqual(codes(self.send(b"DATA\r\n")), [554])

    def test_duplicateRecipients(self) -> None:
        """
        A recipient named twice (in any case) is kept once.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\n")
        lines = self.send(b"RCPT TO:<carol@demo>\r\nRCPT TO:<Carol@Demo>\r\nRCPT TO:<dave@demo>\r\n")
        self.assertEqual(codes(lines), [250, 250, 250])
        self.send(b"DATA\r\nhi\r\n.\r\n")
        self.assertEqual(self.submission.accepted[0][1],
                         [Address.parse("carol@demo"), Address.parse("dave@demo")])

    def test_tooManyRecipients(self) -> None:
        """
        Past 1000 recipients, RCPT gets 452 4.5.3; the message goes to the
        first 1000.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\n")
        rcpts = b"".join(b"RCPT TO:<r%d@demo>\r\n" % (i,) for i in range(2000))
        lines = self.send(rcpts)
        self.assertEqual(codes(lines), [250] * 1000 + [452] * 1000)
        self.assertEqual(lines[-1], b"452 4.5.3 Error: too many recipients")
        self.assertEqual(codes(self.send(b"DATA\r\nhi\r\n.\r\n")), [354, 250])
        self.assertEqual(len(self.submission.accepted[0][1]), 1000)

    def test_rsetForgetsTransaction(self) -> None:
        """
        RSET ends the transaction, not the authentication.
        """
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n")
        self.assertEqual(codes(self.send(b"RSET\r\nDATA\r\nMAIL FROM:<alice@demo>\r\n")),
                         [250, 503, 250])


class DataTests(ServerMixin, SynchronousTestCase):
    """
    The message: byte-exact storage, limits, and no smuggling.
    """

    def setUp(self) -> None:
        ServerMixin.setUp(self)
        self.login()
        self.startData()

    def startData(self) -> None:
        lines = self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
        self.assertEqual(codes(lines), [250, 250, 354])

    def stored(self) -> bytes:
        """
        The one accepted message, without the Received header.
        """
        [(sender, rcpts, data)] = self.submission.accepted
        self.assertEqual(sender, ALICE)
        received, rest = data.split(b"\r\n", 3)[:3], data.split(b"\r\n", 3)[3]
        self.assertEqual(received, [
            b"Received: from client.example ([127.0.0.1])",
            b"\tby test.p2pmta (p2pmta) with ESMTPA;",
            b"\tThu, 01 Jan 1970 00:00:00 +0000",
        ])
        return rest

    def assertRefused(self, data: bytes, reply: bytes, chunks=(0, 1, 7)) -> None:
        """
        However C{data} is cut up, the message is refused with C{reply}, no
        message is accepted and the session goes on.
        """
        for chunk in chunks:
            self.assertEqual(self.send(data, chunk=chunk), [reply])
            self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
            self.assertEqual(self.submission.accepted, [])
            self.assertEqual(self.spoolNames(), [])
            self.startData()

    def test_byteExact(self) -> None:
        """
        The stored message is the data, dot-unstuffed, CRLF line ends, after
        a Received header.
        """
        body = (b"Subject: dots\r\n\r\n..leading dot\r\n.\t.\r\n\r\n"
                b"...\r\nend. \r\n.\r\n\r\n")
        data = body.replace(b"\r\n.", b"\r\n..")
        for chunk in (0, 1, 2, 3, 5):
            self.submission.accepted = []
            lines = self.send(data + b".\r\n", chunk=chunk)
            self.assertEqual(lines, [b"250 2.0.0 Ok: queued as id1"])
            self.assertEqual(self.stored(), body)
            self.assertEqual(self.spoolNames(), [])
            self.startData()

    def test_unstuffed(self) -> None:
        """
        A leading dot of each line (also the first) is removed, once.
        """
        self.send(b"..a\r\n...\r\nb.\r\n.\r\n")
        self.assertEqual(self.stored(), b".a\r\n..\r\nb.\r\n")

    def test_emptyMessage(self) -> None:
        """
        An empty message is accepted: just the Received header.
        """
        self.assertEqual(codes(self.send(b".\r\n")), [250])
        self.assertEqual(self.stored(), b"")

    def test_maxSize(self) -> None:
        """
        A message of exactly the limit is accepted; one byte more gets 552
        5.3.4 after the data, and the session goes on.
        """
        line = b"x" * 98 + b"\r\n"
        self.assertEqual(codes(self.send(line * 100 + b".\r\n")), [250])
        self.assertEqual(len(self.stored()), 10_000)
        self.submission.accepted = []
        self.startData()
        self.assertRefused(
            b"y" + line * 100 + b".\r\n",
            b"552 5.3.4 Message size exceeds fixed maximum message size",
            chunks=(0, 999),
        )

    def test_longLineSmuggling(self) -> None:
        """
        A 20,000-byte line refuses the message; what follows it, up to the
        end of data, is body text, never commands.
        """
        data = (b"Subject: a\r\n\r\n" + b"x" * 20000 + b"\r\n" + SMUGGLED + b".\r\n")
        self.assertRefused(data, b"500 5.5.2 Message line longer than 1000 octets",
                           chunks=(0, 1, 1000, 16384))

    def test_longLineThenDot(self) -> None:
        """
        A long line ending in a dot is not the end of data.
        """
        data = b"x" * 5000 + b".\r\n" + SMUGGLED + b".\r\n"
        for chunk in (0, 1, 2, 4999):
            self.assertEqual(self.send(data, chunk=chunk),
                             [b"500 5.5.2 Message line longer than 1000 octets"])
            self.assertEqual(self.submission.accepted, [])
            self.startData()

    def test_lineLimit(self) -> None:
        """
        A line of 998 octets (1000 with CRLF) is accepted, one of 999 is not.
        """
        self.assertEqual(codes(self.send(b"a" * 998 + b"\r\n.\r\n")), [250])
        self.submission.accepted = []
        self.startData()
        self.assertRefused(b"b" * 999 + b"\r\n.\r\n",
                           b"500 5.5.2 Message line longer than 1000 octets")

    def test_bareNewlineEndings(self) -> None:
        """
        None of the bare-LF / bare-CR look-alikes of CRLF.CRLF ends the
        data: a second transaction after one is body text of a refused message.
        """
        for fake in [b"\n.\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                     b"\r.\r", b"\n\r.\r\n"]:
            data = b"Subject: a\r\n\r\nhello" + fake + SMUGGLED + b".\r\n"
            self.assertRefused(
                data, b"550 5.5.2 Bare <CR> or <LF> in message: use <CR><LF> line ends"
            )

    def test_bareNewlines(self) -> None:
        """
        A bare LF or CR anywhere in the message refuses it.
        """
        for data in [b"a\nb\r\n.\r\n", b"a\rb\r\n.\r\n", b"a\r\r\n.\r\n", b"\n.\r\n.\r\n"]:
            self.assertRefused(
                data, b"550 5.5.2 Bare <CR> or <LF> in message: use <CR><LF> line ends"
            )

    def test_nul(self) -> None:
        """
        A NUL byte refuses the message with 550 5.6.0.
        """
        self.assertRefused(b"Subject: a\0b\r\n\r\nbody\r\n.\r\n",
                           b"550 5.6.0 NUL character in message")

    def test_headerTooLarge(self) -> None:
        """
        A header section past C{maxHeaderSize} refuses the message; a body
        of that size is fine.
        """
        self.proto.maxHeaderSize = 500
        self.assertEqual(codes(self.send(b"S: a\r\n\r\n" + b"b" * 900 + b"\r\n.\r\n")), [250])
        self.submission.accepted = []
        self.startData()
        self.assertRefused(b"S: a\r\n" * 100 + b"\r\nbody\r\n.\r\n",
                           b"552 5.3.4 Message header section too large")

    def test_tempFileInSpool(self) -> None:
        """
        While the data arrives, the spool holds one C{.smtp-} file; the
        server never gives it another name.
        """
        self.send(b"Subject: a\r\n\r\nbody\r\n")
        [name] = self.spoolNames()
        self.assertTrue(name.startswith(TEMP_PREFIX))
        self.send(b".\r\n")
        self.assertEqual(self.spoolNames(), [])

    def test_acceptFails(self) -> None:
        """
        When the pipeline does not take the message, the client gets 451
        4.3.0 and the file is removed.
        """
        self.submission.failAccept = True
        self.assertEqual(codes(self.send(b"hi\r\n.\r\nNOOP\r\n")), [451, 250])
        self.assertEqual(self.spoolNames(), [])
        self.flushLoggedErrors(OSError)

    def test_fsyncFails(self) -> None:
        """
        When the file cannot be flushed, the client gets 451 and the file is
        removed.
        """
        self.factory.runBlocking = lambda f, *a: fail(OSError("EIO"))
        self.assertEqual(codes(self.send(b"hi\r\n.\r\n")), [451])
        self.assertEqual(self.spoolNames(), [])
        self.assertEqual(self.submission.accepted, [])
        self.flushLoggedErrors(OSError)

    def test_connectionLostDuringData(self) -> None:
        """
        A connection lost in the middle of the data leaves no file behind.
        """
        self.send(b"Subject: a\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(self.spoolNames(), [])

    def test_acceptLogged(self) -> None:
        """
        One line is logged per message, without body or password, once its
        250 is written (on the reactor's next turn).
        """
        events = []
        self.proto.log = Logger(observer=events.append)
        message = b"Subject: secret subject\r\n\r\nsecret body\r\n"
        self.assertIn(b"250 2.0.0 Ok: queued as id1", self.send(message + b".\r\n"))
        self.assertEqual(events, [])
        self.clock.advance(0)
        texts = [formatEvent(e) for e in events]
        self.assertEqual(
            texts, ["accepted id1 from alice@demo for 1 recipients, %d bytes" % len(message)]
        )


def expectedData(data: bytes, maxSize: int):
    """
    A model of the data phase: what the server must make of C{data}, sent
    after the 354 reply.

    @return: C{(message, codes)}: the message to store (or L{None}) and the
        reply codes allowed for it.
    """
    view = b"\r\n" + data
    end = view.find(b"\r\n.\r\n")
    lines = view[2 : end + 2].split(b"\r\n")[:-1]
    message = b"".join((line[1:] if line[:1] == b"." else line) + b"\r\n" for line in lines)
    refusals = set()
    if any(len(line) > 998 for line in lines):
        refusals.add(500)
    if any(b"\r" in line or b"\n" in line for line in lines):
        refusals.add(550)
    if b"\0" in message:
        refusals.add(550)
    if len(message) > maxSize:
        refusals.add(552)
    return (None, refusals) if refusals else (message, {250})


class SpoolAheadTests(ServerMixin, SynchronousTestCase):
    """
    Spool files made ahead of time: their names are on disk already, so a
    message's 250 waits for its file alone.
    """

    def setUp(self) -> None:
        ServerMixin.setUp(self)
        self.calls = []
        self.diskFull = False

        def recording(f, *args):
            self.calls.append((f.__name__, args[1:]))
            if self.diskFull and f.__name__ == "_makeSpoolFiles":
                return fail(OSError(errno.ENOSPC, "No space left on device"))
            return runNow(f, *args)

        self.factory = SubmissionFactory(
            self.portal, self.submission, hostname=b"test.p2pmta", clock=self.clock,
            runBlocking=recording, spoolAhead=4,
        )  # fmt: skip
        self.proto, self.transport = self.connect()
        self.login()

    def test_madeAheadAndTaken(self) -> None:
        """
        The first DATA has four files made (the folder flushed once), and
        takes one; later ones take the others, refilled in time; each is
        stored byte for byte and flushed without its folder; those not
        taken go when the server stops.
        """
        for n in range(6):
            lines = self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
            self.assertEqual(codes(lines), [250, 250, 354])
            if n == 0:
                self.assertEqual(self.calls, [("_makeSpoolFiles", (4,))])
                self.assertEqual(len(self.spoolNames()), 4)
            self.assertEqual(codes(self.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % n)), [250])
        self.assertEqual(
            [data.split(b"\r\n", 3)[3] for _, _, data in self.submission.accepted],
            [b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(6)],
        )
        flushes = [args for name, args in self.calls if name == "flushAndClose"]
        self.assertEqual(flushes, [(None, None)] * 6)
        # Refilled whenever half or fewer are left.
        self.assertEqual([args for name, args in self.calls if name == "_makeSpoolFiles"], [(4,), (2,), (2,)])
        self.assertEqual(len(self.spoolNames()), 2)
        self.factory.stopFactory()
        self.assertEqual(self.spoolNames(), [])

    def test_cannotMakeAhead(self) -> None:
        """
        When no file can be made ahead (a full disk, say), each DATA makes
        its own, and flushes its folder.
        """
        self.diskFull = True
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
        self.assertEqual(codes(self.send(b"hi\r\n.\r\n")), [250])
        self.assertEqual(
            self.calls, [("_makeSpoolFiles", (4,)), ("flushAndClose", (os.path.abspath(self.spool), None))]
        )
        self.assertEqual(self.spoolNames(), [])


class UncachedSpoolTests(ServerMixin, SynchronousTestCase):
    """
    A message is written into its spool file past the page cache
    (L{p2pmta.spool.openedForMessage}), made ahead of time or not.
    """

    def setUp(self) -> None:
        super().setUp()
        self.submission.maxMessageSize = 2_000_000
        self.cached = []
        accept = self.submission.accept

        def accepting(sender, recipients, path, flushing, check):
            # Before the fake reads the file back (which caches it).
            flushing.addCallback(lambda kept: self.cached.append(cachedPages(path)) or kept)
            return accept(sender, recipients, path, flushing, check)

        self.submission.accept = accepting
        self.login()

    def message(self, size: int) -> bytes:
        line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
        return b"Subject: big\r\n\r\n" + line * (size // len(line))

    def test_pastThePageCache(self) -> None:
        """
        Once flushed, a 600 KB message's spool file has at most its last
        page in the page cache, and it is stored byte for byte; its full
        blocks were written by the spool's writer thread.
        """
        requireDirect(self.spool)
        pwrite, writers = fileutil.os.pwrite, set()

        def recording(fd, data, offset):
            writers.add(threading.current_thread().name.split("_")[0])
            return pwrite(fd, data, offset)

        self.patch(fileutil.os, "pwrite", recording)
        message = self.message(600_000)
        lines = self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
        self.assertEqual(codes(lines), [250, 250, 354])
        self.assertEqual(codes(self.send(message + b".\r\n", chunk=65536)), [250])
        stored = self.submission.accepted[-1][2]
        self.assertEqual(stored.split(b"\r\n", 3)[3], message)
        self.assertLessEqual(len(self.cached[-1]), 1)
        # Full blocks by the spool's writer thread, the rest by the flush.
        self.assertEqual(writers, {"p2pmta-spool", threading.current_thread().name})
        self.assertEqual(self.cached[-1], [(len(stored) - 1) // mmap.PAGESIZE] if len(stored) % mmap.PAGESIZE else [])

    def test_diskFull(self) -> None:
        """
        A full disk met by a block written past the cache, or by the flush
        of what was staged, gets 452 4.3.1, leaves no spool file behind and
        spoils no later message.
        """
        pwrite = fileutil.os.pwrite
        self.full = False

        def writing(fd, data, offset):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return pwrite(fd, data, offset)

        self.patch(fileutil.os, "pwrite", writing)
        for size in (600_000, 1000):
            self.full = True
            lines = self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
            self.assertEqual(codes(lines), [250, 250, 354])
            self.assertEqual(self.send(self.message(size) + b".\r\n", chunk=65536)[-1][:9], b"452 4.3.1")
            self.assertEqual(self.spoolNames(), [])
            self.full = False
            self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
            self.assertEqual(codes(self.send(self.message(size) + b".\r\n")), [250])
            self.assertEqual(self.submission.accepted[-1][2].split(b"\r\n", 3)[3], self.message(size))


class SpoolEnvelopeTests(ServerMixin, SynchronousTestCase):
    """
    Where the pipeline asks for it, the spool file keeps its message's
    envelope, flushed with it: the ledger's record need not be flushed
    before the 250.
    """

    def setUp(self) -> None:
        super().setUp()
        if not keepsEnvelopes(self.spool):
            raise SkipTest("this file system keeps no extended attributes")
        self.login()

    def test_envelopeKept(self) -> None:
        """
        The envelope (sender, recipients once each, time, and the file's
        size and CRC-32) is on the file when the flush is done, and the
        flush says so.
        """
        self.submission.keepsEnvelopes = True
        self.clock.advance(12.5)
        lines = self.send(
            b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nRCPT TO:<dave@demo>\r\n"
            b"RCPT TO:<carol@demo>\r\nDATA\r\n"
        )
        self.assertEqual(codes(lines), [250, 250, 250, 250, 354])
        self.assertEqual(codes(self.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")), [250])
        [(_, _, data)] = self.submission.accepted
        self.assertEqual(
            self.submission.envelopes,
            [(True, Envelope("alice@demo", ("carol@demo", "dave@demo"), 12.5, len(data), zlib.crc32(data)))],
        )

    def test_notAsked(self) -> None:
        """A pipeline that does not ask for it gets no envelope."""
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
        self.assertEqual(codes(self.send(b"hi\r\n.\r\n")), [250])
        self.assertEqual(self.submission.envelopes, [(False, None)])

    def test_refused(self) -> None:
        """
        An envelope the file system refuses (a list of recipients too long
        for an attribute, say) does not stop the message: the flush says
        the file has none.
        """
        self.submission.keepsEnvelopes = True

        def setxattr(*args):
            raise OSError(errno.E2BIG, "Argument list too long")

        self.patch(os, "setxattr", setxattr)
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
        self.assertEqual(codes(self.send(b"hi\r\n.\r\n")), [250])
        self.assertEqual(self.submission.envelopes, [(False, None)])


    def test_decode(self) -> None:
        """
        An envelope decodes to what was encoded, in a few bytes; what is
        not one, as this version writes them, decodes to L{None}: an
        unrecorded file with it is not sent.
        """
        envelope = Envelope("alice@demo", ("carol@demo", "dave@demo"), 1.5, 10, 20)
        data = envelope.encode()
        self.assertEqual(Envelope.decode(data), envelope)
        self.assertEqual(len(data), 1 + 20 + len(b"alice@demo\ncarol@demo\ndave@demo"))
        bounce = Envelope("", ("carol@demo",), 1.5, 10, 20)
        self.assertEqual(Envelope.decode(bounce.encode()), bounce)
        for junk in (
            b"", b"\x01", data[:20], b"\x02" + data[1:],  # short, or another version
            data[:21],  # no recipient
            data[:21] + b"alice@demo",  # no recipient
            data + b"\n",  # an empty recipient
            data[:21] + b"\xff\n\xfe",  # not UTF-8
            Envelope("alice@demo", ("carol@demo",), float("nan"), 10, 20).encode(),
        ):
            self.assertIsNone(Envelope.decode(junk), junk)

    def test_findUnrecorded(self) -> None:
        """
        At start, the spool's files that no record names are looked at:
        only a message's own file, whole, with its envelope, is found.
        """

        def spooled(name: str, data: bytes, envelope: Envelope | None = None) -> str:
            path = os.path.join(self.spool, name)
            with open(path, "wb") as f:
                f.write(data)
                if envelope is not None:
                    os.setxattr(f.fileno(), ENVELOPE_ATTRIBUTE, envelope.encode())
            return os.path.abspath(path)

        def envelope(data: bytes, at: float) -> Envelope:
            return Envelope("alice@demo", ("carol@demo",), at, len(data), zlib.crc32(data))

        data = b"Subject: hi\r\n\r\nbody\r\n"
        later = spooled(TEMP_PREFIX + "later", data, envelope(data, 2.0))
        first = spooled(TEMP_PREFIX + "first", data, envelope(data, 1.0))
        recorded = spooled(TEMP_PREFIX + "recorded", data, envelope(data, 0.5))
        spooled(TEMP_PREFIX + "torn", data[:-1] + b"X", envelope(data, 0.5))
        spooled(TEMP_PREFIX + "bare", data)
        os.link(first, first + ".Sent")
        self.assertEqual(
            findUnrecorded(self.spool, [recorded]),
            [(first, envelope(data, 1.0)), (later, envelope(data, 2.0))],
        )
        self.assertEqual(findUnrecorded(self.spool + "-gone", []), [])


class DataModelTests(ServerMixin, SynchronousTestCase):
    """
    The data phase against a model, however the bytes are cut up.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        tokens=st.lists(
            st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\0", b"x" * 600]),
            max_size=40,
        ),
        chunk=st.integers(min_value=1, max_value=50),
    )
    def test_model(self, tokens, chunk) -> None:
        """
        Whole or in pieces, the data gets the model's reply and message,
        and only the first C{CRLF.CRLF} ends it.  (When a message breaks
        several rules, which one is reported may depend on the pieces.)
        """
        data = b"".join(tokens) + b"\r\n.\r\n"
        message, allowed = expectedData(data, 1500)
        replies = []
        for size in (0, 1, chunk):
            self.setUp()
            self.submission.maxMessageSize = 1500
            self.login()
            self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\nDATA\r\n")
            lines = self.send(data, chunk=size)
            self.assertIn(codes(lines)[0], allowed)
            stored = [entry[2].split(b"\r\n", 3)[3] for entry in self.submission.accepted]
            self.assertEqual(stored, [message] if message is not None else [])
            replies.append(lines[1:])
        self.assertEqual(replies[0], replies[1])
        self.assertEqual(replies[0], replies[2])


class PipeliningTests(ServerMixin, SynchronousTestCase):
    """
    Input is held while an asynchronous step is pending.
    """

    def test_wholeTransactionInOneWrite(self) -> None:
        """
        EHLO to QUIT in one write, with recipient checks pending: each
        command waits its turn, and nothing of the body runs as a command.
        """
        self.lines()
        self.submission.pending = True
        body = b"Subject: t\r\n\r\nRSET\r\nQUIT\r\nMAIL FROM:<alice@demo>\r\n"
        lines = self.send(
            LOGIN + b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n"
            b"RCPT TO:<dave@demo>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n"
        )
        self.assertEqual(codes(lines), [250, 235, 250])
        self.assertEqual(len(self.submission.checks), 1)
        self.submission.checks[0][1].callback(None)
        self.assertEqual(self.lines(), [b"250 2.1.5 Ok"])
        self.assertEqual(len(self.submission.checks), 2)
        self.assertFalse(self.transport.disconnecting)
        self.submission.checks[1][1].callback(None)
        self.assertEqual(self.lines(), [
            b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
            b"250 2.0.0 Ok: queued as id1", b"221 2.0.0 Bye"])
        [(sender, rcpts, data)] = self.submission.accepted
        self.assertEqual(rcpts, [Address.parse("carol@demo"), Address.parse("dave@demo")])
        self.assertTrue(data.endswith(b"\r\n" + body))

    def test_noTimeoutWhileHeld(self) -> None:
        """
        The idle timer does not run while the server, not the client, is
        slow.
        """
        self.login()
        self.submission.pending = True
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n")
        self.clock.advance(1000)
        self.assertFalse(self.transport.disconnecting)
        self.submission.checks[0][1].callback(None)
        self.assertEqual(codes(self.lines()), [250])
        self.clock.advance(300)
        self.assertTrue(self.transport.disconnecting)

    def test_backpressure(self) -> None:
        """
        While a step is pending, reading pauses once much input waits, and
        resumes when it is consumed.
        """
        self.login()
        self.submission.pending = True
        self.send(b"MAIL FROM:<alice@demo>\r\nRCPT TO:<carol@demo>\r\n")
        self.send(b"NOOP\r\n" * 20000)
        self.assertEqual(self.transport.producerState, "paused")
        self.submission.checks[0][1].callback(None)
        self.assertEqual(codes(self.lines()), [250] * 20001)
        self.assertEqual(self.transport.producerState, "producing")


class StartTLSTests(ServerMixin, SynchronousTestCase):
    """
    STARTTLS on a transport that can start TLS.
    """

    transportFactory = TLSStringTransport
    tlsOptions = object()

    def test_advertised(self) -> None:
        """
        STARTTLS is advertised until TLS is started.
        """
        self.lines()
        self.assertIn(b"250-STARTTLS", self.send(b"EHLO c\r\n"))
        self.send(b"STARTTLS\r\n")
        self.assertNotIn(b"250-STARTTLS", self.send(b"EHLO c\r\n"))
        self.assertEqual(codes(self.send(b"STARTTLS\r\n")), [503])

    def test_injectionDropped(self) -> None:
        """
        Commands sent in the same packet as STARTTLS are dropped, and what
        was said before TLS (EHLO, AUTH) is forgotten.
        """
        self.lines()
        self.login()
        lines = self.send(b"STARTTLS\r\nMAIL FROM:<alice@demo>\r\nNOOP\r\n")
        self.assertEqual(lines, [b"220 2.0.0 Ready to start TLS"])
        self.assertIs(self.transport.tlsStarted, self.tlsOptions)
        self.assertEqual(codes(self.send(b"MAIL FROM:<alice@demo>\r\nAUTH PLAIN\r\n")), [530, 503])
        self.assertEqual(codes(self.send(LOGIN + b"MAIL FROM:<alice@demo>\r\n")), [250, 235, 250])
        self.send(b"RCPT TO:<carol@demo>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertIn(b"with ESMTPSA;", self.submission.accepted[0][2])


class _Tracked(SubmissionServer):
    """
    A server that tells the test when its connection is gone.
    """

    def connectionLost(self, reason) -> None:
        SubmissionServer.connectionLost(self, reason)
        self.factory.lost.callback(None)


class TCPTests(TestCase):
    """
    The stdlib C{smtplib} against the server on 127.0.0.1.
    """

    def setUp(self) -> None:
        private = self.mktemp()
        os.makedirs(private, mode=0o700)
        self.spool = self.mktemp()
        os.makedirs(self.spool)
        self.submission = FakeSubmission(self.spool, maxMessageSize=100_000)
        portal = makePortal(reactor, ALICE, PASSWORD, {IMessageDelivery: Avatar})
        self.factory = SubmissionFactory(
            portal, self.submission, loadOrCreateCertificate(private, "localhost"),
            hostname="test.p2pmta",
        )
        self.factory.protocol = _Tracked
        self.factory.lost = Deferred()
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.portNumber = self.port.getHost().port

    @inlineCallbacks
    def session(self, f):
        """
        Run C{f(smtp)} in a thread with a client connected; wait for the
        server side to close.
        """
        def client():
            with smtplib.SMTP("127.0.0.1", self.portNumber, timeout=10) as s:
                return f(s)

        try:
            result = yield deferToThread(client)
        finally:
            yield self.factory.lost
        return result

    MESSAGE = (
        b"From: alice@demo\r\nTo: carol@demo\r\nSubject: hello\r\n\r\n"
        b".starts with a dot\r\n" + b"8bit \xc3\xa9t\xc3\xa9\r\n" * 3
    )

    @inlineCallbacks
    def test_send(self) -> None:
        """
        smtplib logs in with AUTH PLAIN and sends; the message arrives byte
        for byte, refused recipients aside.
        """
        def send(s):
            s.ehlo("client.example")
            self.assertTrue(s.has_extn("size"))
            s.login("alice@demo", PASSWORD)
            return s.sendmail("alice@demo", ["carol@demo", "bob@demo"], self.MESSAGE)

        refused = yield self.session(send)
        self.assertEqual(list(refused), ["bob@demo"])
        self.assertEqual(refused["bob@demo"][0], 550)
        [(sender, rcpts, data)] = self.submission.accepted
        self.assertEqual(rcpts, [Address.parse("carol@demo")])
        self.assertTrue(data.startswith(b"Received: from client.example ([127.0.0.1])\r\n"))
        self.assertIn(b"with ESMTPA;", data)
        self.assertTrue(data.endswith(b"\r\n" + self.MESSAGE))
        self.assertEqual(os.listdir(self.spool), [])

    @inlineCallbacks
    def test_authLogin(self) -> None:
        """
        AUTH LOGIN works with and without an initial response.
        """
        def login(s):
            s.ehlo()
            s.user, s.password = "alice@demo", PASSWORD
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            return code

        self.assertEqual((yield self.session(login)), 235)
        self.factory.lost = Deferred()

        def loginInitial(s):
            s.ehlo()
            s.user, s.password = "alice@demo", PASSWORD
            return s.auth("LOGIN", s.auth_login)[0]

        self.assertEqual((yield self.session(loginInitial)), 235)

    @inlineCallbacks
    def test_wrongPassword(self) -> None:
        """
        smtplib sees a wrong password as SMTPAuthenticationError 535.
        """
        def login(s):
            s.ehlo()
            with self.assertRaises(smtplib.SMTPAuthenticationError) as e:
                s.login("alice@demo", "guess")
            return e.exception.smtp_code

        self.assertEqual((yield self.session(login)), 535)

    @inlineCallbacks
    def test_tooBig(self) -> None:
        """
        smtplib sends SIZE=; a message over the limit is refused at MAIL.
        """
        def send(s):
            s.login("alice@demo", PASSWORD)
            with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("alice@demo", ["carol@demo"], b"x" * 100_001)
            return e.exception.smtp_code

        self.assertEqual((yield self.session(send)), 552)
        self.assertEqual(self.submission.accepted, [])

    @inlineCallbacks
    def test_startTLS(self) -> None:
        """
        smtplib starts TLS, then logs in and sends.
        """
        def send(s):
            s.ehlo()
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo()
            self.assertFalse(s.has_extn("starttls"))
            s.login("alice@demo", PASSWORD)
            return s.sendmail("alice@demo", ["carol@demo"], self.MESSAGE)

        self.assertEqual((yield self.session(send)), {})
        [(sender, rcpts, data)] = self.submission.accepted
        self.assertIn(b"with ESMTPSA;", data)
        self.assertTrue(data.endswith(b"\r\n" + self.MESSAGE))

    @inlineCallbacks
    def test_startTLSInjection(self) -> None:
        """
        A command sent in the same packet as STARTTLS is not run inside TLS.
        """
        def inject():
            with socket.create_connection(("127.0.0.1", self.portNumber), 10) as raw:
                f = raw.makefile("rb")
                f.readline()
                raw.sendall(b"EHLO c\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                raw.sendall(b"STARTTLS\r\nNOOP\r\n")
                self.assertEqual(f.readline(), b"220 2.0.0 Ready to start TLS\r\n")
                context = ssl._create_unverified_context()
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"QUIT\r\n")
                    received = b""
                    while True:
                        chunk = tls.recv(1000)
                        if not chunk:
                            return received
                        received += chunk

        received = yield deferToThread(inject)
        yield self.factory.lost
        self.assertEqual(received, b"221 2.0.0 Bye\r\n")
