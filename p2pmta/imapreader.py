# -*- test-case-name: tests.test_imap,tests.test_hostile_imap -*-
"""
Reading IMAP commands off the wire: a session's L{CommandReader} cuts what
the client sends into command lines and the literals they announce, and
hands each whole command to its L{p2pmta.imap.IMAPServer}, one at a time.

What it holds is bounded: lines up to L{MAX_LINE}, commands up to
L{MAX_COMMAND} (plus the largest message, for APPEND); anything longer gets
one tagged BAD (or C{NO [TOOBIG]} for APPEND) and is dropped, and reading
goes on with the next command.  A refused non-synchronizing literal is read
and dropped, up to L{MAX_SKIP}.  The reader knows which commands may run in
which state (L{STATES}), so that a literal of a command that cannot run now
is refused before it is read.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred

from p2pmta import imapsyntax
from p2pmta.imapsyntax import BadCommand

#: The longest command line accepted (without its CRLF).
MAX_LINE = 64 * 1024
#: The most bytes one command (other than APPEND's message) may take.
MAX_COMMAND = 256 * 1024
#: The most bytes of a refused non-synchronizing literal read and dropped;
#: past this the connection is closed instead.
MAX_SKIP = 256 * 1024 * 1024

_LITERAL = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
#: A command's tag.
TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+")
_COMMAND = re.compile(rb"[^ ]+ +(?:UID +)?([A-Za-z]+)")
#: The states each command is allowed in.
STATES = {
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


class CommandReader:
    """
    Reads one session's commands: lines, and literals as
    L{imapsyntax.Literal}s, into the parts L{imapsyntax.Args} reads.

    The reader calls back into its session: C{_execute(parts)} with each
    whole command, C{_send(line)} for what it answers itself (BAD, the
    continuation request, BYE) and C{_close()}.  It looks at the session's
    C{state} and C{factory.maxMessageSize}.  It reads nothing while the
    session cannot answer (C{_outputFull}, C{_closed}, C{_closing}); while
    a command runs (C{_busy}) it reads only a line the command waits for
    (L{readLine}).  It calls the session's C{_updateReading()} when
    L{inputFull} changes.

    @ivar buffer: What was received and not read yet.
    @ivar inputFull: Whether the buffer came to hold more than
        L{MAX_COMMAND} while a command ran: the session stops reading from
        its transport until it holds less.
    """

    def __init__(self, session) -> None:
        self._session = session
        self.buffer = bytearray()
        self.inputFull = False
        self._parts: list = []
        self._commandBytes = 0
        self._literalLeft = 0
        self._literalChunks: list = []
        self._skipLeft = 0
        self._skipping = False
        self._append = False
        self._discarding: bytes | None = None
        self._draining = False
        self._lineWaiter: Deferred | None = None

    def receive(self, data: bytes) -> None:
        """
        Read C{data}, which the client sent.
        """
        self.buffer += data
        self.drain()

    def drain(self) -> None:
        """
        Read what the buffer holds, as far as the session takes it.
        """
        if self._draining:
            return
        self._draining = True
        try:
            self._drainLoop()
        finally:
            self._draining = False
        if self.inputFull and len(self.buffer) < MAX_COMMAND:
            self.inputFull = False
            self._session._updateReading()

    def _drainLoop(self) -> None:
        session, buf = self._session, self.buffer
        while buf and not session._closed and not session._closing:
            if session._outputFull:
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
                        imapsyntax.Literal(b"".join(self._literalChunks))
                    )
                    self._literalChunks = []
                continue
            if session._busy and self._lineWaiter is None:
                if len(buf) > MAX_COMMAND and not self.inputFull:
                    self.inputFull = True
                    session._updateReading()
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
                    session._send(_tagOf(head) + b" BAD Command line too long")
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

    def discard(self) -> None:
        """
        Forget what was received and not read yet, and the command being
        read (for STARTTLS: nothing sent before TLS counts after it).
        """
        del self.buffer[:]
        self._reset()

    def _lineReceived(self, line: bytes) -> None:
        session = self._session
        if not self._parts:
            command = _COMMAND.match(line)
            self._append = (
                command is not None
                and command.group(1).upper() == b"APPEND"
                and session.state != "unauth"
            )
        limit = MAX_COMMAND + (session.factory.maxMessageSize if self._append else 0)
        self._commandBytes += len(line)
        m = _LITERAL.search(line)
        if m is None:
            parts, tooLong = [*self._parts, line], self._commandBytes > limit
            self._reset()
            if tooLong:
                session._send(_tagOf(parts[0]) + b" BAD Command too long")
            else:
                session._execute(parts)
            return
        first = not self._parts
        self._parts.append(line[: m.start()])
        size, sync = int(m.group(1)), not m.group(2)
        self._commandBytes += size
        refusal = self._refusal(line) if first else None
        if refusal is not None:
            # No literal for a command that cannot run now.
            self._reset()
            session._send(_tagOf(line) + b" BAD " + refusal)
            if not sync:
                self._skip(size)
            return
        if self._commandBytes > limit or (self._append and size > limit - MAX_COMMAND):
            tag = _tagOf(self._parts[0])
            self._reset()
            if self._append:
                session._send(
                    tag
                    + b" NO [TOOBIG] Message too large (APPENDLIMIT=%d)"
                    % session.factory.maxMessageSize
                )
            else:
                session._send(tag + b" BAD [TOOBIG] Literal too large")
            if not sync:
                self._skip(size)
            return
        if sync:
            session._send(b"+ Ready for literal data")
        self._literalLeft = size
        if not size:
            self._parts.append(imapsyntax.Literal(b""))

    def _refusal(self, line: bytes) -> bytes | None:
        """
        Why the command starting with C{line} cannot run in this state, if
        that shows already.
        """
        command = _COMMAND.match(line)
        if command is None:
            return b"Missing or malformed command"
        name = command.group(1).upper()
        states = STATES.get(name)
        if states is None:
            return b"unknown command"
        if self._session.state not in states:
            return name + b" is not allowed now"
        return None

    def _skip(self, size: int) -> None:
        """
        Drop a refused non-synchronizing literal of C{size} bytes and the
        rest of its command, which the client sends without waiting.
        """
        if size > MAX_SKIP:
            self._session._send(b"* BYE Literal too large to skip")
            self._session._close()
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

    def readLine(self) -> Deferred:
        """
        @return: a Deferred firing with the client's next line (for
            AUTHENTICATE and IDLE).
        """
        self._lineWaiter = Deferred()
        return self._lineWaiter

    def connectionLost(self, reason) -> None:
        """
        The connection is gone: a line waited for fails with C{reason}.
        """
        if self._lineWaiter is not None:
            waiter, self._lineWaiter = self._lineWaiter, None
            waiter.errback(reason)


def _tagOf(line: bytes) -> bytes:
    m = TAG.match(line)
    return m.group() if m is not None else b"*"
