"""
The fallback baseline's server, for machines without Postfix and Dovecot:
Twisted's stock ESMTP server (C{twisted.mail.smtp.ESMTP}) delivering each
message into a Maildir (written to C{tmp/}, fsynced, renamed into C{new/},
as Postfix's local delivery does), and Twisted's stock IMAP4 server
(C{twisted.mail.imap4.IMAP4Server}) over that Maildir.  Twisted ships no
Maildir mailbox for IMAP, so the small adapter below is ours.

    python twistedmail.py --smtp PORT --imap PORT --maildir DIR --user NAME --password PW

Prints C{ready} once both servers listen on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import email.utils
import io
import os
import socket
import time
from email.parser import BytesHeaderParser

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.mail import imap4, smtp
from twisted.mail.interfaces import IMessageIMAP, IMessageIMAPFile
from zope.interface import implementer

DOMAIN = "p2b.bench"


class MaildirInbox:
    """An IMAP mailbox over a Maildir's C{new/} and C{cur/}; UIDs kept in memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self.messages: list[MaildirMessage] = []
        self.uidNext = 1
        self.listeners: list = []
        for sub in ("cur", "new"):
            for name in sorted(os.listdir(os.path.join(path, sub))):
                self._add(os.path.join(path, sub, name))

    def _add(self, path: str) -> None:
        self.messages.append(MaildirMessage(self.uidNext, path))
        self.uidNext += 1

    def delivered(self, path: str) -> None:
        self._add(path)
        for listener in self.listeners:
            listener.newMessages(len(self.messages), None)

    # IMailboxIMAPInfo
    def getFlags(self):
        return [r"\Seen", r"\Answered", r"\Flagged", r"\Deleted", r"\Draft"]

    def getHierarchicalDelimiter(self):
        return "/"

    # IMailboxIMAP
    def getUIDValidity(self):
        return 1

    def getUIDNext(self):
        return self.uidNext

    def getUID(self, message):
        return self.messages[message - 1].uid

    def getMessageCount(self):
        return len(self.messages)

    def getRecentCount(self):
        return 0

    def getUnseenCount(self):
        return sum(1 for m in self.messages if r"\Seen" not in m.flags)

    def isWriteable(self):
        return True

    def destroy(self):
        raise imap4.MailboxException("INBOX cannot be deleted")

    def requestStatus(self, names):
        values = {"MESSAGES": self.getMessageCount(), "RECENT": 0, "UIDNEXT": self.uidNext,
                  "UIDVALIDITY": 1, "UNSEEN": self.getUnseenCount()}
        return {name: values[name] for name in names if name in values}

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        return defer.fail(imap4.MailboxException("APPEND is not supported here"))

    def expunge(self):
        gone = []
        for seq in range(len(self.messages), 0, -1):  # highest first: each number stays valid
            message = self.messages[seq - 1]
            if r"\Deleted" in message.flags:
                os.unlink(message.path)
                del self.messages[seq - 1]
                gone.append(seq)
        return gone

    def _select(self, messages, uid):
        if uid:
            messages.last = max(self.uidNext - 1, 1)
            return [(seq, m) for seq, m in enumerate(self.messages, 1) if m.uid in messages]
        messages.last = max(len(self.messages), 1)
        return [(seq, self.messages[seq - 1]) for seq in messages if 0 < seq <= len(self.messages)]

    def fetch(self, messages, uid):
        return self._select(messages, uid)

    def store(self, messages, flags, mode, uid):
        result = {}
        for seq, message in self._select(messages, uid):
            if mode == 0:
                message.flags = set(flags)
            elif mode == 1:
                message.flags |= set(flags)
            else:
                message.flags -= set(flags)
            result[seq] = sorted(message.flags)
        return result


@implementer(IMessageIMAP, IMessageIMAPFile)
class MaildirMessage:
    def __init__(self, uid: int, path: str) -> None:
        self.uid = uid
        self.path = path
        self.flags: set[str] = set()

    def getUID(self):
        return self.uid

    def getFlags(self):
        return sorted(self.flags)

    def getInternalDate(self):
        return email.utils.formatdate(os.path.getmtime(self.path))

    def _split(self) -> tuple[bytes, bytes]:
        with open(self.path, "rb") as f:
            data = f.read()
        head, sep, body = data.partition(b"\r\n\r\n")
        return head + sep, body

    def getHeaders(self, negate, *names):
        head = BytesHeaderParser().parsebytes(self._split()[0])
        wanted = {n.lower() for n in names}
        return {k.lower(): v for k, v in head.items() if (k.lower() in wanted) != negate}

    def getBodyFile(self):
        return io.BytesIO(self._split()[1])

    def getSize(self):
        return os.path.getsize(self.path)

    def isMultipart(self):
        return False

    def getSubPart(self, part):
        raise TypeError("no sub-parts here")

    def open(self):
        return open(self.path, "rb")


_counter = 0


@implementer(smtp.IMessage)
class MaildirWriter:
    """One incoming message: written into C{tmp/}, fsynced, renamed into C{new/}."""

    def __init__(self, inbox: MaildirInbox, received: bytes) -> None:
        global _counter
        _counter += 1
        self.inbox = inbox
        self.name = f"{time.time():.6f}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"
        self.tmp = os.path.join(inbox.path, "tmp", self.name)
        self.file = open(self.tmp, "wb")
        self.file.write(received)

    def lineReceived(self, line: bytes) -> None:
        self.file.write(line + b"\r\n")

    def eomReceived(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = os.path.join(self.inbox.path, "new", self.name)
        os.rename(self.tmp, final)
        self.inbox.delivered(final)
        return defer.succeed(self.name)

    def connectionLost(self) -> None:
        self.file.close()
        os.unlink(self.tmp)


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, inbox: MaildirInbox, user: str) -> None:
        self.inbox = inbox
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        return (f"Received: from {helo[0].decode(errors='replace')} by {DOMAIN} with ESMTP;\r\n"
                f"\t{email.utils.formatdate(localtime=True)}").encode()

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.local.decode() != self.user:
            raise smtp.SMTPBadRcpt(user)
        received = self._received
        return lambda: MaildirWriter(self.inbox, received)

    _received = b""


class NoDelayESMTP(smtp.ESMTP):
    def connectionMade(self):
        # Replies go out at once: without TCP_NODELAY a reply written in two
        # pieces waits for the client's delayed ACK (40 ms on Linux).
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class NoDelayIMAP4Server(imap4.IMAP4Server):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)  # as above: STATUS is an untagged and a tagged line
        super().connectionMade()


class ESMTPFactory(smtp.SMTPFactory):
    protocol = NoDelayESMTP
    domain = DOMAIN

    def __init__(self, delivery: Delivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        return p


@implementer(IRealm)
class Realm:
    def __init__(self, account) -> None:
        self.account = account

    def requestAvatar(self, avatarId, mind, *interfaces):
        if imap4.IAccount in interfaces:
            return imap4.IAccount, self.account, lambda: None
        raise NotImplementedError()


class IMAPFactory(protocol.Factory):
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr):
        p = NoDelayIMAP4Server()
        p.portal = self.portal
        p.factory = self
        return p


def main(reactor, args) -> defer.Deferred:
    inbox = MaildirInbox(args.maildir)
    account = imap4.MemoryAccount(args.user)
    account.addMailbox("INBOX", inbox)
    portal = Portal(Realm(account), [InMemoryUsernamePasswordDatabaseDontUse(**{args.user: args.password.encode()})])
    reactor.listenTCP(args.smtp, ESMTPFactory(Delivery(inbox, args.user)), interface="127.0.0.1")
    reactor.listenTCP(args.imap, IMAPFactory(portal), interface="127.0.0.1")
    print("ready", flush=True)
    return defer.Deferred()  # serve until a signal stops the reactor


if __name__ == "__main__":
    from twisted.internet import task

    parser = argparse.ArgumentParser()
    for name in ("smtp", "imap"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    task.react(main, [parser.parse_args()])
