"""
Tests for L{p2pmta.imap}, L{p2pmta.imapreader}, L{p2pmta.imapselected},
L{p2pmta.imapfetch}, L{p2pmta.imapsearch}, L{p2pmta.imapmailbox} and
L{p2pmta.piecesender}: the stdlib C{imaplib} (in a thread) and raw sockets
against a real server on 127.0.0.1 over a real L{MailStore}.
"""

import imaplib
import os
import re
import select
import socket
import ssl
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.mail.imap4 import IAccount
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from p2pmta import transports
from p2pmta.address import Address
from p2pmta.auth import makePortal
from p2pmta.errors import BodyUnavailable, DiskFull
from p2pmta import imapselected
from p2pmta.imap import IMAPFactory
from p2pmta.imapaccount import Account
from p2pmta.mailstore import MailStore
from p2pmta.mimestructure import MAX_MIME_DEPTH

USER, PASSWORD = "alice@demo", "secret"


def message(
    n: int, subject: str = "Hello", sender: str = "bob@demo", body: bytes = b""
) -> bytes:
    """
    A small message whose header section keeps odd case and duplicates.
    """
    headers = (
        f"Received: from a by b\r\nReceived: from c by d\r\nFrom: Bob <{sender}>\r\n"
        f"To: {USER}\r\nSubject: {subject} {n}\r\nX-CaSe: Kept\r\n"
        f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{n}@demo>\r\n\r\n"
    ).encode()
    return headers + (body or b"Body of message %d.\r\n" % n)


def headersOf(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 4]


MULTIPART = (
    b"From: carol@demo\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n'
    b"preamble\r\n--BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n"
    b"--BB\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner text\r\n"
    b"--BB--\r\nepilogue\r\n"
)


class RawClient:
    """
    A blocking IMAP client on a raw socket, for input C{imaplib} cannot
    express.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.readLine()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise EOFError("connection closed")
        return line.rstrip(b"\r\n")

    def response(self, tag: bytes) -> list:
        """
        Read lines (literals joined in) up to the tagged one.
        """
        lines = []
        while True:
            line = self.readLine()
            while (m := re.search(rb"\{(\d+)\}$", line)) is not None:
                line += b"\r\n" + self.file.read(int(m.group(1))) + self.readLine()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list:
        self.send(tag + b" " + text + b"\r\n")
        return self.response(tag)

    def login(self) -> None:
        [ok] = self.command(b"L", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        assert ok.startswith(b"L OK"), ok

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class IMAPServerTests(TestCase):
    """
    The IMAP server against real clients.
    """

    maxMessageSize = 10 * 1024 * 1024

    @inlineCallbacks
    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-imap")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.fetched = []
        self.failNext = 0
        self.hooked = []
        self.clients = []
        self.servers = []
        yield self.startServer()
        self.addCleanup(self.stopServer)

    @inlineCallbacks
    def startServer(self, tlsOptions=None):
        self.store = MailStore(
            reactor,
            os.path.join(self.dir, "db"),
            os.path.join(self.dir, "md"),
            self.pool,
        )
        yield self.store.open()
        self.store.bodyFetcher = self.fetchBody
        self.store.expungeHook = self.expungeHook
        portal = makePortal(
            reactor,
            Address.parse(USER),
            PASSWORD,
            {IAccount: lambda: Account(self.store)},
        )
        self.factory = IMAPFactory(
            portal, self.store, tlsOptions, maxMessageSize=self.maxMessageSize
        )
        build = self.factory.buildProtocol

        def buildProtocol(addr):
            proto = build(addr)
            self.servers.append(proto)
            return proto

        self.factory.buildProtocol = buildProtocol
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    @inlineCallbacks
    def stopServer(self):
        for client in self.clients:
            try:
                client.close() if isinstance(client, RawClient) else client.shutdown()
            except OSError:
                pass
        self.clients = []
        yield self.port.stopListening()
        for _ in range(200):
            if all(p._closed for p in self.servers):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.servers = []
        yield self.store.close()

    def fetchBody(self, mailbox, record):
        """
        The fake puller: the message whose headers were announced, in
        memory for odd UIDs (the store serves it while it writes it), else
        written to a file.
        """
        self.fetched.append(record.uid)
        if self.failNext or record.meta["n"] in getattr(self, "failFor", ()):
            self.failNext = max(0, self.failNext - 1)

            def offline():
                raise BodyUnavailable("sender offline")

            return deferLater(reactor, 0, offline)
        if record.uid % 2:
            return deferLater(reactor, 0.01, lambda: self.bodies[record.meta["n"]])
        path = os.path.join(self.dir, f"pulled-{len(self.fetched)}")
        with open(path, "wb") as f:
            f.write(self.bodies[record.meta["n"]])
        return deferLater(reactor, 0.01, lambda: path)

    def expungeHook(self, mailbox, records):
        self.hooked.append((mailbox, [r.uid for r in records]))
        return succeed(None)

    @inlineCallbacks
    def announce(self, *numbers, mailbox="INBOX"):
        """
        Deliver messages by their headers only, as a notification would.
        """
        self.bodies = getattr(self, "bodies", {})
        uids = []
        for n in numbers:
            data = message(n)
            self.bodies[n] = data
            uid = yield self.store.deliver(
                mailbox, headersOf(data), len(data), {"n": n}
            )
            uids.append(uid)
        return uids

    def imap(self, login=True) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port.getHost().port, timeout=10)
        self.clients.append(client)
        if login:
            client.login(USER, PASSWORD)
        return client

    def raw(self, login=True) -> RawClient:
        client = RawClient(self.port.getHost().port)
        self.clients.append(client)
        if login:
            client.login()
        return client

    def inThread(self, f, *args):
        return deferToThread(f, *args)

    # -- login and mailboxes -------------------------------------------

    @inlineCallbacks
    def test_login(self):
        """
        LOGIN with the peer's address and password works; a wrong password
        gets NO; AUTHENTICATE PLAIN works.
        """

        def session():
            client = self.imap(login=False)
            self.assertRaises(imaplib.IMAP4.error, client.login, USER, "wrong")
            typ, _ = client.login(USER, PASSWORD)
            self.assertEqual(typ, "OK")
            other = self.imap(login=False)
            typ, _ = other.authenticate(
                "PLAIN", lambda _: b"\0" + USER.encode() + b"\0" + PASSWORD.encode()
            )
            self.assertEqual(typ, "OK")
            return client.capabilities

        caps = yield self.inThread(session)
        for cap in (
            "IMAP4REV1",
            "IDLE",
            "UIDPLUS",
            "SPECIAL-USE",
            "NAMESPACE",
            "AUTH=PLAIN",
        ):
            self.assertIn(cap, caps)
        self.assertNotIn("LITERAL+", caps)
        self.assertNotIn("STARTTLS", caps)

    @inlineCallbacks
    def test_list(self):
        """
        LIST shows INBOX, Sent (C{\\Sent}) and Outbox, names in their case;
        INBOX matches in any case.
        """

        def session():
            client = self.imap()
            listed = client.list()[1]
            lsub = client.lsub()[1]
            inbox = client.list('""', "inbox")[1]
            sent = client.list('""', "sent")[1]
            return listed, lsub, inbox, sent

        listed, lsub, inbox, sent = yield self.inThread(session)
        self.assertEqual(
            listed,
            [
                b'(\\HasNoChildren) "/" "INBOX"',
                b'(\\HasNoChildren \\Sent) "/" "Sent"',
                b'(\\HasNoChildren) "/" "Outbox"',
            ],
        )
        self.assertEqual(lsub, listed)
        self.assertEqual(inbox, [listed[0]])
        self.assertEqual(sent, [None])

    @inlineCallbacks
    def test_selectResponseComplete(self):
        """
        SELECT answers FLAGS, EXISTS, RECENT, UNSEEN, PERMANENTFLAGS,
        UIDVALIDITY and UIDNEXT, each C{* OK [CODE] text}, and READ-WRITE.
        """
        yield self.announce(1, 2)
        yield self.store.setFlags("INBOX", [1], ["\\Seen"], "add")
        client = yield self.inThread(self.raw)
        lines = yield self.inThread(client.command, b"a", b"SELECT INBOX")
        text = b"\n".join(lines)
        self.assertIn(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)", lines)
        self.assertIn(b"* 2 EXISTS", lines)
        self.assertIn(b"* 0 RECENT", lines)
        validity = self.store.uidValidity("INBOX")
        self.assertRegex(text, rb"\* OK \[UNSEEN 2\] \w+")
        self.assertRegex(text, rb"\* OK \[PERMANENTFLAGS \(.*\\\*\)\] \w+")
        self.assertRegex(text, rb"\* OK \[UIDVALIDITY %d\] \w+" % validity)
        self.assertRegex(text, rb"\* OK \[UIDNEXT 3\] \w+")
        self.assertTrue(lines[-1].startswith(b"a OK [READ-WRITE]"))

    @inlineCallbacks
    def test_examineReadOnly(self):
        """
        EXAMINE is READ-ONLY: STORE gets NO and BODY[] does not set \\Seen.
        """
        yield self.announce(1)
        client = yield self.inThread(self.raw)
        lines = yield self.inThread(client.command, b"a", b"EXAMINE INBOX")
        self.assertTrue(lines[-1].startswith(b"a OK [READ-ONLY]"))
        self.assertIn(b"* OK [PERMANENTFLAGS ()] Read-only mailbox", lines)
        lines = yield self.inThread(client.command, b"b", b"STORE 1 +FLAGS (\\Seen)")
        self.assertTrue(lines[-1].startswith(b"b NO"))
        lines = yield self.inThread(client.command, b"c", b"FETCH 1 BODY[]")
        self.assertTrue(lines[-1].startswith(b"c OK"))
        self.assertEqual(self.store.record("INBOX", 1).flags, frozenset())

    @inlineCallbacks
    def test_status(self):
        """
        STATUS reports the items asked for.
        """
        yield self.announce(1, 2, 3)
        yield self.store.setFlags("INBOX", [2], ["\\Seen"], "add")

        def session():
            return self.imap().status(
                "INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)"
            )

        typ, data = yield self.inThread(session)
        self.assertEqual(typ, "OK")
        self.assertEqual(
            data[0],
            b'"INBOX" (MESSAGES 3 RECENT 0 UIDNEXT 4 UIDVALIDITY %d UNSEEN 2)'
            % self.store.uidValidity("INBOX"),
        )

    # -- FETCH and pulling ---------------------------------------------

    @inlineCallbacks
    def test_headerItemsNeverPull(self):
        """
        Header-only items of a message not held never ask for its body; the
        header sections are the stored bytes, the blank line included.
        """
        yield self.announce(1)
        data = self.bodies[1]

        def session():
            client = self.imap()
            client.select("INBOX")
            return client.fetch(
                "1",
                "(FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE RFC822.HEADER "
                "BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (subject received)])",
            )

        typ, answer = yield self.inThread(session)
        self.assertEqual(self.fetched, [])
        self.assertEqual(typ, "OK")
        first, header, fields = answer[0], answer[1], answer[2]
        self.assertIn(b"RFC822.SIZE %d" % len(data), first[0])
        self.assertIn(
            b'ENVELOPE ("Mon, 1 Jan 2024 10:00:00 +0000" "Hello 1" (("Bob" NIL "bob" '
            b'"demo")) (("Bob" NIL "bob" "demo")) (("Bob" NIL "bob" "demo")) '
            b'((NIL NIL "alice" "demo")) NIL NIL NIL "<1@demo>")',
            first[0],
        )
        self.assertEqual(first[1], headersOf(data))
        self.assertEqual(header[1], headersOf(data))
        self.assertEqual(
            fields[1],
            b"Received: from a by b\r\nReceived: from c by d\r\nSubject: Hello 1\r\n\r\n",
        )
        self.assertIn(b"X-CaSe: Kept", first[1])

    @inlineCallbacks
    def test_noDelay(self):
        """
        IMAP connections have TCP_NODELAY: a tagged reply sent after the
        data it ends does not wait for the client's delayed ACK.
        """
        client = yield self.inThread(self.raw, False)
        self.assertTrue(client.greeting.startswith(b"* OK"))
        [server] = self.servers
        handle = server.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_largeSends(self):
        """
        IMAP connections send up to L{transports.SEND_LIMIT} bytes at a
        time: a message of a megabyte goes out in one send.
        """
        client = yield self.inThread(self.raw, False)
        self.assertTrue(client.greeting.startswith(b"* OK"))
        [server] = self.servers
        self.assertEqual(server.transport.SEND_LIMIT, transports.SEND_LIMIT)

    @inlineCallbacks
    def test_seenStoredBeforeOK(self):
        """
        The responses of a FETCH that sets \\Seen go while the flag is
        stored, showing it; the OK waits until it is stored, and a failure
        to store it makes the command NO.
        """
        yield self.announce(1, 2)
        gates = []
        real = self.store.setFlags

        def setFlags(*args):
            gate = Deferred()
            gates.append(gate)
            return gate.addCallback(lambda _: real(*args))

        self.store.setFlags = setFlags
        client = yield self.inThread(self.raw)
        yield self.inThread(client.command, b"s", b"SELECT INBOX")

        def untilResponse(tag):
            client.send(tag + b" FETCH 1 (BODY[])\r\n")
            line = client.readLine()
            m = re.search(rb"\{(\d+)\}$", line)
            return line + client.file.read(int(m.group(1))) + client.readLine()

        response = yield self.inThread(untilResponse, b"f")
        self.assertIn(b"FLAGS (\\Seen)", response)
        self.assertIn(self.bodies[1], response)
        while not gates:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.store.record("INBOX", 1).flags, frozenset())
        gates[0].callback(None)
        [ok] = yield self.inThread(client.response, b"f")
        self.assertTrue(ok.startswith(b"f OK"), ok)
        self.assertEqual(self.store.record("INBOX", 1).flags, {"\\Seen"})
        # Storing the flag fails: the body still comes, the command is NO.
        self.store.setFlags = lambda *args: fail(DiskFull("no room"))
        lines = yield self.inThread(client.command, b"g", b"FETCH 2 (BODY[])")
        self.assertIn(self.bodies[2], lines[0])
        self.assertTrue(lines[-1].startswith(b"g NO"), lines[-1])
        self.assertEqual(self.store.record("INBOX", 2).flags, frozenset())

    @inlineCallbacks
    def test_bodyPulledOnceExactAndSeen(self):
        """
        BODY[] pulls the body once, returns its exact bytes and sets
        \\Seen (reported in the same response); BODY.PEEK[] does not.
        """
        yield self.announce(1, 2)

        def session():
            client = self.imap()
            client.select("INBOX")
            peek = client.fetch("2", "(BODY.PEEK[])")
            first = client.fetch("1", "(BODY[])")
            second = client.fetch("1", "(BODY[])")
            return peek, first, second

        peek, first, second = yield self.inThread(session)
        self.assertEqual(sorted(self.fetched), [1, 2])
        self.assertEqual(peek[1][0][1], self.bodies[2])
        self.assertEqual(first[1][0][1], self.bodies[1])
        self.assertEqual(second[1][0][1], self.bodies[1])
        self.assertIn(b"FLAGS (\\Seen)", first[1][1])
        self.assertEqual(self.store.record("INBOX", 1).flags, {"\\Seen"})
        self.assertEqual(self.store.record("INBOX", 2).flags, frozenset())

    @inlineCallbacks
    def test_okOnceWritten(self):
        """
        A body pulled into memory is sent at once, but FETCH says OK only
        once the store has written it: a crash before leaves a client that
        asks again.
        """
        [uid] = yield self.announce(1)
        self.assertEqual(uid % 2, 1, "the fake puller returns odd UIDs' messages as bytes")
        disk = threading.Event()
        take = self.store._files.takeBytes

        def slowDisk(data, headers):
            disk.wait(10)
            return take(data, headers)

        self.store._files.takeBytes = slowDisk

        def session():
            client = self.raw()
            client.command(b"S", b"SELECT INBOX")
            client.send(b"F UID FETCH 1 (BODY.PEEK[])\r\n")
            first = client.readLine()
            client.file.read(int(re.search(rb"\{(\d+)\}$", first).group(1)))
            client.readLine()
            # Nothing else comes while the disk hangs (the OK would be the
            # next thing sent, so nothing of it can be buffered yet).
            early = select.select([client.sock], [], [], 0.3)[0]
            held = self.store.record("INBOX", uid).held
            disk.set()
            return early, held, client.readLine()

        early, held, tagged = yield self.inThread(session)
        self.assertEqual((early, held), ([], False))
        self.assertTrue(tagged.startswith(b"F OK"), tagged)
        self.assertTrue(self.store.record("INBOX", uid).held)

    @inlineCallbacks
    def test_fetchInWindows(self):
        """
        A FETCH of more bodies than L{imapselected.BODY_WINDOW} holds answers each
        message once, in order, marked seen; one that cannot be pulled, in
        the second window, is left out and the command says NO
        [UNAVAILABLE].
        """
        numbers = list(range(1, 36))
        uids = yield self.announce(*numbers)
        perWindow = 16
        self.patch(imapselected, "BODY_WINDOW", perWindow * len(self.bodies[1]))
        self.failFor = {perWindow + 2}

        def session():
            client = self.imap()
            client.select("INBOX")
            typ, data = client.uid("FETCH", "1:*", "(BODY[])")
            return typ, data, client.untagged_responses.pop("FETCH", [])

        typ, why, answer = yield self.inThread(session)
        self.assertEqual(typ, "NO")
        self.assertTrue(why[-1].startswith(b"[UNAVAILABLE]"), why)
        got = [(int(item[0].split(b"UID ")[1].split()[0]), item[1]) for item in answer if isinstance(item, tuple)]
        expected = [(u, self.bodies[n]) for u, n in zip(uids, numbers) if n not in self.failFor]
        self.assertEqual(got, expected)
        for u, n in zip(uids, numbers):
            self.assertEqual(self.store.record("INBOX", u).flags, frozenset() if n in self.failFor else {"\\Seen"})

    @inlineCallbacks
    def test_fetchTwoWindowsAhead(self):
        """
        A FETCH of many windows asks for the bodies of the first two at
        once (the second's pulls keep the receiver busy while the first's
        finish), and for each next one only once the one before it is
        sent: two windows' worth at most are held.
        """
        numbers = list(range(1, 41))
        uids = yield self.announce(*numbers)
        perWindow = 10
        self.patch(imapselected, "BODY_WINDOW_MESSAGES", perWindow)
        held: list = []
        asked: list = []

        def gated(mailbox, record):
            asked.append(record.uid)
            d = Deferred()
            held.append((d, self.bodies[record.meta["n"]]))
            return d

        self.store.bodyFetcher = gated

        def session():
            client = self.imap()
            client.select("INBOX")
            return client.uid("FETCH", "1:*", "(BODY[])")

        fetching = self.inThread(session)

        @inlineCallbacks
        def settle():
            # Until nothing more is asked for a while.
            count = -1
            while count != len(asked):
                count = len(asked)
                yield deferLater(reactor, 0.1, lambda: None)

        yield settle()
        self.assertEqual(asked, uids[: 2 * perWindow])
        for window in range(len(numbers) // perWindow):
            # Release this window's bodies: once it is sent, the one two
            # ahead of it is asked for.
            while held and len(asked) - len(held) < (window + 1) * perWindow:
                d, body = held.pop(0)
                d.callback(body)
            yield settle()
            self.assertEqual(len(asked), min(len(numbers), (window + 3) * perWindow))
        while held:
            d, body = held.pop(0)
            d.callback(body)
        typ, answer = yield fetching
        self.assertEqual(typ, "OK")
        got = [item[1] for item in answer if isinstance(item, tuple)]
        self.assertEqual(got, [self.bodies[n] for n in numbers])

    @inlineCallbacks
    def test_fetchAnswersEachBodyAsItComes(self):
        """
        A FETCH answers for a message as soon as its body is had, not once
        the last one of its window is; the flags and the OK come after
        all, with C{\\Seen} stored for every message sent.
        """
        yield self.announce(1, 2, 3)
        held: list = []

        def gated(mailbox, record):
            d = Deferred()
            held.append((d, self.bodies[record.meta["n"]]))
            return d

        self.store.bodyFetcher = gated
        client = yield self.inThread(self.raw)
        ok = yield self.inThread(client.command, b"S", b"SELECT INBOX")
        self.assertTrue(ok[-1].startswith(b"S OK"), ok)
        client.send(b"F FETCH 1:3 (BODY[])\r\n")
        for _ in range(100):
            if len(held) == 3:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(held), 3)  # all three asked for at once
        d, body = held[0]
        d.callback(body)
        first = yield self.inThread(client.readLine)
        # The first response, with its body, while the others are still
        # being pulled.
        self.assertTrue(first.startswith(b"* 1 FETCH (BODY[] {%d}" % len(body)), first)
        self.assertEqual((yield self.inThread(client.file.read, len(body))), body)
        self.assertEqual((yield self.inThread(client.readLine)), b" FLAGS (\\Seen))")
        for d, body in held[1:]:
            d.callback(body)
        rest = yield self.inThread(client.response, b"F")
        self.assertEqual([line.split(b" (")[0] for line in rest], [b"* 2 FETCH", b"* 3 FETCH", b"F OK FETCH completed"])
        records = [self.store.record("INBOX", u) for u in (1, 2, 3)]
        self.assertEqual([r.flags for r in records], [{"\\Seen"}] * 3)

    @inlineCallbacks
    def test_unavailableThenLater(self):
        """
        A body that cannot be pulled gives C{NO [UNAVAILABLE]}; a later
        FETCH tries again.
        """
        yield self.announce(1)
        self.failNext = 1

        def session():
            client = self.imap()
            client.select("INBOX")
            failed = client.fetch("1", "(BODY.PEEK[TEXT])")
            later = client.fetch("1", "(BODY.PEEK[TEXT])")
            return failed, later

        failed, later = yield self.inThread(session)
        self.assertEqual(failed[0], "NO")
        self.assertTrue(failed[1][-1].startswith(b"[UNAVAILABLE]"), failed)
        self.assertEqual(later[0], "OK")
        self.assertEqual(later[1][0][1], b"Body of message 1.\r\n")
        self.assertEqual(self.fetched, [1, 1])

    def test_sectionsAndStructure(self):
        """
        Numbered parts, MIME headers, attached messages, partial fetches
        and BODYSTRUCTURE come from the stored bytes.
        """
        return self.store.append("INBOX", MULTIPART).addCallback(lambda _: self.checkSections())

    @inlineCallbacks
    def test_sectionsAndStructureWhileWritten(self):
        """
        The same for a message just pulled, which the store serves from
        memory while it writes it.
        """
        self.bodies = {1: MULTIPART}
        uid = yield self.store.deliver("INBOX", headersOf(MULTIPART), len(MULTIPART), {"n": 1})
        self.assertEqual(uid % 2, 1, "the fake puller returns odd UIDs' messages as bytes")
        yield self.checkSections()
        self.assertEqual(self.fetched, [uid])

    @inlineCallbacks
    def checkSections(self):
        def session():
            client = self.imap()
            client.select("INBOX")
            return client.fetch(
                "1",
                "(BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2.HEADER] "
                "BODY.PEEK[2.TEXT] BODY.PEEK[2.1] BODY.PEEK[]<0.10> RFC822.TEXT)",
            )

        typ, answer = yield self.inThread(session)
        self.assertEqual(typ, "OK")
        self.assertIn(
            b'BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 10 1',
            answer[0][0],
        )
        self.assertIn(b'"MIXED" ("BOUNDARY" "BB")', answer[0][0])
        values = [part[1] for part in answer[:-1]]
        self.assertEqual(
            values,
            [
                b"first part",
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
                b"Subject: inner\r\n\r\n",
                b"inner text",
                b"inner text",
                MULTIPART[:10],
                MULTIPART[len(headersOf(MULTIPART)) :],
            ],
        )
        self.assertIn(b"BODY[]<0>", answer[5][0])

    @inlineCallbacks
    def test_hugeRangesAnswerQuickly(self):
        """
        Enormous sequence and UID ranges are clamped to the messages held.
        """
        yield self.announce(1, 2)

        def session():
            client = self.imap()
            client.select("INBOX")
            started = time.monotonic()
            results = [
                client.fetch("1:99999999999999999999", "(FLAGS)"),
                client.uid("FETCH", "1:4294967295", "(FLAGS)"),
                client.fetch("*", "(UID)"),
                client.uid("FETCH", "99999999999999999999999:*", "(FLAGS)"),
            ]
            return results, time.monotonic() - started

        results, elapsed = yield self.inThread(session)
        self.assertLess(elapsed, 5)
        self.assertEqual([len(r[1]) for r in results], [2, 2, 1, 1])
        self.assertEqual(results[2][1], [b"2 (UID 2)"])

    # -- STORE, SEARCH, COPY, EXPUNGE ------------------------------------

    @inlineCallbacks
    def test_store(self):
        """
        STORE and UID STORE set, add and remove flags; .SILENT says nothing.
        """
        yield self.announce(1, 2)

        def session():
            client = self.imap()
            client.select("INBOX")
            return [
                client.store("1", "+FLAGS", "(\\Flagged work)"),
                client.store("1", "-FLAGS", "work"),
                client.uid("STORE", "2", "FLAGS", "(\\Answered)"),
                client.store("1:2", "+FLAGS.SILENT", "(\\Seen)"),
            ]

        results = yield self.inThread(session)
        self.assertEqual(results[0][1], [b"1 (FLAGS (\\Flagged work))"])
        self.assertEqual(results[1][1], [b"1 (FLAGS (\\Flagged))"])
        self.assertEqual(results[2][1], [b"2 (FLAGS (\\Answered) UID 2)"])
        self.assertEqual(results[3], ("OK", [None]))
        self.assertEqual(self.store.record("INBOX", 1).flags, {"\\Flagged", "\\Seen"})
        self.assertEqual(self.store.record("INBOX", 2).flags, {"\\Answered", "\\Seen"})

    @inlineCallbacks
    def test_search(self):
        """
        SEARCH keys are evaluated over the store; TEXT on a message not
        held searches its headers and never pulls it.
        """
        day = 86400
        now = time.time()
        self.bodies = {}
        held = message(1, "Lunch", "carol@demo", b"Let us eat pizza.\r\n")
        yield self.store.append("INBOX", held, ["\\Seen"], now - 10 * day)
        yield self.announce(2, 3)
        yield self.store.setFlags("INBOX", [3], ["\\Flagged"], "add")

        yesterday = time.strftime("%d-%b-%Y", time.gmtime(now - day))
        tenDaysAgo = time.strftime("%d-%b-%Y", time.gmtime(now - 10 * day))
        expected = [
            (("FROM", "carol"), b"1"),
            (("SUBJECT", "hello"), b"2 3"),
            (("TEXT", "pizza"), b"1"),
            (("TEXT", "Hello 2"), b"2"),
            (("BODY", "pizza"), b"1"),
            (("SEEN",), b"1"),
            (("UNSEEN",), b"2 3"),
            (("SINCE", yesterday), b"2 3"),
            (("BEFORE", yesterday), b"1"),
            (("ON", tenDaysAgo), b"1"),
            (("UID", "2:*"), b"2 3"),
            (("OR", "FLAGGED", "SEEN"), b"1 3"),
            (("NOT", "FLAGGED"), b"1 2"),
            (("HEADER", "X-CaSe", "kept"), b"1 2 3"),
            (("LARGER", "300"), b""),
            (("SMALLER", "300"), b"1 2 3"),
            (("2:3", "UNFLAGGED"), b"2"),
            (("CHARSET", "UTF-8", "SUBJECT", "lunch"), b"1"),
            (("SENTSINCE", "1-Jan-2024"), b"1 2 3"),
            (("SENTBEFORE", "1-Jan-2024"), b""),
        ]

        def session():
            client = self.imap()
            client.select("INBOX")
            results = [client.search(None, *q)[1][0] for q, _ in expected]
            results.append(client.uid("SEARCH", "SUBJECT", "hello")[1][0])
            return results

        results = yield self.inThread(session)
        self.assertEqual(results, [answer for _, answer in expected] + [b"2 3"])
        self.assertEqual(self.fetched, [])

        def opened():
            # Once opened, bodies are searched: UID 3's (pulled as bytes) is
            # kept in the store's database, UID 2's in a file.
            client = self.imap()
            client.select("INBOX")
            client.fetch("2:3", "(BODY[])")
            return [client.search(None, *q)[1][0] for q in (("BODY", '"message 3"'), ("TEXT", '"body of MESSAGE"'))]

        results = yield self.inThread(opened)
        self.assertEqual(results, [b"3", b"2 3"])
        self.assertIsNone(self.store.filePath("INBOX", 3))
        self.assertIsNotNone(self.store.filePath("INBOX", 2))

    @inlineCallbacks
    def test_copy(self):
        """
        COPY answers COPYUID; the copies keep flags, headers and meta.
        """
        yield self.announce(1, 2)
        yield self.store.setFlags("INBOX", [2], ["\\Seen"], "add")

        def session():
            client = self.imap()
            client.select("INBOX")
            return client.copy("1:2", "Sent"), client.copy("1", "Nowhere")

        (typ, data), (bad, _) = yield self.inThread(session)
        self.assertEqual(typ, "OK")
        self.assertTrue(
            data[0].startswith(b"[COPYUID %d 1:2 1:2]" % self.store.uidValidity("Sent"))
        )
        self.assertEqual(bad, "NO")
        copies = self.store.messages("Sent")
        self.assertEqual([r.flags for r in copies], [frozenset(), {"\\Seen"}])
        self.assertEqual([r.meta for r in copies], [{"n": 1}, {"n": 2}])

    @inlineCallbacks
    def test_expungeCallsHook(self):
        """
        EXPUNGE removes the \\Deleted messages through the store, which
        calls the expunge hook first, and reports C{* n EXPUNGE}.
        """
        yield self.announce(1, 2, 3)
        client = yield self.inThread(self.raw)

        def session():
            client.command(b"a", b"SELECT INBOX")
            client.command(b"b", b"STORE 1,3 +FLAGS.SILENT (\\Deleted)")
            return client.command(b"c", b"EXPUNGE")

        lines = yield self.inThread(session)
        self.assertEqual(lines[:2], [b"* 3 EXPUNGE", b"* 1 EXPUNGE"])
        self.assertTrue(lines[-1].startswith(b"c OK"))
        self.assertEqual(self.hooked, [("INBOX", [1, 3])])
        self.assertEqual(self.store.uids("INBOX"), [2])

    @inlineCallbacks
    def test_otherSessionExpunge(self):
        """
        After B expunges message 1, A's sequence numbers keep naming what
        they named until A may be told: STORE 2 changes UID 2, never UID 3;
        NOOP then reports the EXPUNGE.
        """
        yield self.announce(1, 2, 3)
        a = yield self.inThread(self.raw)
        b = yield self.inThread(self.raw)

        def session():
            a.command(b"a1", b"SELECT INBOX")
            b.command(b"b1", b"SELECT INBOX")
            b.command(b"b2", b"STORE 1 +FLAGS (\\Deleted)")
            b.command(b"b3", b"EXPUNGE")
            b.command(b"b4", b"STORE 2 +FLAGS.SILENT (\\Draft)")  # UID 3 for B
            store = a.command(b"a2", b"STORE 2 +FLAGS (\\Flagged)")
            fetch = a.command(b"a3", b"FETCH 1:* (UID)")
            noop = a.command(b"a4", b"NOOP")
            after = a.command(b"a5", b"STORE 2 +FLAGS (\\Answered)")
            return store, fetch, noop, after

        store, fetch, noop, after = yield self.inThread(session)
        self.assertFalse([line for line in store + fetch if line.endswith(b" EXPUNGE")])
        self.assertIn(b"* 2 FETCH (UID 2)", fetch)
        self.assertTrue(
            store[-1].startswith(b"a2 OK") or store[-1].startswith(b"a2 NO")
        )
        self.assertIn(b"* 1 EXPUNGE", noop)
        self.assertIn(b"* 3 FETCH (FLAGS (\\Draft))", store)
        self.assertTrue(after[-1].startswith(b"a5 OK"))
        self.assertEqual(self.store.record("INBOX", 2).flags, {"\\Flagged"})
        self.assertEqual(self.store.record("INBOX", 3).flags, {"\\Answered", "\\Draft"})

    @inlineCallbacks
    def test_idle(self):
        """
        A message delivered during IDLE is announced with C{* n EXISTS};
        another session's expunge with C{* n EXPUNGE}.
        """
        yield self.announce(1)
        client = yield self.inThread(self.raw)
        other = yield self.inThread(self.raw)

        def session():
            client.command(b"a", b"SELECT INBOX")
            client.send(b"b IDLE\r\n")
            self.assertEqual(client.readLine(), b"+ idling")
            blockingCallFromThread(
                reactor, self.store.deliver, "INBOX", b"Subject: new\r\n\r\n", 20, {}
            )
            exists = client.readLine()
            other.command(b"o1", b"SELECT INBOX")
            other.command(b"o2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            other.command(b"o3", b"EXPUNGE")
            lines = [client.readLine(), client.readLine()]
            client.send(b"DONE\r\n")
            return exists, lines, client.response(b"b")

        exists, lines, done = yield self.inThread(session)
        self.assertEqual(exists, b"* 2 EXISTS")
        self.assertIn(b"* 1 EXPUNGE", lines)
        self.assertTrue(done[-1].startswith(b"b OK"))

    # -- APPEND ----------------------------------------------------------

    @inlineCallbacks
    def test_append(self):
        """
        APPEND without flags works and answers APPENDUID; EXISTS is sent
        only for the selected mailbox.
        """

        def session():
            client = self.imap()
            client.select("INBOX")
            client.untagged_responses.pop("EXISTS", None)
            inbox = client.append("INBOX", None, None, message(1))
            exists = client.untagged_responses.pop("EXISTS", None)
            sent = client.append("Sent", "(\\Seen)", None, message(2))
            return inbox, exists, sent, client.untagged_responses.get("EXISTS")

        inbox, exists, sent, after = yield self.inThread(session)
        self.assertEqual(
            inbox,
            (
                "OK",
                [
                    b"[APPENDUID %d 1] APPEND completed"
                    % self.store.uidValidity("INBOX")
                ],
            ),
        )
        self.assertEqual(exists, [b"1"])
        self.assertEqual(sent[0], "OK")
        self.assertIsNone(after)
        self.assertEqual(self.store.record("Sent", 1).flags, {"\\Seen"})
        self.assertEqual(self.store.record("INBOX", 1).headers, headersOf(message(1)))

    @inlineCallbacks
    def test_appendTooBig(self):
        """
        A literal over the size limit gets C{NO [TOOBIG]} before it is sent,
        C{{4294967296}} included; the session goes on.
        """
        self.factory.maxMessageSize = 1000
        client = yield self.inThread(self.raw)

        def session():
            big = client.command(b"a", b"APPEND INBOX {4294967296}")
            small = client.command(b"b", b"APPEND INBOX (\\Seen) {1001}")
            return big, small, client.command(b"c", b"NOOP")

        big, small, noop = yield self.inThread(session)
        self.assertEqual(len(big), 1)
        self.assertTrue(big[0].startswith(b"a NO [TOOBIG]"))
        self.assertTrue(small[0].startswith(b"b NO [TOOBIG]"))
        self.assertTrue(noop[-1].startswith(b"c OK"))
        self.assertEqual(self.store.messages("INBOX"), [])

    # -- robustness ----------------------------------------------------

    @inlineCallbacks
    def test_malformedCommands(self):
        """
        Each malformed command gets exactly one tagged BAD; the session
        goes on.
        """
        yield self.announce(1)
        client = yield self.inThread(self.raw)
        commands = [
            b"STATUS INBOX (FOO)",
            b"SEARCH (",
            b"SEARCH OR",
            b"SEARCH",
            b"STORE 1 FLAGS",
            b"FETCH 1 (FOO)",
            b"FETCH 1 BODY[",
            b"FETCH 0 FLAGS",
            b"FETCH 1",
            b"UID FOO 1",
            b"FROB",
            b"SEARCH SINCE 31-Foo-2020",
            b"STORE 1 FLAGS (\\Bogus)",
            b"FETCH 1 BODY[HEADER.FIELDS (a b]",
            b"SELECT",
            b"LIST",
            b"FETCH 1:" + b"9" * 5000 + b" FLAGS",
            b"SEARCH LARGER " + b"9" * 5000,
            b"FETCH 1 BODY[1234567890]",
            b"STATUS INBOX ()",
            b"SEARCH NOT NOT NOT" + b" NOT" * 100 + b" ALL",
        ]

        def session():
            client.command(b"s", b"SELECT INBOX")
            answers = [client.command(b"t%d" % i, c) for i, c in enumerate(commands)]
            return answers, client.command(b"z", b"NOOP")

        answers, noop = yield self.inThread(session)
        for i, lines in enumerate(answers):
            self.assertEqual(len(lines), 1, (commands[i], lines))
            self.assertTrue(lines[0].startswith(b"t%d BAD " % i), (commands[i], lines))
        self.assertTrue(noop[-1].startswith(b"z OK"))

    @inlineCallbacks
    def test_longLines(self):
        """
        A command line of 64 KiB is read; a longer one gets BAD, not a
        disconnect.
        """
        client = yield self.inThread(self.raw)
        long = b"a" * (64 * 1024 - 100)

        def session():
            ok = client.command(b"a", b'SELECT "%s"' % long)
            bad = client.command(b"b", b"SELECT " + b"x" * (70 * 1024))
            return ok, bad, client.command(b"c", b"NOOP")

        ok, bad, noop = yield self.inThread(session)
        self.assertTrue(ok[-1].startswith(b"a NO"))
        self.assertEqual(bad, [b"b BAD Command line too long"])
        self.assertTrue(noop[-1].startswith(b"c OK"))

    @inlineCallbacks
    def test_pipelinedAfterSelect(self):
        """
        Commands sent together run in order, each answered.
        """
        yield self.announce(1)
        client = yield self.inThread(self.raw)

        def session():
            client.send(b"a SELECT INBOX\r\nb FETCH 1 (UID)\r\nc NOOP\r\n")
            return client.response(b"a"), client.response(b"b"), client.response(b"c")

        a, b, c = yield self.inThread(session)
        self.assertTrue(a[-1].startswith(b"a OK"))
        self.assertEqual(b, [b"* 1 FETCH (UID 1)", b"b OK FETCH completed"])
        self.assertTrue(c[-1].startswith(b"c OK"))

    @inlineCallbacks
    def test_deepMime(self):
        """
        BODYSTRUCTURE of a message nested 2000 deep is answered (the depth
        is capped), not a crash.
        """
        depth = 2000
        head = b"".join(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
            for i in range(depth)
        )
        tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
        data = b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\nx" + tail
        yield self.store.append("INBOX", data)

        def session():
            client = self.imap()
            client.select("INBOX")
            return client.fetch("1", "(BODYSTRUCTURE)")

        typ, answer = yield self.inThread(session)
        self.assertEqual(typ, "OK")
        self.assertLessEqual(answer[0].count(b"("), 3 * MAX_MIME_DEPTH + 10)

    @inlineCallbacks
    def test_starttlsDropsBufferedInput(self):
        """
        Commands sent in the same packet as STARTTLS are dropped, not run
        inside TLS.
        """
        from twisted.internet.ssl import PrivateCertificate
        from twisted.test import __file__ as testDir

        yield self.stopServer()
        pem = os.path.join(os.path.dirname(testDir), "server.pem")
        with open(pem, "rb") as f:
            options = PrivateCertificate.loadPEM(f.read()).options()
        yield self.startServer(tlsOptions=options)
        client = yield self.inThread(self.raw, False)

        def session():
            caps = client.command(b"a", b"CAPABILITY")
            client.send(
                b"b STARTTLS\r\nc LOGIN %s %s\r\n" % (USER.encode(), PASSWORD.encode())
            )
            started = client.readLine()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.sock = context.wrap_socket(client.sock)
            client.file = client.sock.makefile("rb")
            lines = client.command(b"d", b"SELECT INBOX")
            after = client.command(b"e", b"CAPABILITY")
            client.login()
            client.command(b"f", b"SELECT INBOX")
            return caps, started, lines, after, client.command(b"g", b"FETCH 1 BODY[]")

        yield self.store.append("INBOX", MULTIPART)
        caps, started, lines, after, fetched = yield self.inThread(session)
        self.assertIn(MULTIPART, fetched[0])
        self.assertTrue(fetched[-1].startswith(b"g OK"))
        self.assertIn(b"STARTTLS", caps[0])
        self.assertEqual(started, b"b OK Begin TLS negotiation now")
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith(b"d BAD"), lines)
        self.assertNotIn(b"STARTTLS", after[0])

    @inlineCallbacks
    def test_restartKeepsState(self):
        """
        After a restart UIDs, flags and UIDVALIDITY are the same over IMAP.
        """
        yield self.announce(1, 2, 3)
        yield self.store.expunge("INBOX", [2])
        yield self.store.setFlags("INBOX", [3], ["\\Seen", "$Label1"], "add")

        def session():
            client = self.imap()
            client.select("INBOX")
            answer = client.fetch("1:*", "(UID FLAGS)")[1]
            client.logout()
            return answer, client.untagged_responses

        before = yield self.inThread(session)
        validity = self.store.uidValidity("INBOX")
        yield self.stopServer()
        yield self.startServer()
        after = yield self.inThread(session)
        self.assertEqual(after[0], before[0])
        self.assertEqual(
            before[0], [b"1 (UID 1 FLAGS ())", b"2 (UID 3 FLAGS ($Label1 \\Seen))"]
        )
        self.assertEqual(self.store.uidValidity("INBOX"), validity)

    @inlineCallbacks
    def test_wrongCredentials(self):
        """
        Wrong credentials get NO (not BAD, not a disconnect), by LOGIN and
        by AUTHENTICATE PLAIN.
        """
        client = yield self.inThread(self.raw, False)

        def session():
            login = client.command(b"a", b"LOGIN alice@demo wrong")
            plain = b"\0alice@demo\0wrong"
            import base64

            auth = client.command(
                b"b", b"AUTHENTICATE PLAIN " + base64.b64encode(plain)
            )
            return login, auth, client.command(b"c", b"NOOP")

        login, auth, noop = yield self.inThread(session)
        self.assertEqual(login, [b"a NO [AUTHENTICATIONFAILED] Authentication failed"])
        self.assertEqual(auth, [b"b NO [AUTHENTICATIONFAILED] Authentication failed"])
        self.assertTrue(noop[-1].startswith(b"c OK"))
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_uidExpungeAndClose(self):
        """
        UID EXPUNGE removes only the \\Deleted messages named; CLOSE
        expunges the rest silently; nothing goes into the Outbox.
        """
        yield self.announce(1, 2, 3)
        yield self.store.setFlags("INBOX", [1, 2, 3], ["\\Deleted"], "add")
        client = yield self.inThread(self.raw)

        def session():
            client.command(b"a", b"SELECT INBOX")
            expunged = client.command(b"b", b"UID EXPUNGE 2")
            closed = client.command(b"c", b"CLOSE")
            client.send(b"d APPEND Outbox {5}\r\n")
            ready = client.readLine()
            client.send(b"hello\r\n")
            return expunged, closed, [ready, *client.response(b"d")]

        expunged, closed, outbox = yield self.inThread(session)
        self.assertEqual(expunged[0], b"* 2 EXPUNGE")
        self.assertEqual(len(closed), 1)
        self.assertEqual(self.hooked, [("INBOX", [2]), ("INBOX", [1, 3])])
        self.assertTrue(outbox[0].startswith(b"+"), outbox)
        self.assertTrue(outbox[1].startswith(b"d NO [CANNOT]"), outbox)

    @inlineCallbacks
    def test_largeBodyStreamed(self):
        """
        A large body is sent whole and exact.
        """
        body = b"".join(b"line %07d of a big message\r\n" % i for i in range(300000))
        data = b"Subject: big\r\n\r\n" + body
        yield self.store.append("INBOX", data)

        def session():
            client = self.imap()
            client.select("INBOX")
            return client.fetch("1", "(BODY.PEEK[] RFC822.SIZE)")

        typ, answer = yield self.inThread(session)
        self.assertEqual(typ, "OK")
        self.assertEqual(answer[0][1], data)

    @inlineCallbacks
    def test_appendWithFlagsAndDate(self):
        """
        APPEND takes flags and a date-time; the Outbox refuses new messages.
        """

        def session():
            client = self.imap()
            dated = client.append(
                "INBOX", "(\\Seen $Label1)", '"05-Feb-2024 10:00:00 +0100"', message(1)
            )
            outbox = client.append("Outbox", None, None, message(2))
            return dated, outbox

        dated, outbox = yield self.inThread(session)
        self.assertEqual(dated[0], "OK")
        self.assertEqual(outbox[0], "NO")
        record = self.store.record("INBOX", 1)
        self.assertEqual(record.flags, {"\\Seen", "$Label1"})
        self.assertEqual(record.internalDate, 1707123600.0)
        self.assertEqual(self.store.messages("Outbox"), [])
