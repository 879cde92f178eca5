"""
Twenty IMAP sessions on one mailbox at once, over real TCP, against a real
L{p2pmta.imap} server over a real L{MailStore}, while mail arrives and some
sessions expunge.  Each session keeps its own model of its view (sequence
number to UID) from what the server told it, and checks every response
against it:

  - C{* n EXPUNGE} never comes during FETCH, STORE or SEARCH (RFC 3501
    section 7.4.1), and always names a message of the view;
  - C{* n EXISTS} never shrinks the view;
  - every C{* n FETCH} with a UID names the UID the view says, every
    Message-ID read belongs to that UID;
  - each session flags messages with its own keyword C{$Sk} by sequence
    number; no session ever sees C{$Sk} on a message session k did not
    mean, and the store agrees at the end;
  - after the traffic stops, every view equals the store's mailbox.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from tests.peers import PeerHarness, eventually
from tests.test_hostile_imap import TCPServerMixin
from tests.test_imap import PASSWORD, USER, RawClient

SESSIONS = 20
#: How long the sessions work while mail arrives, in seconds.
DURATION = 8.0

_FETCH = re.compile(rb"\* (\d+) FETCH \((.*)\)\Z", re.DOTALL)
_UID = re.compile(rb"(?:^|[ (])UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
_MESSAGE_ID = re.compile(rb"Message-ID: <([^@>]+)@demo>", re.IGNORECASE)
_BY_SEQUENCE = (b"FETCH", b"STORE", b"SEARCH")


def mail(ident: str, body: bytes = b"") -> bytes:
    return (
        f"From: bob@demo\r\nTo: {USER}\r\nSubject: {ident}\r\n"
        f"Message-ID: <{ident}@demo>\r\n\r\n"
    ).encode() + (body or f"Body of {ident}.\r\n".encode())


def headerSection(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 4]


class Shared:
    """
    What the sessions (threads) and the deliveries (reactor) write down,
    checked at the end.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: uid -> Message-ID, as the store or APPENDUID told it.
        self.truth: dict[int, str] = {}
        #: (uid, Message-ID) as sessions read them.
        self.seen: list[tuple[int, str]] = []
        #: session k -> UIDs it meant to flag with $Sk.
        self.intents: dict[int, set[int]] = {k: set() for k in range(SESSIONS)}
        self.errors: list[str] = []


class ModelSession:
    """
    One client thread: a raw socket and its model of the view.
    """

    def __init__(
        self,
        index: int,
        port: int,
        shared: Shared,
        seed: int,
        credentials: tuple = (USER, PASSWORD),
    ) -> None:
        self.index = index
        self.credentials = credentials
        self.keyword = f"$S{index}"
        self.shared = shared
        self.random = random.Random(seed)
        self.client = RawClient(port)
        self.view: list[int | None] = []
        self.counter = 0
        self.appended = 0

    # -- talking ---------------------------------------------------------

    def fail(self, text: str) -> None:
        raise AssertionError(f"session {self.index}: {text}")

    def run(self, text: bytes) -> tuple[list, bytes]:
        """
        Send one command and apply every untagged response to the view.

        @return: the untagged lines and the tagged completion.
        """
        self.counter += 1
        tag = b"s%dc%d" % (self.index, self.counter)
        self.client.send(tag + b" " + text + b"\r\n")
        lines = self.client.response(tag)
        return self.apply(text, lines[:-1]), lines[-1]

    def apply(self, text: bytes, lines: list) -> list:
        words = text.split()
        name = words[0].upper()
        bySequence = name in _BY_SEQUENCE
        for line in lines:
            if line.endswith(b" EXPUNGE"):
                if bySequence:
                    self.fail(f"EXPUNGE during {text[:40]!r}")
                n = int(line.split()[1])
                if not 1 <= n <= len(self.view):
                    self.fail(f"EXPUNGE {n} outside a view of {len(self.view)}")
                del self.view[n - 1]
            elif line.endswith(b" EXISTS"):
                n = int(line.split()[1])
                if n < len(self.view):
                    self.fail(f"EXISTS {n} shrinks a view of {len(self.view)}")
                self.view.extend([None] * (n - len(self.view)))
            elif (m := _FETCH.match(line)) is not None:
                self.fetched(int(m.group(1)), m.group(2))
        return lines

    def fetched(self, seq: int, items: bytes) -> None:
        if not 1 <= seq <= len(self.view):
            self.fail(f"FETCH {seq} outside a view of {len(self.view)}")
        head = items.split(b"{", 1)[0]
        uid = self.view[seq - 1]
        m = _UID.search(head)
        if m is not None:
            told = int(m.group(1))
            if uid is not None and uid != told:
                self.fail(f"FETCH {seq} says UID {told}, the view says {uid}")
            self.view[seq - 1] = uid = told
        m = _MESSAGE_ID.search(items)
        if m is not None and uid is not None:
            with self.shared.lock:
                self.shared.seen.append((uid, m.group(1).decode()))
        m = _FLAGS.search(head)
        if m is not None and uid is not None:
            for flag in m.group(1).decode().split():
                if flag.startswith("$S"):
                    owner = int(flag[2:])
                    with self.shared.lock:
                        meant = uid in self.shared.intents[owner]
                    if not meant:
                        self.fail(
                            f"{flag} on UID {uid}, never meant by session {owner}"
                        )

    # -- what a session does ---------------------------------------------

    def start(self) -> None:
        user, password = self.credentials
        _, done = self.run(b"LOGIN %s %s" % (user.encode(), password.encode()))
        assert done.split()[1] == b"OK", done
        _, done = self.run(b"SELECT INBOX")
        assert done.split()[1] == b"OK", done
        self.learnUids()

    def learnUids(self) -> None:
        if self.view:
            self.run(b"FETCH 1:* (UID)")

    def known(self) -> list:
        return [(s, u) for s, u in enumerate(self.view, 1) if u is not None]

    def step(self) -> None:
        choice = self.random.random()
        if not self.view or choice < 0.15:
            self.run(b"NOOP" if self.random.random() < 0.7 else b"CHECK")
            self.learnUids()
        elif choice < 0.35:
            low = self.random.randint(1, len(self.view))
            high = min(len(self.view), low + self.random.randint(0, 3))
            what = b"(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
            if self.random.random() < 0.3:
                what = (
                    b"(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] BODY.PEEK[TEXT])"
                )
            self.run(b"FETCH %d:%d %s" % (low, high, what))
        elif choice < 0.55:
            self.flag()
        elif choice < 0.65:
            self.searchMine()
        elif choice < 0.75:
            self.delete()
        elif choice < 0.82:
            self.run(b"UID FETCH 1:* (UID FLAGS)")
        elif choice < 0.88:
            self.append()
        elif choice < 0.93:
            self.idle()
        else:
            self.run(b"UID SEARCH KEYWORD " + self.keyword.encode())

    def flag(self) -> None:
        known = self.known()
        if not known:
            return
        seq, uid = self.random.choice(known)
        with self.shared.lock:
            self.shared.intents[self.index].add(uid)
        untagged, done = self.run(
            b"STORE %d +FLAGS (%s)" % (seq, self.keyword.encode())
        )
        status = done.split()[1]
        if status == b"OK":
            mine = [line for line in untagged if line.startswith(b"* %d FETCH" % seq)]
            if not mine or self.keyword.encode() not in mine[-1]:
                self.fail(f"STORE {seq} (UID {uid}) answered {untagged!r}")
        elif b"[EXPUNGEISSUED]" not in done:
            self.fail(f"STORE {seq} answered {done!r}")

    def searchMine(self) -> None:
        untagged, _ = self.run(b"SEARCH KEYWORD " + self.keyword.encode())
        [found] = [line for line in untagged if line.startswith(b"* SEARCH")]
        with self.shared.lock:
            meant = set(self.shared.intents[self.index])
        for n in found.split()[2:]:
            seq = int(n)
            if not 1 <= seq <= len(self.view):
                self.fail(f"SEARCH found {seq} outside a view of {len(self.view)}")
            uid = self.view[seq - 1]
            if uid is not None and uid not in meant:
                self.fail(f"SEARCH found {seq} (UID {uid}) never flagged by me")

    def delete(self) -> None:
        known = self.known()
        if len(known) < 4:
            return
        seq, uid = self.random.choice(known)
        self.run(b"STORE %d +FLAGS.SILENT (\\Deleted)" % seq)
        if self.random.random() < 0.5:
            self.run(b"UID EXPUNGE %d" % uid)
        else:
            self.run(b"EXPUNGE")

    def append(self) -> None:
        self.appended += 1
        ident = f"c{self.index}-{self.appended}"
        data = mail(ident)
        self.client.send(b"a%d APPEND INBOX {%d}\r\n" % (self.index, len(data)))
        if not self.client.readLine().startswith(b"+"):
            self.fail("APPEND not continued")
        self.client.send(data + b"\r\n")
        lines = self.client.response(b"a%d" % self.index)
        self.apply(b"APPEND", lines[:-1])
        m = re.search(rb"\[APPENDUID \d+ (\d+)\]", lines[-1])
        if m is None:
            self.fail(f"APPEND answered {lines[-1]!r}")
        with self.shared.lock:
            self.shared.truth[int(m.group(1))] = ident

    def idle(self) -> None:
        self.counter += 1
        tag = b"s%di%d" % (self.index, self.counter)
        self.client.send(tag + b" IDLE\r\n")
        if self.client.readLine() != b"+ idling":
            self.fail("IDLE not continued")
        time.sleep(0.05)
        self.client.send(b"DONE\r\n")
        lines = self.client.response(tag)
        self.apply(b"IDLE", lines[:-1])

    def finish(self) -> list:
        """
        After the traffic: NOOP, learn every UID; the view as UIDs.
        """
        self.run(b"NOOP")
        self.learnUids()
        self.run(b"LOGOUT")
        self.client.close()
        return list(self.view)


class ConcurrentSessionsTests(TCPServerMixin, TestCase):
    """
    Twenty sessions on one INBOX while mail arrives and is expunged.
    """

    timeout = 90

    @inlineCallbacks
    def setUp(self):
        yield self.startServer()
        self.shared = Shared()
        self.delivered = 0
        self.store.bodyFetcher = self.pull
        self.clientPool = ThreadPool(
            minthreads=SESSIONS, maxthreads=SESSIONS, name="sessions"
        )
        self.clientPool.start()
        self.addCleanup(self.clientPool.stop)

    def pull(self, mailbox, record):
        """
        The sender's outbox, a little later.
        """
        path = os.path.join(self.dir, f"pulled-{record.uid}")
        with open(path, "wb") as f:
            f.write(mail(record.meta["ident"]))
        return deferLater(reactor, 0.005, lambda: path)

    @inlineCallbacks
    def deliver(self):
        """
        One new message, shown by its headers (as a notification does) or
        whole (as a sent copy is).
        """
        self.delivered += 1
        ident = f"d{self.delivered}"
        data = mail(ident)
        if self.delivered % 3:
            uid = yield self.store.deliver(
                "INBOX", headerSection(data), len(data), {"ident": ident}
            )
        else:
            uid = yield self.store.append("INBOX", data)
        self.shared.truth[uid] = ident

    def session(self, index: int, port: int, deadline: float) -> list:
        model = ModelSession(index, port, self.shared, seed=1000 + index)
        self.clients.append(model.client)
        model.start()
        steps = 0
        while time.monotonic() < deadline:
            model.step()
            steps += 1
        return model, steps

    @inlineCallbacks
    def test_twentySessionsStayConsistent(self):
        """
        Every session's view stays its own and consistent with the server's
        answers; no keyword lands on a message its session did not mean;
        each Message-ID read belongs to its UID; at the end every view is
        the mailbox.
        """
        for _ in range(30):
            yield self.deliver()
        arrivals = LoopingCall(self.deliver)
        arrivals.start(0.02, now=False)
        port = self.port.getHost().port
        deadline = time.monotonic() + DURATION
        try:
            results = yield gatherResults(
                [
                    deferToThreadPool(
                        reactor, self.clientPool, self.session, index, port, deadline
                    )
                    for index in range(SESSIONS)
                ],
                consumeErrors=True,
            )
        finally:
            arrivals.stop()
        # Let the last delivery land, then every session catches up.
        yield deferLater(reactor, 0.1, lambda: None)
        views = yield gatherResults(
            [
                deferToThreadPool(reactor, self.clientPool, model.finish)
                for model, _ in results
            ]
        )
        uids = self.store.uids("INBOX")
        for index, view in enumerate(views):
            self.assertEqual(view, uids, f"session {index}")
        for uid, ident in self.shared.seen:
            self.assertEqual(self.shared.truth.get(uid), ident, uid)
        for record in self.store.messages("INBOX"):
            for flag in record.flags:
                if flag.startswith("$S"):
                    self.assertIn(record.uid, self.shared.intents[int(flag[2:])])
        steps = sum(n for _, n in results)
        self.assertGreater(steps, SESSIONS * 10)
        self.assertGreater(self.delivered, 100)
        self.assertGreater(len(self.shared.seen), 100)
        flagged = [
            r
            for r in self.store.messages("INBOX")
            if any(f.startswith("$S") for f in r.flags)
        ]
        self.assertTrue(flagged)
        self.assertEqual(self.flushLoggedErrors(), [])


class RealPeerSessionsTests(TestCase):
    """
    Twenty sessions on a real peer's INBOX while another real peer sends
    to it over SMTP, the DHT and its outbox, and bodies are pulled and
    expunged for real.
    """

    timeout = 120

    def test_twentySessionsOnARealPeer(self):
        """
        The same checks as L{ConcurrentSessionsTests}, with the mail
        arriving through the real receiving pipeline.
        """
        return Deferred.fromCoroutine(self._twentySessions())

    async def _twentySessions(self):
        harness = PeerHarness(self)
        await harness.start("alice")
        bob = await harness.start("bob")
        store = bob.mailStore
        shared = Shared()
        arrived = []

        def added(event, uid):
            record = store.record("INBOX", uid)
            if event == "added" and record is not None:
                m = _MESSAGE_ID.search(record.headers)
                with shared.lock:
                    shared.truth[uid] = m.group(1).decode() if m else None
                if "incoming" in record.meta:
                    arrived.append(uid)

        store.addListener("INBOX", added)
        self.addCleanup(store.removeListener, "INBOX", added)
        sent = 0

        async def send():
            nonlocal sent
            sent += 1
            data = mail(f"p{sent}").replace(b"From: bob@demo", b"From: alice@demo")
            self.assertEqual(await harness.send("alice", ["bob@demo"], data), {})

        for _ in range(5):
            await send()
        await harness.listed("bob", 5)
        pool = ThreadPool(
            minthreads=SESSIONS, maxthreads=SESSIONS, name="peer-sessions"
        )
        pool.start()
        self.addCleanup(pool.stop)
        clients: list = []

        def closeClients():
            for client in clients:
                try:
                    client.close()
                except OSError:
                    pass

        self.addCleanup(closeClients)
        port = harness.port("bob", "imap")
        credentials = ("bob@demo", harness.configs["bob"].password)
        deadline = time.monotonic() + DURATION * 0.75

        def session(index):
            model = ModelSession(index, port, shared, 2000 + index, credentials)
            clients.append(model.client)
            model.start()
            steps = 0
            while time.monotonic() < deadline:
                model.step()
                steps += 1
            return model, steps

        working = gatherResults(
            [deferToThreadPool(reactor, pool, session, i) for i in range(SESSIONS)],
            consumeErrors=True,
        )
        while time.monotonic() < deadline:
            await send()
        results = await working

        async def allArrived():
            return len(arrived) >= sent

        await eventually(allArrived, timeout=30)
        told = [shared.truth.get(uid) for uid in arrived]
        self.assertEqual(len(told), len(set(told)), "a message shown twice in INBOX")
        views = await gatherResults(
            [deferToThreadPool(reactor, pool, model.finish) for model, _ in results]
        )
        uids = store.uids("INBOX")
        for index, view in enumerate(views):
            self.assertEqual(view, uids, f"session {index}")
        for uid, ident in shared.seen:
            self.assertEqual(shared.truth.get(uid), ident, uid)
        for record in store.messages("INBOX"):
            for flag in record.flags:
                if flag.startswith("$S"):
                    self.assertIn(record.uid, shared.intents[int(flag[2:])])
        self.assertGreater(sent, 10)
        self.assertGreater(sum(n for _, n in results), SESSIONS * 5)
