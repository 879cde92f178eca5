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

This module holds the session, L{IMAPServer}: its connection, its flow
control, the running of commands, and the commands of the states before
one selects a mailbox.  Its L{p2pmta.imapreader.CommandReader} reads the
commands off the wire, L{p2pmta.imapselected} holds the Selected state's
commands, and L{p2pmta.imapaccount} the avatar.
"""

from __future__ import annotations

import base64

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.mail.imap4 import IAccount
from twisted.protocols import policies
from twisted.python.failure import Failure

from p2pmta import imapfetch, imapsyntax
from p2pmta.errors import BodyUnavailable, DiskFull, NoSuchMailbox
from p2pmta.imapaccount import Account, MailboxInfo, makeAccount
from p2pmta.imapreader import MAX_COMMAND, MAX_LINE, STATES, TAG, CommandReader
from p2pmta.imapmailbox import SelectedMailbox
from p2pmta.imapselected import SelectedCommands
from p2pmta.imapsyntax import Args, BadCommand, No, TooComplex
from p2pmta.mailindex import splitHeaders
from p2pmta.transports import sendInLargeWrites

# Account, MailboxInfo and makeAccount (p2pmta.imapaccount), MAX_COMMAND
# and MAX_LINE (p2pmta.imapreader) are importable from here too.
__all__ = [
    "MAX_APPEND_HEADER",
    "MAX_COMMAND",
    "MAX_LINE",
    "MAX_MESSAGE_SIZE",
    "Account",
    "IMAPFactory",
    "IMAPServer",
    "MailboxInfo",
    "mailboxName",
    "makeAccount",
]

#: The default largest message APPEND accepts.
MAX_MESSAGE_SIZE = 50 * 1024 * 1024
#: The largest header section APPEND accepts (the mail store keeps header
#: sections in memory).
MAX_APPEND_HEADER = 256 * 1024

_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
_UID_COMMANDS = (b"FETCH", b"STORE", b"COPY", b"SEARCH", b"EXPUNGE")
#: Commands by sequence number, after which no EXPUNGE may be sent.
_BY_SEQUENCE = (b"FETCH", b"STORE", b"SEARCH", b"COPY")


def mailboxName(name: str) -> bytes:
    return imapsyntax.quote(name.encode("imap4-utf-7"))


class IMAPServer(protocol.Protocol, policies.TimeoutMixin, SelectedCommands):
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
        self._reader = CommandReader(self)
        self._busy = False
        self._outputFull = False
        self._reading = True
        self._producing = False
        self._sender = None
        self._closed = False
        self._closing = False
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
        # A message of a megabyte goes out in one send, not eleven.
        sendInLargeWrites(self.transport)
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
        self._reader.connectionLost(reason)
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
            self._reader.drain()

    def stopProducing(self) -> None:
        self._closed = True
        if self._sender is not None:
            self._sender.stop()

    def _updateReading(self) -> None:
        reading = not (self._reader.inputFull or self._outputFull)
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
        self._reader.receive(data)

    # -- running commands ------------------------------------------------

    def _execute(self, parts: list) -> None:
        args = Args(parts)
        m = args.match(TAG)
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
            states = STATES.get(name)
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
        self._reader.drain()

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
        if failure.check(No):
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
            raise No(b"TLS not available")
        self._send(self._tag + b" OK Begin TLS negotiation now")
        self._reader.discard()
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
            raise No(b"Unsupported authentication mechanism")
        if initial is None:
            self._send(b"+ ")
            initial = await self._reader.readLine()
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
            raise No(b"[AUTHORIZATIONFAILED] Cannot act as another user")
        return await self._login(user, password)

    async def _login(self, user: bytes, password: bytes) -> bytes:
        try:
            _, avatar, logout = await self.factory.portal.login(
                UsernamePassword(user, password), None, IAccount
            )
        except UnauthorizedLogin as e:
            raise No(b"[AUTHENTICATIONFAILED] Authentication failed") from e
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
            raise No(b"[NONEXISTENT] No such mailbox")
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
        raise No(b"[CANNOT] This server has fixed mailboxes")

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
            raise No(b"[NONEXISTENT] No such mailbox") from None
        return "INBOX" if name.upper() == "INBOX" else name

    async def do_LIST(self, args: Args, uid: bool, command: bytes = b"LIST") -> bytes:
        args.sp()
        ref = imapsyntax.decodeMailbox(args.astring(), pattern=True)
        args.sp()
        pattern = imapsyntax.decodeMailbox(args.listMailbox(), pattern=True)
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
        date = imapsyntax.parseDateTime(args)
        if date is not None:
            args.sp()
        if args.peek() is not None:
            raise BadCommand("APPEND needs a literal")
        message = args.string()
        args.end()
        name = self._checkMailbox(name)
        if name in self.factory.noAppend:
            raise No(b"[CANNOT] Messages cannot be added to " + name.encode())
        if len(splitHeaders(message[: MAX_APPEND_HEADER + 4])) > MAX_APPEND_HEADER:
            raise No(b"[LIMIT] Header section too large")
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
            line = await self._reader.readLine()
        finally:
            self._idling = False
        if line.strip().upper() != b"DONE":
            raise BadCommand("expected DONE")
        return b"OK IDLE terminated"

    def _mailboxChanged(self) -> None:
        if self._idling and self.selected is not None:
            for line in self.selected.announcements(True):
                self._send(line)


def _text(error: Exception) -> bytes:
    """
    An error's message as response text: one line of printable ASCII.
    """
    text = str(error).encode("ascii", "replace")
    return bytes(c if 0x20 <= c < 0x7F else 0x3F for c in text)


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
