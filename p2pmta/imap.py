# -*- test-case-name: tests.test_imap -*-
"""
The IMAP4rev1 server the mail client reads the peer's mail with (paper,
section 4.3, steps 8 and 9), over a L{p2pmta.mailstore.MailStore}.

Twisted's C{IMAP4Server} carries the traps listed in C{TRAPS.md}; this
protocol keeps Twisted's interfaces (the avatar is an
L{twisted.mail.imap4.IAccount}, mailboxes provide C{IMailboxInfo} and
C{ISearchableMailbox}) and Twisted's cred, but reads and answers commands
itself:

  - one command at a time, in order: pipelined commands wait their turn;
  - lines up to 64 KiB; anything malformed or too long gets one tagged BAD
    and the session goes on; literals are bounded, APPEND's by
    C{maxMessageSize} (advertised as C{APPENDLIMIT}): a synchronizing
    literal over the limit gets C{NO [TOOBIG]} (C{BAD [TOOBIG]} outside
    APPEND) before it is read, a non-synchronizing one the same answer,
    then its bytes and the rest of its command are read and dropped (up to
    L{MAX_SKIP}; past that, C{BYE} and the connection is closed).  A
    literal of a command that cannot run in the session's state (or is
    unknown) gets BAD at once, without a continuation;
  - the session is its transport's push producer: when the client does not
    read its answers, it stops answering and reading until the client
    catches up, so what waits on either side is bounded;
  - sequence sets are resolved against the messages held, never
    materialised; SEARCH is bounded (see L{p2pmta.imapsearch});
  - a full disk fails the command with C{NO [OVERQUOTA] Not enough disk
    space} (RFC 5530's code, as Dovecot answers it); nothing stored before
    is touched and the same command works once there is room;
  - each session has its own sequence-number view: other sessions'
    expunges are announced only where RFC 3501 section 7.4.1 allows (not
    after FETCH, STORE, SEARCH or COPY by sequence number), and until then
    the session's numbers still name the messages they named;
  - a FETCH that needs a body first asks the store for it, which may pull
    it from its sender; if that fails the FETCH ends C{NO [UNAVAILABLE]}.
    Header items never do.  Sections are cut from stored bytes and streamed.
    SEARCH never pulls: C{TEXT} and C{BODY} look only at the headers of a
    message not pulled yet, and an untagged C{NO} says how many.

Not implemented: CREATE, DELETE and RENAME (the mailboxes are fixed), the
\\Recent flag (RECENT is always 0), LITERAL+ (small non-synchronizing
literals are read all the same), MOVE, CONDSTORE.
"""

from __future__ import annotations

import base64
import re

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.mail.imap4 import (
    IAccount,
    IMailboxInfo,
    INamespacePresenter,
    MailboxException,
)
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pmta import imapfetch, imapsearch
from p2pmta.errors import BodyUnavailable
from p2pmta.imapsearch import Args, BadCommand, SelectedMailbox, TooComplex
from p2pmta.mailstore import DiskFull, NoSuchMailbox, splitHeaders

#: The longest command line accepted (without its CRLF).
MAX_LINE = 64 * 1024
#: The most bytes one command (other than APPEND's message) may take.
MAX_COMMAND = 256 * 1024
#: The default largest message APPEND accepts.
MAX_MESSAGE_SIZE = 50 * 1024 * 1024
#: About how many bytes of bodies one FETCH holds at a time: it answers in
#: windows of messages this big together (one at least), the next
#: window's bodies had while one is sent.  The bodies of a window are all
#: asked for at once: the receiver pulls small ones in batches, and bounds
#: how many requests it makes at a time (see L{p2pmta.receiving}).
BODY_WINDOW = 16 * 1024 * 1024
#: The most messages in one window.
BODY_WINDOW_MESSAGES = 256
#: The largest header section APPEND accepts (the mail store keeps header
#: sections in memory).
MAX_APPEND_HEADER = 256 * 1024
#: The most bytes of a refused non-synchronizing literal read and dropped;
#: past this the connection is closed instead.
MAX_SKIP = 256 * 1024 * 1024

_LITERAL = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+")
_COMMAND = re.compile(rb"[^ ]+ +(?:UID +)?([A-Za-z]+)")
_STORE_ITEM = re.compile(rb"([+-]?)FLAGS(\.SILENT)?", re.IGNORECASE)
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
#: The states each command is allowed in.
_STATES = {
    name: states
    for names, states in (
        (b"CAPABILITY NOOP LOGOUT", ("unauth", "auth", "selected")),
        (b"STARTTLS LOGIN AUTHENTICATE", ("unauth",)),
        (b"SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE", ("auth", "selected")),
        (b"UNSUBSCRIBE LIST LSUB STATUS APPEND NAMESPACE IDLE", ("auth", "selected")),
        (b"CHECK CLOSE UNSELECT EXPUNGE SEARCH FETCH STORE COPY", ("selected",)),
    )
    for name in names.split()
}
_UID_COMMANDS = (b"FETCH", b"STORE", b"COPY", b"SEARCH", b"EXPUNGE")
#: Commands by sequence number, after which no EXPUNGE may be sent.
_BY_SEQUENCE = (b"FETCH", b"STORE", b"SEARCH", b"COPY")


class _No(Exception):
    """
    Answer the command C{NO}, with this text.
    """


def mailboxName(name: str) -> bytes:
    return imapfetch.quote(name.encode("imap4-utf-7"))


@implementer(IMailboxInfo)
class MailboxInfo:
    """
    What LIST shows of a mailbox: C{attributes} are mailbox attributes
    (e.g. C{\\Sent}), never message flags.
    """

    def __init__(self, name: str, attributes) -> None:
        self.name = name
        self.attributes = ["\\HasNoChildren", *attributes]

    def getFlags(self) -> list:
        return list(imapsearch.SYSTEM_FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"


@implementer(IAccount, INamespacePresenter)
class Account:
    """
    The IMAP avatar of the peer's one user: the store's fixed mailboxes.
    """

    def __init__(self, store) -> None:
        self.store = store

    def listMailboxes(self, ref, wildcard) -> list:
        ref = ref.decode("imap4-utf-7") if isinstance(ref, bytes) else ref
        wildcard = (
            wildcard.decode("imap4-utf-7") if isinstance(wildcard, bytes) else wildcard
        )
        pattern = "".join(
            ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c)
            for c in ref + wildcard
        )
        found = []
        for name, attributes in self.store.mailboxNames():
            flags = re.IGNORECASE if name == "INBOX" else 0
            if re.fullmatch(pattern, name, flags):
                found.append((name, MailboxInfo(name, attributes)))
        return found

    def select(self, name, rw=True):
        name = name.decode("imap4-utf-7") if isinstance(name, bytes) else name
        try:
            self.store.uidValidity(name)
        except NoSuchMailbox:
            return None
        return SelectedMailbox(
            self.store, "INBOX" if name.upper() == "INBOX" else name, rw
        )

    def _fixed(self, *args, **kwargs):
        raise MailboxException("this server's mailboxes are fixed")

    addMailbox = create = delete = rename = _fixed

    def isSubscribed(self, name) -> bool:
        return True

    def subscribe(self, name) -> bool:
        return True

    def unsubscribe(self, name) -> bool:
        return True

    def getPersonalNamespaces(self):
        return [["", "/"]]

    def getSharedNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None


def makeAccount(store) -> Account:
    """
    The IMAP avatar factory for the cred realm:
    C{{IAccount: lambda: makeAccount(store)}}.
    """
    return Account(store)


class IMAPServer(protocol.Protocol, policies.TimeoutMixin):
    """
    One IMAP session.  L{IMAPFactory} builds it.
    """

    log = Logger()
    preAuthTimeout = 60
    postAuthTimeout = 31 * 60

    def __init__(self) -> None:
        self.state = "unauth"
        self.account = None
        self.store = None
        self.selected: SelectedMailbox | None = None
        self._avatarLogout = None
        self._buffer = bytearray()
        self._parts: list = []
        self._commandBytes = 0
        self._literalLeft = 0
        self._literalChunks: list = []
        self._skipLeft = 0
        self._skipping = False
        self._append = False
        self._discarding: bytes | None = None
        self._busy = False
        self._draining = False
        self._inputFull = False
        self._outputFull = False
        self._reading = True
        self._producing = False
        self._sender = None
        self._closed = False
        self._closing = False
        self._lineWaiter: Deferred | None = None
        self._idling = False
        self._tls = False
        self._tag = b"*"

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater
        noDelay = getattr(self.transport, "setTcpNoDelay", None)
        if noDelay is not None:
            # A tagged reply sent after the data it ends must not wait for
            # the client's delayed ACK (Nagle): that costs 40 ms a command.
            noDelay(True)
        self.setTimeout(self.preAuthTimeout)
        self.transport.registerProducer(self, True)
        self._producing = True
        self._send(
            b"* OK [CAPABILITY " + self.capabilities() + b"] p2pmta IMAP4rev1 ready"
        )

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        if self._sender is not None:
            self._sender.stop()
        self._deselect()
        if self._lineWaiter is not None:
            waiter, self._lineWaiter = self._lineWaiter, None
            waiter.errback(reason)
        if self._avatarLogout is not None:
            logout, self._avatarLogout = self._avatarLogout, None
            logout()

    def timeoutConnection(self) -> None:
        self._send(b"* BYE Autologout; idle for too long")
        self._close()

    def _close(self) -> None:
        """
        Close the connection once what was written is sent; read nothing
        more.
        """
        self._closing = True
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- flow control: the session is its transport's push producer ----------

    def pauseProducing(self) -> None:
        """
        The client does not read as fast as we answer: stop answering, and
        reading, until it catches up (what waits is bounded).
        """
        self._outputFull = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._outputFull = False
        self._updateReading()
        if self._sender is not None:
            self._sender.resume()
        else:
            self._drain()

    def stopProducing(self) -> None:
        self._closed = True
        if self._sender is not None:
            self._sender.stop()

    def _updateReading(self) -> None:
        reading = not (self._inputFull or self._outputFull)
        if reading != self._reading and not (self._closed or self._closing):
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _send(self, line: bytes) -> None:
        if not self._closed:
            self.transport.write(line + b"\r\n")

    def capabilities(self) -> bytes:
        caps = b"IMAP4rev1 IDLE UIDPLUS SPECIAL-USE NAMESPACE UNSELECT".split()
        if self.factory.tlsOptions is not None and not self._tls:
            caps.append(b"STARTTLS")
        caps.append(b"AUTH=PLAIN")
        if self.state != "unauth":
            caps.append(b"APPENDLIMIT=%d" % self.factory.maxMessageSize)
        return b" ".join(caps)

    # -- reading commands ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            self._drainLoop()
        finally:
            self._draining = False
        if self._inputFull and len(self._buffer) < MAX_COMMAND:
            self._inputFull = False
            self._updateReading()

    def _drainLoop(self) -> None:
        buf = self._buffer
        while buf and not self._closed and not self._closing:
            if self._outputFull:
                return
            if self._skipLeft:
                skipped = min(self._skipLeft, len(buf))
                del buf[:skipped]
                self._skipLeft -= skipped
                continue
            if self._literalLeft:
                chunk = bytes(buf[: self._literalLeft])
                del buf[: len(chunk)]
                self._literalChunks.append(chunk)
                self._literalLeft -= len(chunk)
                if not self._literalLeft:
                    self._parts.append(
                        imapsearch.Literal(b"".join(self._literalChunks))
                    )
                    self._literalChunks = []
                continue
            if self._busy and self._lineWaiter is None:
                if len(buf) > MAX_COMMAND and not self._inputFull:
                    self._inputFull = True
                    self._updateReading()
                return
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_LINE + 1:
                    if self._discarding is None:
                        self._discarding = (
                            bytes(buf[:200])
                            if not self._parts
                            else self._parts[0][:200]
                        )
                    del buf[:]
                return
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[: end + 1]
            if self._discarding is not None or len(line) > MAX_LINE:
                head = self._discarding or (self._parts[0] if self._parts else line)
                self._discarding = None
                self._reset()
                if self._skipping:
                    # The end of a command already answered.
                    self._skipping = False
                elif self._lineWaiter is not None:
                    waiter, self._lineWaiter = self._lineWaiter, None
                    waiter.errback(BadCommand("line too long"))
                else:
                    self._send(_tagOf(head) + b" BAD Command line too long")
                continue
            if self._lineWaiter is not None:
                waiter, self._lineWaiter = self._lineWaiter, None
                waiter.callback(line)
                continue
            if self._skipping:
                self._skipLine(line)
                continue
            self._lineReceived(line)

    def _reset(self) -> None:
        self._parts = []
        self._commandBytes = 0

    def _lineReceived(self, line: bytes) -> None:
        if not self._parts:
            command = _COMMAND.match(line)
            self._append = (
                command is not None
                and command.group(1).upper() == b"APPEND"
                and self.state != "unauth"
            )
        limit = MAX_COMMAND + (self.factory.maxMessageSize if self._append else 0)
        self._commandBytes += len(line)
        m = _LITERAL.search(line)
        if m is None:
            parts, tooLong = [*self._parts, line], self._commandBytes > limit
            self._reset()
            if tooLong:
                self._send(_tagOf(parts[0]) + b" BAD Command too long")
            else:
                self._execute(parts)
            return
        first = not self._parts
        self._parts.append(line[: m.start()])
        size, sync = int(m.group(1)), not m.group(2)
        self._commandBytes += size
        refusal = self._refusal(line) if first else None
        if refusal is not None:
            # No literal for a command that cannot run now.
            self._reset()
            self._send(_tagOf(line) + b" BAD " + refusal)
            if not sync:
                self._skip(size)
            return
        if self._commandBytes > limit or (self._append and size > limit - MAX_COMMAND):
            tag = _tagOf(self._parts[0])
            self._reset()
            if self._append:
                self._send(
                    tag
                    + b" NO [TOOBIG] Message too large (APPENDLIMIT=%d)"
                    % self.factory.maxMessageSize
                )
            else:
                self._send(tag + b" BAD [TOOBIG] Literal too large")
            if not sync:
                self._skip(size)
            return
        if sync:
            self._send(b"+ Ready for literal data")
        self._literalLeft = size
        if not size:
            self._parts.append(imapsearch.Literal(b""))

    def _refusal(self, line: bytes) -> bytes | None:
        """
        Why the command starting with C{line} cannot run in this state, if
        that shows already.
        """
        command = _COMMAND.match(line)
        if command is None:
            return b"Missing or malformed command"
        name = command.group(1).upper()
        states = _STATES.get(name)
        if states is None:
            return b"unknown command"
        if self.state not in states:
            return name + b" is not allowed now"
        return None

    def _skip(self, size: int) -> None:
        """
        Drop a refused non-synchronizing literal of C{size} bytes and the
        rest of its command, which the client sends without waiting.
        """
        if size > MAX_SKIP:
            self._send(b"* BYE Literal too large to skip")
            self._close()
            return
        self._skipLeft = size
        self._skipping = True

    def _skipLine(self, line: bytes) -> None:
        """
        A line of a command being dropped: the command ends with the first
        line that announces no non-synchronizing literal.
        """
        m = _LITERAL.search(line)
        self._skipping = False
        if m is not None and m.group(2):
            self._skip(int(m.group(1)))

    def _readLine(self) -> Deferred:
        """
        @return: a Deferred firing with the client's next line (for
            AUTHENTICATE and IDLE).
        """
        self._lineWaiter = Deferred()
        return self._lineWaiter

    # -- running commands ------------------------------------------------

    def _execute(self, parts: list) -> None:
        args = Args(parts)
        m = args.match(_TAG)
        if m is None:
            self._send(b"* BAD Missing or malformed tag")
            return
        tag = self._tag = m.group()
        try:
            args.sp()
            name = args.atom().upper()
            uid = name == b"UID"
            if uid:
                args.sp()
                name = args.atom().upper()
                if name not in _UID_COMMANDS:
                    raise BadCommand("unknown UID command")
            states = _STATES.get(name)
            if states is None:
                raise BadCommand("unknown command")
            if self.state not in states:
                raise BadCommand(f"{name.decode()} is not allowed now")
        except BadCommand as e:
            self._send(tag + b" BAD " + _text(e))
            return
        self._busy = True
        handler = getattr(self, "do_" + name.decode())
        d = maybeDeferred(lambda: Deferred.fromCoroutine(handler(args, uid)))
        d.addBoth(self._finish, tag, name, uid)
        d.addErrback(self._broken, name)

    def _finish(self, result, tag: bytes, name: bytes, uid: bool) -> None:
        if isinstance(result, Failure):
            result = self._failureResponse(result, name)
        if result is not None:
            if self.selected is not None:
                for line in self.selected.announcements(
                    uid or name not in _BY_SEQUENCE
                ):
                    self._send(line)
            self._send(tag + b" " + result)
        self._busy = False
        if self._closing:
            self._close()
            return
        self._drain()

    def _broken(self, failure: Failure, name: bytes) -> None:
        """
        Answering a command failed: the session's state is unknown, so log
        it and close the connection.
        """
        self.log.failure(
            "IMAP {command}: the session broke", failure, command=name.decode()
        )
        if not self._closed:
            self._close()

    def _failureResponse(self, failure: Failure, name: bytes) -> bytes:
        if failure.check(BadCommand):
            return b"BAD " + _text(failure.value)
        if failure.check(_No):
            return b"NO " + failure.value.args[0]
        if failure.check(BodyUnavailable):
            reason = _text(failure.value)
            return b"NO [UNAVAILABLE] " + reason
        if failure.check(NoSuchMailbox):
            return b"NO [NONEXISTENT] No such mailbox"
        if failure.check(TooComplex):
            return b"NO [LIMIT] " + _text(failure.value)
        if failure.check(DiskFull):
            self.log.warn(
                "IMAP {command}: the mail store's disk is full", command=name.decode()
            )
            return b"NO [OVERQUOTA] Not enough disk space"
        if self._closed:
            return b"NO Connection lost"
        self.log.failure("IMAP {command} failed", failure, command=name.decode())
        return b"NO [SERVERBUG] Internal error"

    def _requireSelected(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    # -- any state ---------------------------------------------------------

    async def do_CAPABILITY(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._send(b"* CAPABILITY " + self.capabilities())
        return b"OK CAPABILITY completed"

    async def do_NOOP(self, args: Args, uid: bool) -> bytes:
        args.end()
        return b"OK NOOP completed"

    async def do_LOGOUT(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._deselect()
        self._send(b"* BYE Logging out")
        self._closing = True
        return b"OK LOGOUT completed"

    # -- not authenticated ---------------------------------------------

    async def do_STARTTLS(self, args: Args, uid: bool) -> bytes:
        args.end()
        if self.factory.tlsOptions is None or self._tls:
            raise _No(b"TLS not available")
        self._send(self._tag + b" OK Begin TLS negotiation now")
        del self._buffer[:]
        self._reset()
        self._tls = True
        self.transport.startTLS(self.factory.tlsOptions)
        return None

    async def do_LOGIN(self, args: Args, uid: bool) -> bytes:
        args.sp()
        user = args.astring()
        args.sp()
        password = args.astring()
        args.end()
        return await self._login(user, password)

    async def do_AUTHENTICATE(self, args: Args, uid: bool) -> bytes:
        args.sp()
        mechanism = args.atom().upper()
        initial = None
        if args.more():
            args.sp()
            initial = args.atom()
        args.end()
        if mechanism != b"PLAIN":
            raise _No(b"Unsupported authentication mechanism")
        if initial is None:
            self._send(b"+ ")
            initial = await self._readLine()
        if initial.strip() == b"*":
            raise BadCommand("AUTHENTICATE cancelled")
        try:
            response = base64.b64decode(
                b"" if initial == b"=" else initial, validate=True
            )
        except ValueError as e:
            raise BadCommand("malformed base64") from e
        fields = response.split(b"\0")
        if len(fields) != 3:
            raise BadCommand("malformed PLAIN response")
        authzid, user, password = fields
        if authzid and authzid != user:
            raise _No(b"[AUTHORIZATIONFAILED] Cannot act as another user")
        return await self._login(user, password)

    async def _login(self, user: bytes, password: bytes) -> bytes:
        try:
            _, avatar, logout = await self.factory.portal.login(
                UsernamePassword(user, password), None, IAccount
            )
        except UnauthorizedLogin as e:
            raise _No(b"[AUTHENTICATIONFAILED] Authentication failed") from e
        if self._closed:
            logout()
            return None
        self.account, self._avatarLogout = avatar, logout
        self.store = getattr(avatar, "store", self.factory.store)
        self.state = "auth"
        self.setTimeout(self.postAuthTimeout)
        return b"OK [CAPABILITY " + self.capabilities() + b"] Logged in"

    # -- authenticated ---------------------------------------------------

    def _deselect(self) -> None:
        if self.selected is not None:
            self.selected.close()
            self.selected = None
            if self.state == "selected":
                self.state = "auth"

    async def do_SELECT(self, args: Args, uid: bool, rw: bool = True) -> bytes:
        args.sp()
        name = args.mailbox()
        args.end()
        self._deselect()
        box = self.account.select(name, rw)
        if box is None:
            raise _No(b"[NONEXISTENT] No such mailbox")
        self.selected, self.state = box, "selected"
        box.onChange = self._mailboxChanged
        store = self.store
        flags = " ".join(box.getFlags()).encode()
        self._send(b"* FLAGS (" + flags + b")")
        self._send(b"* %d EXISTS" % len(box.uids))
        self._send(b"* 0 RECENT")
        for seq, u in enumerate(box.uids, 1):
            record = store.record(box.name, u)
            if record is not None and "\\Seen" not in record.flags:
                self._send(b"* OK [UNSEEN %d] First unseen message" % seq)
                break
        if rw:
            self._send(b"* OK [PERMANENTFLAGS (" + flags + b" \\*)] Flags permitted")
        else:
            self._send(b"* OK [PERMANENTFLAGS ()] Read-only mailbox")
        self._send(b"* OK [UIDVALIDITY %d] UIDs valid" % store.uidValidity(box.name))
        self._send(b"* OK [UIDNEXT %d] Predicted next UID" % store.uidNext(box.name))
        mode = b"READ-WRITE" if rw else b"READ-ONLY"
        return (
            b"OK [" + mode + b"] " + (b"SELECT" if rw else b"EXAMINE") + b" completed"
        )

    async def do_EXAMINE(self, args: Args, uid: bool) -> bytes:
        return await self.do_SELECT(args, uid, rw=False)

    async def do_CREATE(self, args: Args, uid: bool) -> bytes:
        args.sp()
        args.mailbox()
        args.end()
        raise _No(b"[CANNOT] This server has fixed mailboxes")

    do_DELETE = do_CREATE

    async def do_RENAME(self, args: Args, uid: bool) -> bytes:
        args.sp()
        args.mailbox()
        return await self.do_CREATE(args, uid)

    async def do_SUBSCRIBE(self, args: Args, uid: bool) -> bytes:
        args.sp()
        name = args.mailbox()
        args.end()
        self._checkMailbox(name)
        return b"OK Done"

    do_UNSUBSCRIBE = do_SUBSCRIBE

    def _checkMailbox(self, name: str) -> str:
        try:
            self.store.uidValidity(name)
        except NoSuchMailbox:
            raise _No(b"[NONEXISTENT] No such mailbox") from None
        return "INBOX" if name.upper() == "INBOX" else name

    async def do_LIST(self, args: Args, uid: bool, command: bytes = b"LIST") -> bytes:
        args.sp()
        ref = imapsearch.decodeMailbox(args.astring(), pattern=True)
        args.sp()
        pattern = imapsearch.decodeMailbox(args.listMailbox(), pattern=True)
        args.end()
        if not pattern:
            self._send(b"* " + command + b' (\\Noselect) "/" ""')
        else:
            for name, info in self.account.listMailboxes(ref, pattern):
                attributes = " ".join(info.attributes).encode()
                self._send(
                    b'* %s (%s) "/" %s' % (command, attributes, mailboxName(name))
                )
        return b"OK " + command + b" completed"

    async def do_LSUB(self, args: Args, uid: bool) -> bytes:
        return await self.do_LIST(args, uid, b"LSUB")

    async def do_NAMESPACE(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._send(b'* NAMESPACE (("" "/")) NIL NIL')
        return b"OK NAMESPACE completed"

    async def do_STATUS(self, args: Args, uid: bool) -> bytes:
        args.sp()
        name = args.mailbox()
        args.sp()
        args.expect(b"(")
        items = [args.atom().upper().decode("ascii", "replace")]
        while not args.take(b")"):
            args.sp()
            items.append(args.atom().upper().decode("ascii", "replace"))
        args.end()
        for item in items:
            if item not in _STATUS_ITEMS:
                raise BadCommand(f"unknown STATUS item {item}")
        name = self._checkMailbox(name)
        store = self.store
        records = store.messages(name)
        values = {
            "MESSAGES": len(records),
            "RECENT": 0,
            "UIDNEXT": store.uidNext(name),
            "UIDVALIDITY": store.uidValidity(name),
            "UNSEEN": sum(1 for r in records if "\\Seen" not in r.flags),
        }
        data = " ".join(f"{item} {values[item]}" for item in items).encode()
        self._send(b"* STATUS " + mailboxName(name) + b" (" + data + b")")
        return b"OK STATUS completed"

    async def do_APPEND(self, args: Args, uid: bool) -> bytes:
        args.sp()
        name = args.mailbox()
        args.sp()
        flags: list = []
        if args.peek() == b"(":
            flags = args.flagList()
            args.sp()
        date = imapsearch.parseDateTime(args)
        if date is not None:
            args.sp()
        if args.peek() is not None:
            raise BadCommand("APPEND needs a literal")
        message = args.string()
        args.end()
        name = self._checkMailbox(name)
        if name in self.factory.noAppend:
            raise _No(b"[CANNOT] Messages cannot be added to " + name.encode())
        if len(splitHeaders(message[: MAX_APPEND_HEADER + 4])) > MAX_APPEND_HEADER:
            raise _No(b"[LIMIT] Header section too large")
        store = self.store
        newUid = await store.append(
            name, message, [f for f in flags if f != "\\Recent"], date
        )
        return b"OK [APPENDUID %d %d] APPEND completed" % (
            store.uidValidity(name),
            newUid,
        )

    async def do_IDLE(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._send(b"+ idling")
        self._idling = True
        try:
            self._mailboxChanged()
            line = await self._readLine()
        finally:
            self._idling = False
        if line.strip().upper() != b"DONE":
            raise BadCommand("expected DONE")
        return b"OK IDLE terminated"

    def _mailboxChanged(self) -> None:
        if self._idling and self.selected is not None:
            for line in self.selected.announcements(True):
                self._send(line)

    # -- selected ----------------------------------------------------------

    async def do_CHECK(self, args: Args, uid: bool) -> bytes:
        args.end()
        return b"OK CHECK completed"

    async def do_CLOSE(self, args: Args, uid: bool) -> bytes:
        args.end()
        box = self._requireSelected()
        if box.rw:
            deleted = self._deleted(box, box.uids)
            if deleted:
                await self.store.expunge(box.name, deleted)
        self._deselect()
        return b"OK CLOSE completed"

    async def do_UNSELECT(self, args: Args, uid: bool) -> bytes:
        args.end()
        self._deselect()
        return b"OK UNSELECT completed"

    def _deleted(self, box: SelectedMailbox, uids) -> list:
        store = self.store
        return [
            u
            for u in uids
            if (r := store.record(box.name, u)) is not None and "\\Deleted" in r.flags
        ]

    async def do_EXPUNGE(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        uids = box.uids
        if uid:
            args.sp()
            uids = [u for _, u in box.resolve(args.sequenceSet(), True)]
        args.end()
        if not box.rw:
            raise _No(b"[READ-ONLY] Mailbox is read-only")
        deleted = self._deleted(box, uids)
        if deleted:
            await self.store.expunge(box.name, deleted)
        return b"OK EXPUNGE completed"

    async def do_SEARCH(self, args: Args, uid: bool) -> bytes:
        args.sp()
        charset, key = imapsearch.parseSearch(args)
        if charset not in (None, "US-ASCII", "UTF-8"):
            raise _No(b"[BADCHARSET (US-ASCII UTF-8)] Unsupported charset")
        result = await self._requireSelected().evaluate(key, uid)
        if result.unsearched:
            self._send(
                b"* NO Searched only the headers of %d message(s) not pulled yet"
                % result.unsearched
            )
        self._send(b"* SEARCH" + b"".join(b" %d" % n for n in result.found))
        return b"OK SEARCH completed"

    def _live(self, box: SelectedMailbox, args: Args, uid: bool) -> tuple[list, bool]:
        """
        The C{(seq, uid, record)} a sequence set names that still exist,
        and whether some named messages were expunged meanwhile.
        """
        targets = box.resolve(args.sequenceSet(), uid)
        store = self.store
        live = [
            (s, u, r)
            for s, u in targets
            if (r := store.record(box.name, u)) is not None
        ]
        return live, len(live) != len(targets)

    async def do_STORE(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        m = args.match(_STORE_ITEM)
        if m is None:
            raise BadCommand("expected FLAGS, +FLAGS or -FLAGS")
        args.sp()
        flags = args.flagList(parenthesised=False)
        args.end()
        if not box.rw:
            raise _No(b"[READ-ONLY] Mailbox is read-only")
        mode = {b"+": "add", b"-": "remove", b"": "set"}[m.group(1)]
        flags = [f for f in flags if f != "\\Recent"]
        result = await self.store.setFlags(
            box.name, [u for _, u, _ in live], flags, mode
        )
        box.flagsReported(result)
        # Expunged by another session while the change waited its turn.
        gone = gone or any(u not in result for _, u, _ in live)
        if not m.group(2):
            for seq, u, _ in live:
                if u in result:
                    extra = b" UID %d" % u if uid else b""
                    self._send(
                        b"* %d FETCH (FLAGS %s%s)"
                        % (seq, imapsearch.flagList(result[u]), extra)
                    )
        if gone:
            raise _No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return b"OK STORE completed"

    async def do_COPY(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        destination = self._checkMailbox(args.mailbox())
        args.end()
        if destination in self.factory.noAppend:
            raise _No(b"[CANNOT] Messages cannot be added to " + destination.encode())
        store = self.store
        pairs = await store.copy(box.name, [u for _, u, _ in live], destination)
        if gone or len(pairs) < len(live):
            raise _No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        if not pairs:
            return b"OK COPY completed"
        return b"OK [COPYUID %d %s %s] COPY completed" % (
            store.uidValidity(destination),
            imapsearch.formatSet(a for a, _ in pairs),
            imapsearch.formatSet(b for _, b in pairs),
        )

    async def do_FETCH(self, args: Args, uid: bool) -> bytes:
        box = self._requireSelected()
        args.sp()
        live, gone = self._live(box, args, uid)
        args.sp()
        items = list(dict.fromkeys(imapfetch.parseFetch(args)))
        if uid and imapfetch.FetchItem("UID") not in items:
            items.insert(0, imapfetch.FetchItem("UID"))
        # Bodies go in windows: those of one are had while the one before
        # is sent, and only two windows' worth are held at a time (pulled
        # bodies may be held in memory).
        windows = _windows(live, BODY_WINDOW, BODY_WINDOW_MESSAGES) if any(i.needsBody for i in items) else [live]
        unavailable, inMemory = None, []
        pending = Deferred.fromCoroutine(self._fetchWindow(box, windows[0], items))
        try:
            for n in range(len(windows)):
                part, files, structures, failed, expunged = await pending
                pending = None
                inMemory += [u for u, (body, _) in files.items() if isinstance(body, bytes)]
                if n + 1 < len(windows):
                    pending = Deferred.fromCoroutine(self._fetchWindow(box, windows[n + 1], items))
                gone = gone or expunged
                unavailable = unavailable or failed
                vanished = await self._sendWindow(box, part, items, files, structures)
                gone, unavailable = _leftOut(self.store, box.name, vanished, gone, unavailable)
        finally:
            if pending is not None:
                pending.addErrback(lambda _: None)  # the command is over
        # Bodies sent from memory are on disk before the OK: a crash before
        # it leaves a client that retries, not one that thinks it has them
        # while their senders were never told.
        await self.store.written(box.name, inMemory)
        if unavailable is not None:
            unavailable.raiseException()
        if gone:
            raise _No(b"[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return b"OK FETCH completed"

    async def _fetchWindow(self, box, live: list, items: list):
        """
        The bodies and MIME structures the FETCH C{items} need of C{live}.

        @return: C{(live, files, structures, unavailable, gone)}: the
            messages still to answer, their bodies and structures (see
            L{imapfetch.fetchBodies}), the first failure (or L{None}), and
            whether some were expunged meanwhile.
        """
        store = self.store
        files, structures, unavailable, gone = {}, {}, None, False
        if not any(i.needsBody for i in items):
            return live, files, structures, unavailable, gone
        uids = [u for _, u, _ in live]
        files, unavailable = await imapfetch.fetchBodies(store, box.name, uids)
        missing = [u for _, u, _ in live if u not in files]
        if missing and all(store.record(box.name, u) is None for u in missing):
            # Expunged by another session while their bodies were pulled.
            unavailable, gone = None, True
        live = [x for x in live if x[1] in files]
        if any(i.needsStructure for i in items):
            structures = await self.factory.structures.get(store, box.name, files)
            left = [x for x in live if x[1] not in structures]
            live = [x for x in live if x[1] in structures]
            gone, unavailable = _leftOut(store, box.name, [x[1] for x in left], gone, unavailable)
        return live, files, structures, unavailable, gone

    async def _sendWindow(self, box, live: list, items: list, files: dict, structures: dict) -> list:
        """
        Mark C{live} seen if C{items} say so, and send their FETCH
        responses.

        @return: the UIDs whose file could not be opened (left out).
        """
        store = self.store
        seen: set = set()
        marking = None
        if box.rw and any(i.setsSeen for i in items):
            unseen = [u for _, u, r in live if "\\Seen" not in r.flags]
            if unseen:
                # Stored while the responses go (they show the flag): the
                # store's write waits behind the bodies being committed.
                marking = store.setFlags(box.name, unseen, ["\\Seen"], "add")
                seen = set(unseen)
        vanished: list = []
        pieces = imapfetch.fetchPieces(store, box.name, live, items, files, structures, seen, vanished)
        self._sender = imapfetch.PieceSender(
            self.transport,
            pieces,
            canWrite=lambda: not (self._outputFull or self._closed),
            abort=self._close,
        )
        try:
            await self._sender.start()
        except BaseException:
            if marking is not None:
                marking.addErrback(lambda _: None)  # the command fails anyway
            raise
        finally:
            self._sender = None
        if marking is not None:
            # Stored before the command's OK; a failure makes it a NO.
            box.flagsReported(set(await marking))
        return vanished


def _leftOut(store, mailbox: str, uids, gone: bool, unavailable):
    """
    Account for messages left out of a FETCH for want of their file: one
    expunged meanwhile makes C{gone} true, any other is the first failure
    (C{unavailable}) if there is none yet.

    @return: C{(gone, unavailable)}.
    """
    for u in uids:
        if store.record(mailbox, u) is None:
            gone = True
        elif unavailable is None:
            unavailable = Failure(BodyUnavailable("the message file is missing"))
    return gone, unavailable


def _windows(live: list, size: int, count: int) -> list:
    """
    C{live} (C{(seq, uid, record)}s) cut into runs of at most C{count}
    messages of at most C{size} bytes together, or of one message; one
    empty run if none.
    """
    windows, current, total = [], [], 0
    for x in live:
        if current and (total + x[2].size > size or len(current) == count):
            windows.append(current)
            current, total = [], 0
        current.append(x)
        total += x[2].size
    return [*windows, current]


def _text(error: Exception) -> bytes:
    """
    An error's message as response text: one line of printable ASCII.
    """
    text = str(error).encode("ascii", "replace")
    return bytes(c if 0x20 <= c < 0x7F else 0x3F for c in text)


def _tagOf(line: bytes) -> bytes:
    m = _TAG.match(line)
    return m.group() if m is not None else b"*"


class IMAPFactory(protocol.Factory):
    """
    Builds L{IMAPServer}s for a store.

    @ivar maxMessageSize: The largest message APPEND accepts.
    @ivar noAppend: Mailboxes APPEND and COPY refuse to add to (the Outbox
        only lists sends).
    """

    protocol = IMAPServer
    noAppend = ("Outbox",)

    def __init__(
        self,
        portal,
        store,
        tlsOptions=None,
        clock=None,
        maxMessageSize: int = MAX_MESSAGE_SIZE,
    ) -> None:
        """
        @param portal: The portal logins go through; its realm hands out
            L{twisted.mail.imap4.IAccount} avatars (an L{Account}).
        @param store: The L{p2pmta.mailstore.MailStore}.
        @param tlsOptions: Offer STARTTLS with these context options.
        @param clock: The reactor used for timeouts.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.store = store
        self.tlsOptions = tlsOptions
        self.clock = clock
        self.maxMessageSize = maxMessageSize
        self.structures = imapfetch.StructureCache()
