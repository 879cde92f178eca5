# -*- test-case-name: tests.test_smtp -*-
"""
The ESMTP submission server for the peer's local user: the factory that
makes its sessions (L{p2pmta.smtpsession}).

The factory caps the open sessions; when it is full, a newcomer takes the
place of the oldest session that has not logged in within a grace period,
so idle connections cannot lock the user out.  It also gives each message
its file in the spool (L{p2pmta.spool}).
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.mail.smtp import SMTPFactory

from p2pmta import spool
from p2pmta.smtpsession import SubmissionServer
from p2pmta.spool import TEMP_PREFIX

# Importable from here too, as before the session and the spool files had
# modules of their own.
__all__ = ["TEMP_PREFIX", "SubmissionFactory", "SubmissionServer"]


class _TooBusy(Protocol):
    """
    Turns a connection away: the server has too many already.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
        self.transport.loseConnection()


class SubmissionFactory(SMTPFactory):
    """
    Makes L{SubmissionServer}s, at most L{maxConnections} at a time.

    When that many are open, a newcomer takes the place of the oldest
    session that has not logged in though it connected L{loginGrace}
    seconds ago or more (as Dovecot drops its oldest unauthenticated
    client); the closed session is told C{421 4.7.0}.  If there is none,
    the newcomer is greeted with C{421 4.7.0} and closed.  Sessions that
    logged in are never closed for another.

    @ivar maxConnections: The most sessions open at a time.
    @ivar timeout: Seconds of client silence before a session is closed.
    @ivar loginGrace: Seconds a new session has to log in before it may
        be closed for a newcomer when the server is full.
    """

    protocol = SubmissionServer

    def __init__(
        self,
        portal,
        submission,
        tlsOptions=None,
        hostname=b"p2pmta",
        clock=None,
        runBlocking=None,
        maxConnections: int = 100,
        timeout: float = 300,
        loginGrace: float = 10,
        spoolAhead: int = 0,
    ) -> None:
        """
        @param portal: The cred portal (L{p2pmta.auth.makePortal}); its realm
            must give an L{IMessageDelivery} avatar.
        @param submission: The L{p2pmta.interfaces.ISubmission} mail goes to.
        @param tlsOptions: Server TLS options for STARTTLS, or L{None} not to
            offer it.
        @param hostname: The name (L{bytes} or L{str}) the server greets with.
        @param clock: The L{IReactorTime} for timeouts and dates (default:
            the global reactor).
        @param runBlocking: C{f(callable, *args)} returning a Deferred of
            the call's result, run off the reactor thread (default:
            L{twisted.internet.threads.deferToThread}).
        @param maxConnections: See L{maxConnections}.
        @param timeout: See L{timeout}.
        @param loginGrace: See L{loginGrace}.
        @param spoolAhead: How many empty spool files to keep made ahead of
            time, in C{runBlocking} (0: each DATA command makes its own).
        """
        SMTPFactory.__init__(self, portal)
        if clock is None:
            from twisted.internet import reactor as clock
        if runBlocking is None:
            from twisted.internet.threads import deferToThread as runBlocking
        self.submission = submission
        self.tlsOptions = tlsOptions
        self.domain = (
            hostname.encode("ascii") if isinstance(hostname, str) else hostname
        )
        self.clock = clock
        self.runBlocking = runBlocking
        self.maxConnections = maxConnections
        self.timeout = timeout
        self.loginGrace = loginGrace
        # The open sessions, oldest first, with the time they connected.
        self._sessions: dict[SubmissionServer, float] = {}
        self._spoolAhead = (
            spool.SpoolAhead(submission.spoolDirectory, runBlocking, spoolAhead) if spoolAhead else None
        )

    def openSpoolFile(self):
        """
        The file a message arrives in.

        @return: the file, open for writing, its path, and whether its name
            is on disk already.
        """
        if self._spoolAhead is not None:
            return self._spoolAhead.take()
        return (*spool.openSpoolFile(self.submission.spoolDirectory), False)

    def stopFactory(self) -> None:
        if self._spoolAhead is not None:
            self._spoolAhead.discard()

    @property
    def connections(self) -> int:
        """
        The number of sessions now open.
        """
        return len(self._sessions)

    def opened(self, session: SubmissionServer) -> None:
        self._sessions[session] = self.clock.seconds()
        self.submission.sessions(len(self._sessions))

    def closed(self, session: SubmissionServer) -> None:
        if self._sessions.pop(session, None) is not None:
            self.submission.sessions(len(self._sessions))

    def buildProtocol(self, addr) -> Protocol:
        if len(self._sessions) >= self.maxConnections and not self._evictOne():
            return _TooBusy()
        return self.protocol(self)

    def _evictOne(self) -> bool:
        """
        Close the oldest session past its login grace that has not logged in.

        @return: whether there was one.
        """
        deadline = self.clock.seconds() - self.loginGrace
        for session, connected in self._sessions.items():
            if connected > deadline:
                break
            if not session.authenticated:
                # It no longer counts, though its connection may take a
                # moment to close.
                del self._sessions[session]
                self.submission.sessions(len(self._sessions))
                session.evict()
                return True
        return False
