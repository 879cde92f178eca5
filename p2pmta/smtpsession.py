# -*- test-case-name: tests.test_smtp -*-
"""
One session of the ESMTP submission server for the peer's local user: a
thin adapter from the wire to L{p2pmta.interfaces.ISubmission}.

It reuses L{twisted.mail.smtp.ESMTP}'s replies, TLS check and timeout, but
reads the connection itself, the stock server being unsafe here (TRAPS.md):
input is held while an asynchronous step (AUTH, a DHT look-up, the hand-over
of a message) is pending, so pipelined commands run in order; the message is
read by a byte-level scanner (L{p2pmta.smtpdata}) for which only
C{CRLF . CRLF} ends the data, and a refused message (a line over 1000
octets: RFC 5321, clients wrap or encode; a bare CR or LF; a NUL; too large)
is swallowed up to it, so nothing of a body runs as a command; input sent
with STARTTLS is dropped.  Messages stream to a temporary file in the spool
(L{p2pmta.spool}); the C{fsync} runs in a thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import os
import re
from typing import TYPE_CHECKING

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.mail.imap4 import IllegalClientResponse, PLAINCredentials
from twisted.mail.smtp import ESMTP, IMessageDelivery, LOGINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pmta.address import Address
from p2pmta.errors import BadAddress, CryptoError, UnknownPeer
from p2pmta.fileutil import removeIfThere
from p2pmta.smtpdata import DataReader
from p2pmta.spool import NO_SPACE, Envelope, closeQuietly, flushAndClose

if TYPE_CHECKING:
    from p2pmta.smtp import SubmissionFactory

_UTC = datetime.timezone.utc

_COMMAND, _DATA, _AUTH = "COMMAND", "DATA", "AUTH"
_PATH = rb"(<[^<>\s]*>|[^<>\s]+)"
_MAIL = re.compile(rb"FROM:\s*" + _PATH + rb"(?:\s+(.*))?", re.I | re.S)
_RCPT = re.compile(rb"TO:\s*" + _PATH + rb"(?:\s+(.*))?", re.I | re.S)
_DOMAIN = re.compile(rb"[\x21-\x7e]{1,255}")
_MECHANISMS = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
_COMMANDS = frozenset(
    b"EHLO HELO AUTH STARTTLS MAIL RCPT DATA RSET NOOP VRFY HELP QUIT".split()
)


class SubmissionServer(ESMTP):
    """
    One submission session: AUTH (PLAIN, LOGIN) through the portal, then
    mail from the authenticated user only, to recipients the submission
    pipeline can reach.

    What a message may hold: any octet but NUL, in lines of at most
    L{maxLineLength} octets ending in CRLF, a header section of at most
    L{maxHeaderSize} octets, the whole at most the submission's
    C{maxMessageSize}.  Within those limits a message is stored byte for
    byte (dot-unstuffed, under a C{Received} header) and its structure is
    not looked at: a folded header, a header line that only looks like a
    CRLF injection, 10,000 header fields, deeply nested or many MIME parts
    are the client's business.  Otherwise, after the final dot:
      - a longer line: C{500 5.5.2};
      - a bare CR or LF, also in a header value: C{550 5.5.2} (as Postfix's
        C{smtpd_forbid_bare_newline}; normalising would change what the
        user signed or hashed);
      - a NUL: C{550 5.6.0};
      - too large, or a header section too large: C{552 5.3.4};
      - the spool's file system full: C{452 4.3.1}, other spool errors
        C{451 4.3.0}.
    Past L{maxRecipients} accepted recipients RCPT gets C{452 4.5.3} (RFC
    5321, 4.5.3.1.10); the message goes to those accepted.

    @ivar timeout: Seconds of client silence before the session is closed
        (the factory's C{timeout}).
    @ivar maxRecipients: The most recipients of one message.
    @ivar maxLineLength: The longest line of a message, CRLF included.
    @ivar maxHeaderSize: The largest header section of a message, in bytes.
    @ivar maxAuthFailures: Failed AUTH attempts before the session is closed.
    @ivar abortTimeout: Seconds a closing connection may take to send
        its last replies (a client that does not read) before it is aborted.
    @ivar holdLimit: Unread input, in bytes, past which reading from the
        connection pauses while an asynchronous step is pending.
    """

    log = Logger()
    timeout = 300
    maxRecipients = 1000
    maxLineLength = 1000
    maxHeaderSize = 256 * 1024
    maxAuthFailures = 3
    abortTimeout = 30
    holdLimit = 64 * 1024
    MAX_LENGTH = 16384

    def __init__(self, factory: SubmissionFactory) -> None:
        ESMTP.__init__(self, contextFactory=factory.tlsOptions)
        self.factory = factory
        self.portal = factory.portal
        self.host = factory.domain
        self.callLater = factory.clock.callLater
        self._submission = factory.submission
        self._buffer = bytearray()
        self._waiting: Deferred | None = None
        self._draining = False
        self._paused = False
        self._writesBlocked = False
        self._backpressure: _Backpressure | None = None
        self._abortCall = None
        self._lost = False
        self._skipLine = False
        self._authFailures = 0
        self._data: DataReader | None = None
        self.timeout = factory.timeout
        self._resetSession()

    # Session state

    def _resetSession(self) -> None:
        """
        Forget everything the client said: at the start and after STARTTLS.
        """
        self._greeting: bytes | None = None
        self._user: Address | None = None
        self.authenticated = False
        self._logout()
        self._resetTransaction()

    def _resetTransaction(self) -> None:
        self._sender: Address | None = None
        self._recipients: dict[Address, None] = {}

    def _logout(self) -> None:
        logout, self._onLogout = self._onLogout, None
        if logout is not None:
            logout()

    def connectionMade(self) -> None:
        self.factory.opened(self)
        # Stop reading from a client that does not read its replies.
        self._backpressure = _Backpressure(self)
        self.transport.registerProducer(self._backpressure, True)
        ESMTP.connectionMade(self)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self.factory.closed(self)
        self.setTimeout(None)
        if self._abortCall is not None:
            self._abortCall.cancel()
            self._abortCall = None
        if self._data is not None:
            self._data.discard()
        self._logout()

    def evict(self) -> None:
        """
        Close this session (not logged in yet) for a newcomer: the server
        is full.
        """
        self.sendCode(
            421, b"4.7.0 " + self.host + b" Too many connections, closing this one"
        )
        self._close()

    def _close(self) -> None:
        """
        Close the connection once the replies are sent; abort it if they
        are still not taken after L{abortTimeout} seconds.
        """
        if self._backpressure is not None:
            # A transport waits for its producer to go before it closes.
            self._backpressure = None
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._abortCall is None and not self._lost:
            self._abortCall = self.callLater(self.abortTimeout, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        self.transport.abortConnection()

    def _blockWrites(self, blocked: bool) -> None:
        """
        The transport's write buffer is full (or no longer): read on only
        when the client takes its replies.
        """
        self._writesBlocked = blocked
        self._readOrPause()

    def timeoutConnection(self) -> None:
        self.sendCode(421, b"4.4.2 " + self.host + b" Idle timeout, closing connection")
        self._close()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP p2pmta"

    def reply(self, code: int, text: str | bytes) -> None:
        """
        Send one reply; C{text} starts with its enhanced status code.
        """
        if isinstance(text, str):
            text = text.encode("ascii", "replace")
        self.sendCode(code, text)

    # Reading: one step at a time

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        """
        Run what is buffered, until the buffer runs dry or a step is pending.
        """
        if self._draining:
            return
        self._draining = True
        try:
            while self._waiting is None and not self._lost and self._buffer:
                if self.transport.disconnecting:
                    del self._buffer[:]
                    break
                if self.mode == _DATA:
                    if not self._data.scan(self._buffer):
                        break
                    self._endOfData()
                elif not self._nextLine():
                    break
        finally:
            self._draining = False
        self._readOrPause()

    def _readOrPause(self) -> None:
        """
        Read from the connection unless the client's replies are not taken,
        or much input waits behind a pending step.
        """
        if self._lost or self.transport.disconnecting:
            return
        pause = self._writesBlocked or (
            self._waiting is not None and len(self._buffer) > self.holdLimit
        )
        if pause != self._paused:
            self._paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _hold(self, d: Deferred) -> None:
        """
        Read nothing more until C{d} (which sends its own reply) fires.
        """
        self._waiting = d
        self.setTimeout(None)

        def release(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("unexpected submission error", result)
                self.reply(451, "4.3.0 Local error in processing")
            self._waiting = None
            if not self._lost:
                self.setTimeout(self.timeout)
                self._drain()

        d.addBoth(release)

    def _nextLine(self) -> bool:
        """
        Run one command (or AUTH response) line, if a whole one is buffered.
        """
        end = self._buffer.find(b"\r\n")
        if end < 0:
            cr = self._buffer.endswith(b"\r")
            if len(self._buffer) - cr > self.MAX_LENGTH:
                self._skipLine = True
                self._buffer[:] = b"\r" if cr else b""
            return False
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        if self._skipLine or end > self.MAX_LENGTH:
            self._skipLine = False
            if self.mode == _AUTH:
                self.mode = _COMMAND
            self.reply(500, "5.5.2 Line too long")
        elif self.mode == _AUTH:
            self._authResponse(line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        if re.search(rb"[\x00\r\n]", line):
            self.reply(500, "5.5.2 Invalid character in command")
            return
        parts = line.strip().split(None, 1)
        if not parts:
            self.reply(500, "5.5.2 Error: bad syntax")
            return
        name = parts[0].upper()
        if name not in _COMMANDS:
            self.reply(500, "5.5.2 Command not recognized")
            return
        if name in (b"MAIL", b"RCPT", b"DATA") and self._user is None:
            self.reply(530, "5.7.0 Authentication required")
            return
        getattr(self, "do_" + name.decode("ascii"))(parts[1] if len(parts) > 1 else b"")

    # Commands

    def do_EHLO(self, rest: bytes) -> None:
        if not self._greet(rest):
            return
        lines = [
            self.host + b" Hello " + self._peerHost(),
            b"SIZE %d" % (self._submission.maxMessageSize,),
            b"8BITMIME",
            b"PIPELINING",
            b"ENHANCEDSTATUSCODES",
            b"AUTH " + b" ".join(_MECHANISMS),
        ]
        if self.canStartTLS and not self.startedTLS:
            lines.append(b"STARTTLS")
        lines.append(b"HELP")
        self.sendCode(250, b"\n".join(lines))

    def do_HELO(self, rest: bytes) -> None:
        if self._greet(rest):
            self.reply(250, self.host)

    def _greet(self, rest: bytes) -> bool:
        name = rest.strip()
        if not _DOMAIN.fullmatch(name):
            self.reply(501, "5.5.4 Syntax: EHLO hostname")
            return False
        self._greeting = name
        self._resetTransaction()
        return True

    def do_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            self.reply(503, "5.5.1 TLS already active")
        elif not self.canStartTLS:
            self.reply(454, "4.7.0 TLS not available")
        elif rest.strip():
            self.reply(501, "5.5.4 Syntax: STARTTLS")
        else:
            self.reply(220, "2.0.0 Ready to start TLS")
            # Anything sent with STARTTLS was sent in the clear: drop it
            # rather than run it inside TLS (command injection).
            del self._buffer[:]
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            self._resetSession()

    def do_AUTH(self, rest: bytes) -> None:
        parts = rest.split(None, 1)
        if self._greeting is None:
            self.reply(503, "5.5.1 Send EHLO first")
        elif self._user is not None:
            self.reply(503, "5.5.1 Already authenticated")
        elif self._sender is not None:
            self.reply(503, "5.5.1 AUTH not permitted during a mail transaction")
        elif not parts:
            self.reply(501, "5.5.4 Syntax: AUTH mechanism")
        elif parts[0].upper() not in _MECHANISMS:
            self.reply(504, "5.5.4 Unrecognized authentication type")
        else:
            self.challenger = _MECHANISMS[parts[0].upper()]()
            self.mode = _AUTH
            if len(parts) == 1:
                self._challenge()
            else:
                # An initial response answers the first challenge.
                self.challenger.getChallenge()
                self._authResponse(b"" if parts[1] == b"=" else parts[1])

    def _challenge(self) -> None:
        self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))

    def _authResponse(self, line: bytes) -> None:
        self.mode = _COMMAND
        if line == b"*":
            self.reply(501, "5.7.0 Authentication aborted")
            return
        try:
            self.challenger.setResponse(base64.b64decode(line, validate=True))
        except (binascii.Error, IllegalClientResponse):
            self.reply(501, "5.5.2 Cannot decode response")
            return
        if self.challenger.moreChallenges():
            self.mode = _AUTH
            self._challenge()
            return
        credentials, self.challenger = self.challenger, None
        d = self.portal.login(credentials, None, IMessageDelivery)
        d.addCallbacks(self._authenticated, self._authFailed, (credentials.username,))
        self._hold(d)

    def _authenticated(self, result: tuple, username: bytes) -> None:
        _, _, self._onLogout = result
        if self._lost:
            self._logout()
            return
        self._user = Address.parse(username)
        self.authenticated = True
        self.log.info("{user} logged in", user=str(self._user))
        self.reply(235, "2.7.0 Authentication successful")

    def _authFailed(self, reason: Failure) -> None:
        if not reason.check(UnauthorizedLogin):
            self.log.failure("SMTP login error", reason)
            self.reply(454, "4.7.0 Temporary authentication failure")
            return
        self._authFailures += 1
        if self._authFailures >= self.maxAuthFailures:
            self.reply(421, "4.7.0 Too many failed authentication attempts")
            self._close()
        else:
            self.reply(535, "5.7.8 Authentication credentials invalid")

    def do_MAIL(self, rest: bytes) -> None:
        if self._sender is not None:
            self.reply(503, "5.5.1 Error: nested MAIL command")
            return
        m = _MAIL.fullmatch(rest)
        if m is None:
            self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender = Address.parse(m.group(1))
        except BadAddress:
            sender = None
        if sender != self._user:
            self.reply(553, f"5.7.1 Sender address rejected: not owned by {self._user}")
            return
        for param in (m.group(2) or b"").split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                # RFC 1870: 1*20DIGIT (and int() refuses over 4300 digits).
                if not value.isdigit() or len(value) > 20:
                    self.reply(501, "5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self._submission.maxMessageSize:
                    self.reply(
                        552, "5.3.4 Message size exceeds fixed maximum message size"
                    )
                    return
            elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            elif key != b"AUTH":
                self.reply(555, "5.5.4 Unsupported MAIL parameter")
                return
        self._sender = sender
        self._recipients = {}
        self.reply(250, "2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        if self._sender is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return
        m = _RCPT.fullmatch(rest)
        if m is None:
            self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        if m.group(2):
            self.reply(555, "5.5.4 Unsupported RCPT parameter")
            return
        try:
            recipient = Address.parse(m.group(1))
        except BadAddress:
            self.reply(501, "5.1.3 Bad recipient address syntax")
            return
        if recipient in self._recipients:
            self.reply(250, "2.1.5 Ok")
        elif len(self._recipients) >= self.maxRecipients:
            self.reply(452, "4.5.3 Error: too many recipients")
        else:
            d = maybeDeferred(self._submission.checkRecipient, recipient)
            d.addCallbacks(
                self._recipientOk,
                self._recipientFailed,
                (recipient,),
                None,
                (recipient,),
            )
            self._hold(d)

    def _recipientOk(self, _: object, recipient: Address) -> None:
        self._recipients[recipient] = None
        self.reply(250, "2.1.5 Ok")

    def _recipientFailed(self, reason: Failure, recipient: Address) -> None:
        if reason.check(UnknownPeer):
            why = "no live p2pmta peer (no descriptor in the DHT)"
        elif reason.check(CryptoError):
            why = "no usable OpenPGP key for that peer"
        else:
            self.log.failure("checking recipient {rcpt}", reason, rcpt=str(recipient))
            self.reply(
                451, f"4.4.3 {recipient}: recipient look-up failed, try again later"
            )
            return
        self.log.info("refused recipient {rcpt}: {why}", rcpt=str(recipient), why=why)
        self.reply(550, f"5.1.1 {recipient}: {why}")

    def do_DATA(self, rest: bytes) -> None:
        if self._sender is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return
        if not self._recipients:
            self.reply(554, "5.5.1 Error: no valid recipients")
            return
        data = DataReader(
            self.factory.openSpoolFile,
            self._receivedHeader(),
            self._submission.maxMessageSize,
            self.maxLineLength,
            self.maxHeaderSize,
            self.log,
        )
        if data.error is not None:
            self.reply(*data.error)
            return
        self._data = data
        self.mode = _DATA
        self.reply(354, "End data with <CR><LF>.<CR><LF>")

    def do_RSET(self, rest: bytes) -> None:
        self._resetTransaction()
        self.reply(250, "2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.2 Cannot VRFY user, but will try to deliver")

    def do_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0 Commands: " + b" ".join(sorted(_COMMANDS)).decode())

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0 Bye")
        self._close()

    # The message

    def _receivedHeader(self) -> bytes:
        """
        The trace header put on top of the message (RFC 5321, 4.4): no
        C{for} clause, which would show Bcc recipients.
        """
        when = datetime.datetime.fromtimestamp(self.factory.clock.seconds(), _UTC)
        return b"Received: from %s ([%s])\r\n\tby %s (p2pmta) with %s;\r\n\t%s\r\n" % (
            self._greeting or b"unknown",
            self._peerHost(),
            self.host,
            b"ESMTPSA" if self.startedTLS else b"ESMTPA",
            email.utils.format_datetime(when).encode("ascii"),
        )

    def _peerHost(self) -> bytes:
        host = getattr(self.transport.getPeer(), "host", "unknown")
        return str(host).encode("ascii", "replace")

    def _endOfData(self) -> None:
        self.mode = _COMMAND
        sender, recipients = self._sender, self._recipients
        self._resetTransaction()
        data, self._data = self._data, None
        if data.error is not None:
            self.reply(*data.error)
            return
        self._hold(
            Deferred.fromCoroutine(
                self._deliver(data, sender, list(recipients))
            )
        )

    async def _deliver(self, data: DataReader, sender: Address, recipients: list) -> None:
        """
        Flush the message to disk while handing it to the submission
        pipeline; answer 250 only once both are done.
        """
        f, path, size = data.file, data.path, data.size
        # A file made ahead of time has its name on disk already.
        directory = None if data.named else os.path.dirname(path)
        envelope = None
        if self._submission.keepsEnvelopes:
            envelope = Envelope(
                str(sender),
                tuple(dict.fromkeys(str(r) for r in recipients)),
                self.factory.clock.seconds(),
                data.written,
                data.crc,
            )
        flushing = self.factory.runBlocking(flushAndClose, f, directory, envelope)
        try:
            messageId = await self._submission.accept(sender, recipients, path, flushing, (data.written, data.crc))
        except Exception as e:
            try:
                await flushing  # the file is ours again once it is closed
            except Exception:
                pass
            closeQuietly(f)
            removeIfThere(path)
            if isinstance(e, OSError) and e.errno in NO_SPACE:
                self.log.warn(
                    "message from {sender} not accepted: {error}",
                    sender=str(sender),
                    error=str(e),
                )
                self.reply(452, "4.3.1 Insufficient system storage")
            else:
                self.log.failure(
                    "message from {sender} not accepted", sender=str(sender)
                )
                self.reply(451, "4.3.0 Error: queue file write error, try again later")
            return
        self.reply(250, f"2.0.0 Ok: queued as {messageId}")
        # Logged on the next turn, once the 250 is written: a log line
        # costs about as much as the rest of this turn.
        self.callLater(
            0,
            self.log.info,
            "accepted {id} from {sender} for {n} recipients, {size} bytes",
            id=messageId,
            sender=str(sender),
            n=len(recipients),
            size=size,
        )


@implementer(IPushProducer)
class _Backpressure:
    """
    Told by a session's transport when its write buffer fills and drains.
    """

    def __init__(self, session: SubmissionServer) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session._blockWrites(True)

    def resumeProducing(self) -> None:
        self._session._blockWrites(False)

    def stopProducing(self) -> None:
        pass

