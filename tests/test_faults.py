"""
Faults, end to end (issue 6): peers killed with SIGKILL at the worst
moments, full disks, DHT nodes that vanish.

Every peer here is a real C{twistd -n p2pmta} process on 127.0.0.1, reached
only through its real interfaces (SMTP, IMAP, the HTTP outbox, its data
directory's documented layout), so these tests hold whatever the pipelines'
insides become.  Each peer keeps its ports and its data dir across restarts.

What must hold after every fault and restart:
  - nothing accepted is lost: every message that got a 250 (or an APPEND
    OK) shows in its mailbox with its exact bytes (Message-ID and SHA-256);
  - nothing is delivered twice: no Message-ID twice in INBOX or Sent;
  - nothing half-written is shown or served: every FETCH BODY[] that
    answers OK gives a whole message, and every C{/outbox/<hash>} served
    hashes to its name.

The long random loops are in L{stress.test_faults}; these are their quick,
deterministic versions.  C{P2PMTA_FAULTS_VERBOSE=1} prints what is done as
it is done; C{P2PMTA_FAULTS_KEEP=1} keeps the peers' data dirs.  The disk
tests mount small tmpfs file systems, so they need root (else they skip).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import errno
import hashlib
import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from p2pmta.dht.node import OpenDHTNode, infoHash
from p2pmta.service import SPOOL_AHEAD, cleanAfterCrash
from tests.peers import eventually, freePort, sleep
from tests.test_mailflow import makeMessage, stripAdded
from tests.test_twistd import TWISTD, TwistdProcess

#: How long a peer may take to start (gpg, DHT, descriptor) on a busy box.
START_TIMEOUT = 90.0

#: How long accepted mail may take to show up after the last restart.
DELIVERY_TIMEOUT = 60.0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def messageId(message: bytes) -> str:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    return str(parsed["Message-ID"]).strip()


def fillerFile(path: str, leave: int) -> int:
    """
    Fill the file system of C{path} with the file C{path}, leaving about
    C{leave} bytes free.

    @return: the bytes written.
    """
    st = os.statvfs(os.path.dirname(path))
    size = max(0, st.f_bavail * st.f_frsize - leave)
    written = 0
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while written < size:
                written += f.write(chunk[: min(len(chunk), size - written)])
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return written


class TwistdPeer:
    """
    One peer as C{twistd -n p2pmta} in a child process, with fixed ports and
    data dir, so that it can be killed and started again as the same peer.

    @ivar process: the running L{TwistdProcess}, or L{None}.
    @ivar logs: the output of every earlier run, oldest first.
    """

    def __init__(self, mesh: Mesh, name: str, group: str, dataDir: str, options: dict) -> None:
        self.mesh = mesh
        self.name = name
        self.address = f"{name}@{group}"
        self.password = f"{name}-pw"
        self.dataDir = dataDir
        self.options = options
        self.smtpPort = freePort()
        self.imapPort = freePort()
        self.httpPort = freePort()
        self.dhtPort = freePort(socket.SOCK_DGRAM)
        self.process: TwistdProcess | None = None
        self.logs: list[bytes] = []
        self.starts = 0
        self.announced = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpPort}"

    def argv(self) -> list[str]:
        args = [
            TWISTD, "-n", "--pidfile=", "p2pmta",
            "--data-dir", self.dataDir, "--address", self.address, "--password", self.password,
            "--smtp", f"tcp:{self.smtpPort}:interface=127.0.0.1",
            "--imap", f"tcp:{self.imapPort}:interface=127.0.0.1",
            "--http", f"tcp:{self.httpPort}:interface=127.0.0.1",
            "--dht-port", str(self.dhtPort), "--dht-interface", "127.0.0.1",
            "--poll-interval", "1",
        ]  # fmt: skip
        for host, port in self.mesh.bootstrap(self):
            args += ["--bootstrap", f"{host}:{port}"]
        for option, value in self.options.items():
            args += [f"--{option}", str(value)]
        return args

    async def start(self) -> TwistdPeer:
        """Start (or start again) this peer; fire once it serves."""
        assert self.process is None or self.process.ended.called, f"{self.name} runs already"
        if self.process is not None:
            self.logs.append(self.process.output)
        for attempt in range(3):
            proto = self.process = TwistdProcess()
            self.starts += 1
            reactor.spawnProcess(proto, TWISTD, self.argv(), env=dict(os.environ), path=self.mesh.root)
            try:
                await proto.waitFor(rb"peer " + re.escape(self.address.encode()) + rb" started", START_TIMEOUT)
                if not self.announced:
                    # Others find a new peer only once its descriptor is in
                    # the DHT; after a restart its old one still serves.
                    await proto.waitFor(rb"published descriptor of " + re.escape(self.address.encode()), START_TIMEOUT)
                    self.announced = True
                return self
            except AssertionError:
                # Someone else took one of our ports while we were down:
                # move to others (the peer publishes its new address).
                if not re.search(rb"Address already in use|cannot start a DHT node", proto.output) or attempt == 2:
                    raise
                self.logs.append(proto.output)
                self.smtpPort, self.imapPort, self.httpPort = freePort(), freePort(), freePort()
                self.dhtPort = freePort(socket.SOCK_DGRAM)
                self.announced = False
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.ended.called

    def killNow(self, pid: int | None = None) -> None:
        """SIGKILL this run (or run C{pid}), at once (callable from any thread)."""
        try:
            os.kill(pid or self.process.transport.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.running:
            self.killNow()
        await self.process.ended

    async def stop(self) -> None:
        """SIGTERM: a clean stop."""
        if self.running:
            self.process.transport.signalProcess(signal.SIGTERM)
        await self.process.ended

    def cleanup(self):
        """SIGKILL whatever runs still, at the end of the test."""
        if self.process is not None and not self.process.ended.called:
            with contextlib.suppress(ProcessExitedAlready):
                self.process.transport.signalProcess("KILL")
            return self.process.ended
        return None

    def stopAgent(self) -> None:
        """Stop the gpg-agent a killed peer leaves behind."""
        home = os.path.join(self.dataDir, "private", "gnupg")
        if os.path.isdir(home):
            subprocess.run(
                ["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=30, check=False
            )

    def output(self) -> str:
        runs = self.logs + ([self.process.output] if self.process is not None else [])
        return "\n---- restart ----\n".join(run.decode(errors="replace") for run in runs)

    # Clients: blocking, run them in a thread.

    def submit(self, recipients, message: bytes, killAfter250: int | None = None) -> None:
        """
        Send C{message} over SMTP; raise unless it is accepted (250).  With
        C{killAfter250}, a process id of this peer's, SIGKILL that process
        the instant the 250 is read.
        """
        with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=60) as client:
            client.login(self.address, self.password)
            refused = client.sendmail(self.address, list(recipients), message)
            if killAfter250:
                self.killNow(killAfter250)
                return
            assert not refused, refused

    def imap(self, work, timeout: float = 60):
        """C{work(client)} with a logged-in C{imaplib} client."""
        client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=timeout)
        try:
            client.login(self.address, self.password)
            return work(client)
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()

    def get(self, path: str) -> tuple[int, bytes]:
        """GET C{path} of the public outbox: its status code and body."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, b""


class Mesh:
    """
    The peers of one test, in one temporary folder, and (with C{seed}) the
    DHT node they bootstrap through: an OpenDHT node in the test process
    that never goes away.  C{P2PMTA_FAULTS_KEEP=1} keeps the folder.
    """

    def __init__(self, case: TestCase, seed: bool = True) -> None:
        self.case = case
        self.root = tempfile.mkdtemp(prefix="p2f", dir="/tmp")
        if not os.environ.get("P2PMTA_FAULTS_KEEP"):
            case.addCleanup(shutil.rmtree, self.root, True)
        self.peers: dict[str, TwistdPeer] = {}
        self.seed = None
        if seed:
            self.seed = OpenDHTNode(reactor, port=0, interface="127.0.0.1")
            self.seed.startService()
            case.addCleanup(self.seed.stopService)
        self.extraBootstrap: list[tuple[str, int]] = []

    def bootstrap(self, peer: TwistdPeer) -> list[tuple[str, int]]:
        nodes = [("127.0.0.1", self.seed.port)] if self.seed is not None else []
        nodes += self.extraBootstrap
        return nodes + [("127.0.0.1", p.dhtPort) for p in self.peers.values() if p is not peer and p.starts]

    def peer(self, name: str, group: str = "demo", dataDir: str | None = None, **options) -> TwistdPeer:
        peer = TwistdPeer(self, name, group, dataDir or os.path.join(self.root, name), options)
        self.peers[name] = peer
        # Cleanups run last-in first-out: the process goes, then its agent.
        self.case.addCleanup(peer.stopAgent)
        self.case.addCleanup(peer.cleanup)
        return peer

    async def start(self, *names: str) -> None:
        for name in names:
            await self.peers[name].start()

    def dumpLogs(self) -> str:
        """The end of every peer's output, without its routine lines."""
        parts = []
        for name, peer in self.peers.items():
            lines = [line for line in peer.output().splitlines() if not _ROUTINE.search(line)]
            parts.append(f"==== {name} ====\n" + "\n".join(lines[-400:]))
        return "\n".join(parts)


#: Log lines left out of failure reports.
_ROUTINE = re.compile(r"p2pmta\.web\.access|(Starting|Stopping) factory|Timing out client|disk use:|WrappingFactory")


@dataclass
class Book:
    """
    What was submitted and where it must be found: for each C{(peer,
    mailbox)}, Message-ID to the SHA-256 of the message's bytes.
    """

    #: Got a 250 or an APPEND OK: must show, once, whole.
    accepted: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    #: Killed before the answer: may show (once, whole) or not.
    unsure: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    #: Opened whole already.
    verified: dict[tuple[str, str], set] = field(default_factory=dict)
    #: What was done, for failure messages.
    events: list[str] = field(default_factory=list)

    def add(self, message: bytes, accepted: bool, *places: tuple[str, str]) -> str:
        mid = messageId(message)
        for place in places:
            (self.accepted if accepted else self.unsure).setdefault(place, {})[mid] = sha256(message)
        return mid

    def expected(self, place) -> dict[str, str]:
        return self.accepted.get(place, {})

    def known(self, place) -> dict[str, str]:
        return {**self.unsure.get(place, {}), **self.accepted.get(place, {})}


# Blocking IMAP probes, for TwistdPeer.imap.

_FETCH_ITEM = re.compile(rb"UID (\d+)")
_SIZE_ITEM = re.compile(rb"RFC822\.SIZE (\d+)")


def listMessageIds(client, mailbox: str) -> list[tuple[int, str, int]]:
    """
    @return: C{(uid, Message-ID, RFC822.SIZE)} of every message of
        C{mailbox}, without pulling any body.
    """
    typ, _ = client.select(mailbox, readonly=True)
    assert typ == "OK", (mailbox, typ)
    typ, data = client.uid("SEARCH", None, "ALL")
    uids = data[0].split()
    if not uids:
        return []
    typ, data = client.uid("FETCH", b",".join(uids).decode(), "(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert typ == "OK", (typ, data)
    found = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        head, fields = item
        uid = int(_FETCH_ITEM.search(head).group(1))
        size = int(_SIZE_ITEM.search(head).group(1))
        found.append((uid, messageId(fields), size))
    return found


def _filled(folder: str) -> set:
    """The names of the files in C{folder} that hold something."""
    names = set()
    for name in os.listdir(folder):
        try:
            if os.path.getsize(os.path.join(folder, name)):
                names.add(name)
        except OSError:
            pass
    return names


def fetchBody(client, mailbox: str, uid: int) -> tuple[str, bytes | None, str]:
    """
    FETCH BODY[] of one message.

    @return: C{("OK", body, "")} or C{("NO", None, the response text)}.
    """
    client.select(mailbox, readonly=False)
    try:
        typ, data = client.uid("FETCH", str(uid), "(BODY[])")
    except imaplib.IMAP4.error as e:
        return "NO", None, str(e)
    if typ != "OK":
        return typ, None, repr(data)
    for item in data:
        if isinstance(item, tuple):
            return "OK", item[1], ""
    return "NO", None, f"no body in {data!r}"


class FaultCase(TestCase):
    """
    What the fault tests share, here and in L{stress.test_faults}: a record
    of what was sent (L{Book}) and of what was done (L{note}), and the
    checks that nothing accepted is lost, doubled or torn.
    """

    timeout = 600

    def setUp(self) -> None:
        self.book = Book()
        self.started = reactor.seconds()

    def note(self, event: str) -> None:
        self.book.events.append(f"{reactor.seconds() - self.started:7.3f} {event}")
        if os.environ.get("P2PMTA_FAULTS_VERBOSE"):
            print(self.book.events[-1])

    def threaded(self, f, *args, **kwargs) -> Deferred:
        """Run a blocking client call in a thread, so the reactor serves on."""
        return deferToThread(f, *args, **kwargs)

    def failWith(self, message: str) -> None:
        """Fail with C{message}, what was done, and the peers' logs."""
        mesh = getattr(self, "mesh", None)
        logs = mesh.dumpLogs() if mesh is not None else ""
        self.fail(f"{message}\nevents: {self.book.events}\n{logs}")

    def scenario(self, coroutine) -> Deferred:
        """
        Run a test's coroutine; an unexpected error fails the test with
        what was done and the peers' logs.
        """

        async def guarded():
            try:
                return await coroutine
            except (self.failureException, SkipTest):
                raise
            except Exception as e:  # noqa: BLE001 (reported, with the logs)
                self.failWith(f"unexpected {e!r}")

        return ensureDeferred(guarded())

    async def checkMailbox(self, peer: TwistdPeer, mailbox: str, timeout: float = DELIVERY_TIMEOUT) -> None:
        """
        Wait until every accepted message for C{mailbox} of C{peer} shows
        there; check that none shows twice and that each one (not opened
        before) opens whole, byte for byte.
        """
        place = (peer.name, mailbox)
        expected, known = self.book.expected(place), self.book.known(place)
        verified = self.book.verified.setdefault(place, set())

        async def listing():
            found = await self.threaded(peer.imap, lambda c: listMessageIds(c, mailbox))
            return (found,) if set(expected) <= {mid for _, mid, _ in found} else None

        try:
            [found] = await eventually(listing, timeout=timeout, interval=0.25)
        except AssertionError:
            found = await self.threaded(peer.imap, lambda c: listMessageIds(c, mailbox))
            missing = sorted(set(expected) - {mid for _, mid, _ in found})
            self.failWith(f"LOST: {len(missing)} accepted messages never showed in {mailbox} of {peer.name}: {missing}")
        ids = [mid for _, mid, _ in found]
        duplicates = sorted({mid for mid in ids if ids.count(mid) > 1})
        if duplicates:
            self.failWith(f"DUPLICATE: delivered twice in {mailbox} of {peer.name}: {duplicates}")
        for uid, mid, _ in found:
            if mid in verified:
                continue
            if mid not in known:
                self.failWith(f"{mailbox} of {peer.name} shows {mid}, which nobody sent")
            body = await self.openWhole(peer, mailbox, uid, timeout)
            if sha256(stripAdded(body)) != known[mid]:
                self.failWith(f"TORN: {mid} in {mailbox} of {peer.name} is not what was sent ({len(body)} bytes)")
            verified.add(mid)

    async def openWhole(self, peer: TwistdPeer, mailbox: str, uid: int, timeout: float = DELIVERY_TIMEOUT) -> bytes:
        """
        FETCH BODY[] until it answers OK (a pull may fail while the sender
        restarts: that is a NO, never a torn body), and check that
        RFC822.SIZE then is the size of that body.
        """
        last = []

        async def opened():
            typ, body, why = await self.threaded(peer.imap, lambda c: fetchBody(c, mailbox, uid))
            last[:] = [typ, why]
            return body

        try:
            body = await eventually(opened, timeout=timeout, interval=0.5)
        except AssertionError:
            self.failWith(f"LOST: UID {uid} of {mailbox} of {peer.name} never opened: {last}")

        def size(client):
            client.select(mailbox, readonly=True)
            _, data = client.uid("FETCH", str(uid), "(RFC822.SIZE)")
            return int(_SIZE_ITEM.search(data[0]).group(1))

        reported = await self.threaded(peer.imap, size)
        if reported != len(body):
            self.failWith(f"UID {uid} of {mailbox} of {peer.name}: RFC822.SIZE {reported}, BODY[] {len(body)} bytes")
        return body

    async def checkServed(self, *peers: TwistdPeer) -> int:
        """
        Every ciphertext a running peer holds (its own and its replicas, as
        its data dir lists them) and every one its msglist names is served
        whole or not at all: what C{/outbox/<hash>} gives hashes to its name.

        @return: how many were served.
        """
        served = 0
        for peer in peers:
            if not peer.running:
                continue
            names = set()
            for folder in ("outbox", "replicas"):
                path = os.path.join(peer.dataDir, folder)
                if os.path.isdir(path):
                    names.update(n for n in os.listdir(path) if _DIGEST.fullmatch(n))
            code, listing = await self.threaded(peer.get, "/outbox/msglist")
            self.assertEqual(code, 200, f"/outbox/msglist of {peer.name}")
            names.update(json.loads(listing)["messages"])
            for name in sorted(names):
                code, body = await self.threaded(peer.get, "/outbox/" + name)
                if code == 404:
                    continue  # removed since
                self.assertEqual(code, 200, f"/outbox/{name} of {peer.name}")
                if sha256(body) != name:
                    self.failWith(f"TORN: {peer.name} served /outbox/{name} with {len(body)} bytes of another hash")
                served += 1
        return served


_DIGEST = re.compile("[0-9a-f]{64}")

#: The kinds of kill of the kill loop: what is going on when SIGKILL comes.
KINDS = ("smtp250", "data", "append", "sending", "receiving", "pulling", "serving", "replicating", "receipt")


class KillLoop(FaultCase):
    """
    One kill after another, on the same three peers: alice@g (master of
    group g) sends to bob@h; dave@g replicates alice's outbox.  After each
    kill the peer starts again on its data dir, and everything accepted so
    far must show up, once, whole.
    """

    async def startPeers(self) -> None:
        self.mesh = mesh = Mesh(self)
        self.alice = mesh.peer("alice", "g", **{"group-members": "alice@g,dave@g", "replication-interval": "0.5"})
        self.dave = mesh.peer("dave", "g", **{"replication-interval": "0.5"})
        self.bob = mesh.peer("bob", "h")
        await mesh.start("alice", "dave", "bob")
        self.note(f"peers in {mesh.root}")
        self.count = 0

    def newMessage(self, size: int, sender: str = "alice@g", recipient: str = "bob@h") -> bytes:
        self.count += 1
        return makeMessage(sender, [recipient], f"fault {self.count}", os.urandom(size))

    async def send(self, message: bytes, killAfter250: bool = False) -> bool:
        """
        Submit C{message} from alice to bob.

        @return: whether it was accepted (250).
        """
        # The process to kill is named now: by the time the client thread
        # runs, a restart may have replaced it.
        pid = self.alice.process.transport.pid if killAfter250 else None
        try:
            await self.threaded(self.alice.submit, ["bob@h"], message, pid)
        except Exception as e:
            if not killAfter250:
                raise
            self.note(f"  not accepted: {e!r}")
            accepted = False
        else:
            accepted = True
        self.book.add(message, accepted, ("bob", "INBOX"), ("alice", "Sent"))
        return accepted

    async def killAndRestart(self, peer: TwistdPeer, delay: float = 0.0) -> None:
        if delay:
            await sleep(delay)
        await peer.kill()
        await peer.start()

    async def iteration(self, kind: str, delay: float, size: int) -> None:
        """
        One kill of C{kind}, C{delay} seconds into the work it interrupts,
        with a message of about C{size} bytes; then the checks.
        """
        self.note(f"{kind} delay={delay:.3f} size={size}")
        alice, bob, dave = self.alice, self.bob, self.dave
        if kind == "smtp250":
            await self.send(self.newMessage(size), killAfter250=True)
            await alice.kill()
            await alice.start()
        elif kind == "data":
            # Killed while the client streams the message: it is not
            # accepted (or, if the kill beat only the 250, it may show).
            message = self.newMessage(size)
            spool = os.path.join(alice.dataDir, "spool")
            before = _filled(spool)
            sending = ensureDeferred(self.send(message, killAfter250=True))
            # The kill counts from when DATA starts landing in the spool (in
            # a file made ahead of time, perhaps: one that was empty).
            for _ in range(1000):
                if _filled(spool) - before or sending.called:
                    break
                await sleep(0.005)
            await self.killAndRestart(alice, delay)
            await sending
        elif kind == "receipt":
            # Killed the moment alice hears bob is done with a message:
            # while she drops its ciphertext and Outbox copy.
            message = self.newMessage(size)
            await self.send(message)
            uid = await self.waitListed(bob, messageId(message))
            since = len(alice.process.output)
            typ, _, why = await self.threaded(bob.imap, lambda c: fetchBody(c, "INBOX", uid))
            self.assertEqual(typ, "OK", why)
            await self.waitForLog(alice, rb"is done with", since)
            await self.killAndRestart(alice, delay)
        elif kind == "append":
            message = self.newMessage(size, sender="carol@h")

            pid = bob.process.transport.pid

            def append(client):
                typ, data = client.append("INBOX", None, None, message)
                if typ == "OK":
                    bob.killNow(pid)
                return typ, data

            typ, data = await self.threaded(bob.imap, append)
            self.assertEqual(typ, "OK", data)
            self.book.add(message, True, ("bob", "INBOX"))
            await bob.kill()
            await bob.start()
        elif kind in ("sending", "receiving", "replicating"):
            await self.send(self.newMessage(size))
            await self.killAndRestart({"sending": alice, "receiving": bob, "replicating": dave}[kind], delay)
        elif kind in ("pulling", "serving"):
            message = self.newMessage(size)
            await self.send(message)
            mid = messageId(message)
            uid = await self.waitListed(bob, mid)
            opening = self.threaded(bob.imap, lambda c: fetchBody(c, "INBOX", uid))
            opening.addErrback(lambda f: ("gone", None, repr(f.value)))
            await self.killAndRestart(bob if kind == "pulling" else alice, delay)
            typ, body, why = await opening
            self.note(f"  FETCH during the kill: {typ} {why[:80]}")
            if typ == "OK" and sha256(stripAdded(body)) != sha256(message):
                self.failWith(f"TORN: FETCH BODY[] of {mid} answered OK with {len(body)} bytes that are not the message")
        else:
            raise ValueError(kind)
        await self.settle()

    async def waitForLog(self, peer: TwistdPeer, pattern: bytes, since: int, timeout: float = 10.0) -> bool:
        """
        Wait until C{peer} logs C{pattern} after offset C{since} of its
        output (or C{timeout} seconds: the kill then comes late, but comes).

        @return: whether it was logged.
        """
        regex = re.compile(pattern)
        for _ in range(int(timeout / 0.002)):
            if regex.search(peer.process.output, since):
                return True
            await sleep(0.002)
        self.note(f"  {pattern!r} not logged by {peer.name}")
        return False

    async def waitListed(self, peer: TwistdPeer, mid: str) -> int:
        async def probe():
            found = await self.threaded(peer.imap, lambda c: listMessageIds(c, "INBOX"))
            return [uid for uid, m, _ in found if m == mid]

        return (await eventually(probe, timeout=DELIVERY_TIMEOUT))[0]

    async def settle(self) -> None:
        """Everything accepted so far shows, once, whole."""
        self.note("  restarted")
        for peer in (self.alice, self.dave, self.bob):
            if not peer.running:
                self.failWith(f"{peer.name} stopped on its own")
        await self.checkMailbox(self.bob, "INBOX")
        self.note("  INBOX checked")
        await self.checkMailbox(self.alice, "Sent")
        await self.checkServed(self.alice, self.dave, self.bob)
        self.note("  settled")

    async def finalCheck(self) -> None:
        """
        After the loop: everything opens whole again (what was whole stays
        whole), and the sender's outbox drains.
        """
        self.book.verified.clear()
        await self.settle()
        await self.checkDrained()

    async def checkDrained(self, timeout: float = 30.0) -> None:
        """
        Once every recipient opened everything, nothing is left behind:
        alice lists no ciphertext and no pending notification, her spool
        and her C{Outbox} are empty, dave holds no replica of hers, and
        bob's scratch space for pulls is empty.
        """
        alice, dave = self.alice, self.dave

        def leftovers(client):
            _, listing = alice.get("/outbox/msglist")
            found = {}
            listed = json.loads(listing)
            for what in ("messages", "notifications"):
                if listed.get(what):
                    found[f"alice's msglist {what}"] = len(listed[what])
            for peer, folder in ((alice, "spool"), (alice, "outbox"), (dave, "replicas"), (self.bob, "pulls")):
                path = os.path.join(peer.dataDir, folder)
                names = os.listdir(path) if os.path.isdir(path) else []
                if folder == "spool" and len(names) <= SPOOL_AHEAD:
                    # The SMTP server's empty files, made ahead of time.
                    names = sorted(_filled(path))
                if names:
                    found[f"{peer.name}'s {folder}/"] = sorted(names)
            outbox = listMessageIds(client, "Outbox")
            if outbox:
                found["alice's Outbox"] = [mid for _, mid, _ in outbox]
            return found

        async def drained():
            found = await self.threaded(alice.imap, leftovers)
            self.leftovers = found
            return not found

        try:
            await eventually(drained, timeout=timeout, interval=0.5)
            self.note("drained")
        except AssertionError:
            self.failWith(f"LEAK: left behind once every message was opened: {self.leftovers}")


class KillTests(KillLoop):
    """
    Each kind of kill at a fixed point, three kills per test: the quick,
    deterministic version of L{stress.test_faults.KillLoopTests}.
    """

    timeout = 240

    async def _kills(self, *kills: tuple[str, float, int]) -> None:
        await self.startPeers()
        for kind, delay, size in kills:
            await self.iteration(kind, delay, size)
        await self.finalCheck()

    def test_senderKilled(self):
        """
        alice SIGKILLed while her client sends DATA, the instant it reads
        250, while she encrypts, files and notifies, while bob pulls from
        her, and as she hears bob is done: each message accepted shows
        once, whole, and nothing is left behind.
        """
        return self.scenario(
            self._kills(
                ("data", 0.01, 2_000_000),
                ("smtp250", 0, 20_000),
                ("sending", 0.08, 300_000),
                ("serving", 0.02, 1_000_000),
                ("receipt", 0, 20_000),
            )
        )

    def test_receiverKilled(self):
        """
        bob SIGKILLed the instant his client reads APPEND's OK, while he
        takes in a notification, and while he pulls a body: each message
        shows once, whole (never torn), and alice's outbox drains.
        """
        return self.scenario(
            self._kills(("append", 0, 20_000), ("receiving", 0.15, 300_000), ("pulling", 0.03, 2_000_000))
        )

    def test_replicatorKilled(self):
        """
        dave SIGKILLed while he replicates alice's outbox serves only whole
        replicas, and drops them once bob has opened everything.
        """
        return self.scenario(
            self._kills(("replicating", 0.1, 20_000), ("replicating", 0.4, 300_000), ("replicating", 0.7, 1_000_000))
        )


def mountTmpfs(case: TestCase, path: str, size: str) -> None:
    """
    Mount a tmpfs of C{size} (e.g. C{"4m"}) on C{path} for the rest of
    C{case}; it is unmounted at cleanup, even after a failure.  Skips
    C{case} unless we may mount (root).
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SkipTest(f"cannot mount a tmpfs: {done.stderr.strip()}")
    case.addCleanup(unmount, path)


def remount(path: str, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True, capture_output=True)


def unmount(path: str) -> None:
    for _ in range(50):
        if subprocess.run(["umount", path], capture_output=True, check=False).returncode == 0:
            return
        # A process of ours still holds a file there: give it a moment.
        time.sleep(0.1)
    subprocess.run(["umount", "-l", path], capture_output=True, check=False)


class FullDiskStorageTests(TestCase):
    """
    The storage helpers under the pipelines (L{p2pmta.fileutil},
    L{p2pmta.ledger}) on a full disk: the error says so, nothing is left
    behind, and they work again once space returns (root only).
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="p2u", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.disk = os.path.join(self.root, "disk")
        mountTmpfs(self, self.disk, "256k")

    def fill(self) -> str:
        filler = os.path.join(self.disk, "filler")
        fillerFile(filler, 0)
        return filler

    def test_atomicFileGivesSpaceBack(self):
        """
        An atomic write that fills the disk fails with ENOSPC, leaves no
        temporary file (nor its space) behind, and the same write succeeds
        once space returns.
        """
        from p2pmta.fileutil import AtomicFile, atomicWriteFrom

        free = os.statvfs(self.disk).f_bfree
        target = os.path.join(self.disk, "file")
        # Small chunks, as from the network: some are still buffered when
        # the disk fills, and closing the file cannot flush them.
        chunks = [os.urandom(1000) for _ in range(400)]
        with self.assertRaises(OSError) as e:
            atomicWriteFrom(target, chunks)
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        self.assertEqual(os.listdir(self.disk), [])
        self.assertEqual(os.statvfs(self.disk).f_bfree, free)
        with self.assertRaises(OSError), AtomicFile(self.disk) as f:
            for chunk in chunks:
                f.write(chunk)
            f.commit(target)
        self.assertEqual(os.listdir(self.disk), [])
        remount(self.disk, "1m")
        atomicWriteFrom(target, chunks)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))

    def test_ledgerOnFullDisk(self):
        """
        The ledger on a full disk fails with ENOSPC (not SQLite's "cannot
        rollback"), keeps what it held, and works again once space returns.
        """
        from p2pmta.ledger import Ledger

        ledger = Ledger(reactor, os.path.join(self.disk, "p2pmta.sqlite"), None)
        self.addCleanup(ledger.close)
        insert = "INSERT INTO incoming (hash, state, received, raw) VALUES (?, 'bad', 0, ?)"
        ledger._run(insert, ("before", b"x" * 1000))
        filler = self.fill()
        with self.assertRaises(OSError) as e:
            for i in range(100):
                ledger._run(insert, (str(i), os.urandom(20_000)))
        self.assertEqual(e.exception.errno, errno.ENOSPC, e.exception)
        os.remove(filler)
        ledger._run(insert, ("after", b"x" * 1000))
        held = {row["hash"] for row in ledger._run("SELECT hash FROM incoming")}
        self.assertTrue({"before", "after"} <= held, held)


class DiskFullTests(FaultCase):
    """
    A full disk refuses new work with the right answer, keeps what it
    holds, and works again once space returns (root only: a small tmpfs is
    the disk).
    """

    timeout = 180

    async def startTwo(self, aliceSize: str | None = None, bobSize: str | None = None, pullsSize: str | None = None):
        self.mesh = mesh = Mesh(self)
        for name, size in (("alice", aliceSize), ("bob", bobSize)):
            if size:
                mountTmpfs(self, os.path.join(mesh.root, name), size)
        if pullsSize:
            # The receiver's scratch space for bodies being pulled.
            mountTmpfs(self, os.path.join(mesh.root, "bob", "pulls"), pullsSize)
        self.alice = mesh.peer("alice")
        self.bob = mesh.peer("bob")
        await mesh.start("alice", "bob")
        self.count = 0

    def newMessage(self, size: int, sender: str = "alice@demo") -> bytes:
        self.count += 1
        return makeMessage(sender, ["bob@demo"], f"disk {self.count}", os.urandom(size))

    async def sendAndCheck(self, message: bytes) -> None:
        await self.threaded(self.alice.submit, ["bob@demo"], message)
        self.book.add(message, True, ("bob", "INBOX"), ("alice", "Sent"))
        await self.checkMailbox(self.bob, "INBOX")
        await self.checkMailbox(self.alice, "Sent")

    async def checkAll(self) -> None:
        """Everything accepted is there, whole (opened again)."""
        self.book.verified.clear()
        await self.checkMailbox(self.bob, "INBOX")
        await self.checkMailbox(self.alice, "Sent")
        self.assertTrue(self.alice.running and self.bob.running, "a full disk stopped a peer")

    async def _smtp(self):
        await self.startTwo(aliceSize="8m")
        await self.sendAndCheck(self.newMessage(20_000))
        filler = os.path.join(self.alice.dataDir, "filler")
        await self.threaded(fillerFile, filler, 64 * 1024)
        for size in (400_000, 120_000, 66_000):
            message = self.newMessage(size)
            try:
                await self.threaded(self.alice.submit, ["bob@demo"], message)
            except smtplib.SMTPDataError as e:
                answer = (e.smtp_code, e.smtp_error)
            except (smtplib.SMTPException, OSError) as e:
                answer = e
            else:
                answer = "250"
            self.note(f"DATA of {size} bytes on a full disk: {answer}")
            if not (isinstance(answer, tuple) and answer[0] == 452 and answer[1].startswith(b"4.3.1")):
                self.failWith(f"a message of {size} bytes on a full disk: {answer!r}, not 452 4.3.1")
        await self.checkAll()
        os.remove(filler)
        await self.sendAndCheck(message)
        await self.checkAll()

    def test_smtpDataOnFullDisk(self):
        """
        DATA on a full disk answers 452 4.3.1; earlier mail stays whole; the
        same message is accepted and delivered once space returns.
        """
        return self.scenario(self._smtp())

    async def _append(self):
        await self.startTwo(bobSize="8m")
        bob = self.bob
        first = self.newMessage(20_000, sender="carol@demo")

        def append(message):
            return lambda client: client.append("INBOX", None, None, message)

        typ, data = await self.threaded(bob.imap, append(first))
        self.assertEqual(typ, "OK", data)
        self.book.add(first, True, ("bob", "INBOX"))
        filler = os.path.join(bob.dataDir, "filler")
        await self.threaded(fillerFile, filler, 64 * 1024)
        second = self.newMessage(400_000, sender="carol@demo")
        typ, data = await self.threaded(bob.imap, append(second))
        self.note(f"APPEND on a full disk: {typ} {data}")
        self.assertEqual(typ, "NO", data)
        code = re.match(rb"\[([A-Z-]+)", data[0])
        self.assertIsNotNone(code, f"APPEND on a full disk answers NO without a response code: {data}")
        self.assertNotEqual(code.group(1), b"SERVERBUG", f"a full disk is no server bug: {data}")
        await self.checkAll()
        os.remove(filler)
        typ, data = await self.threaded(bob.imap, append(second))
        self.assertEqual(typ, "OK", data)
        self.book.add(second, True, ("bob", "INBOX"))
        await self.checkAll()

    def test_imapAppendOnFullDisk(self):
        """
        APPEND on a full disk answers NO with a response code; earlier mail
        stays whole; the same APPEND succeeds once space returns.
        """
        return self.scenario(self._append())

    async def listedUnopened(self, message: bytes) -> int:
        """
        alice sends C{message} to bob; wait until his INBOX lists it.

        @return: its UID.
        """
        await self.threaded(self.alice.submit, ["bob@demo"], message)
        self.book.add(message, True, ("bob", "INBOX"), ("alice", "Sent"))
        mid = messageId(message)

        async def listed():
            found = await self.threaded(self.bob.imap, lambda c: listMessageIds(c, "INBOX"))
            return [uid for uid, m, _ in found if m == mid]

        [uid] = await eventually(listed, timeout=DELIVERY_TIMEOUT)
        return uid

    async def pullRefused(self, message: bytes) -> int:
        """
        bob lists C{message} (too big to pull into memory) but cannot open
        it: FETCH BODY[] says NO [UNAVAILABLE] (twice: the failed pull left
        nothing half-written behind), and its headers still show.

        @return: its UID.
        """
        bob = self.bob
        mid = messageId(message)
        uid = await self.listedUnopened(message)
        for _ in range(2):
            typ, body, why = await self.threaded(bob.imap, lambda c: fetchBody(c, "INBOX", uid))
            self.note(f"FETCH on a full disk: {typ} {why}")
            self.assertEqual((typ, body), ("NO", None), "a pull on a full disk gave a body")
            self.assertIn("UNAVAILABLE", why)

        def header(client):
            client.select("INBOX")
            return client.uid("FETCH", str(uid), "(BODY.PEEK[HEADER])")

        typ, data = await self.threaded(bob.imap, header)
        self.assertEqual(typ, "OK")
        self.assertIn(mid.encode(), data[0][1])
        return uid

    async def pullShownNotStored(self, message: bytes, inFile: bool = True) -> None:
        """
        bob lists C{message} (small enough to pull into memory) and opens it
        whole, twice, but cannot store it: his Maildir gains no file, so
        alice, not told he is done with it, must serve it again later
        (L{checkAll}).  (A body small enough for the mail store's database,
        C{inFile} false, may still find room there, in pages the database
        holds already: then it is stored, whole.)
        """
        cur = os.path.join(self.bob.dataDir, "inbox", "cur")
        before = sorted(os.listdir(cur))
        uid = await self.listedUnopened(message)
        for _ in range(2):
            typ, body, why = await self.threaded(self.bob.imap, lambda c: fetchBody(c, "INBOX", uid))
            self.note(f"FETCH on a full disk: {typ} {why}")
            self.assertEqual(typ, "OK", why)
            self.assertEqual(sha256(stripAdded(body)), sha256(message), "a pull on a full disk was not whole")
        if inFile:
            self.assertEqual(sorted(os.listdir(cur)), before, "a body was stored on a full disk")

    async def _pullsFull(self):
        await self.startTwo(pullsSize="256k")
        await self.sendAndCheck(self.newMessage(20_000))
        # Beyond IN_MEMORY_PULL: pulled into a file in pulls/.
        await self.pullRefused(self.newMessage(2_000_000))
        pulls = os.path.join(self.bob.dataDir, "pulls")
        self.assertEqual(os.listdir(pulls), [], "a failed pull left files behind")
        remount(pulls, "8m")
        await self.checkAll()

    def test_pullWithFullPullsDir(self):
        """
        A body that does not fit where pulls go is NO [UNAVAILABLE], never
        half shown; it opens whole once space returns.
        """
        return self.scenario(self._pullsFull())

    async def _inboxFull(self):
        await self.startTwo(bobSize="8m")
        await self.sendAndCheck(self.newMessage(20_000))
        filler = os.path.join(self.bob.dataDir, "filler")
        await self.threaded(fillerFile, filler, 200 * 1024)
        await self.pullRefused(self.newMessage(2_000_000))
        os.remove(filler)
        await self.checkAll()

    def test_pullWithFullDataDir(self):
        """
        A body too big to pull into memory that does not fit in the
        receiver's data dir is NO [UNAVAILABLE], never half shown; it opens
        whole once space returns.
        """
        return self.scenario(self._inboxFull())

    async def _maildirFull(self):
        # Pulls land on a file system of their own, with room; the data dir
        # (and so the Maildir) is full: the pull succeeds, storing the body
        # does not.
        await self.startTwo(bobSize="8m", pullsSize="8m")
        await self.sendAndCheck(self.newMessage(20_000))
        filler = os.path.join(self.bob.dataDir, "filler")
        await self.threaded(fillerFile, filler, 200 * 1024)
        await self.pullShownNotStored(self.newMessage(600_000))
        await self.pullShownNotStored(self.newMessage(20_000), inFile=False)
        await self.pullRefused(self.newMessage(2_000_000))
        os.remove(filler)
        await self.checkAll()

    def test_pullIntoFullMaildir(self):
        """
        A body pulled whole that cannot be stored is shown whole from memory
        if it is small, else NO [UNAVAILABLE]; either way it opens whole
        once space returns: the sender was not told to delete it.
        """
        return self.scenario(self._maildirFull())

    async def _replication(self):
        self.mesh = mesh = Mesh(self)
        mountTmpfs(self, os.path.join(mesh.root, "dave"), "8m")
        alice = mesh.peer("alice", "g", **{"group-members": "alice@g,dave@g", "replication-interval": "0.5"})
        dave = mesh.peer("dave", "g", **{"replication-interval": "0.5"})
        bob = mesh.peer("bob", "h")
        await mesh.start("alice", "dave", "bob")
        filler = os.path.join(dave.dataDir, "filler")
        await self.threaded(fillerFile, filler, 300 * 1024)
        message = makeMessage("alice@g", ["bob@h"], "replica on a full disk", os.urandom(600_000))
        await self.threaded(alice.submit, ["bob@h"], message)
        self.book.add(message, True, ("bob", "INBOX"), ("alice", "Sent"))
        mid = messageId(message)

        async def listed():
            # The msglist names the notice too: the ciphertext is the big one.
            _, listing = await self.threaded(alice.get, "/outbox/msglist")
            outbox = os.path.join(alice.dataDir, "outbox")
            sizes = {d: os.stat(os.path.join(outbox, d)).st_size for d in os.listdir(outbox) if _DIGEST.fullmatch(d)}
            return [d for d in json.loads(listing)["messages"] if sizes.get(d, 0) > 600_000]

        [digest] = await eventually(listed)
        # Several rounds of dave's fail for want of space...
        await sleep(3)
        await self.checkServed(dave)
        code, _ = await self.threaded(dave.get, "/outbox/" + digest)
        self.assertEqual(code, 404)
        self.assertTrue(dave.running)
        replicas = os.listdir(os.path.join(dave.dataDir, "replicas"))
        self.assertEqual([n for n in replicas if not _DIGEST.fullmatch(n) or n == digest], [],
                         "failed replications left files")
        # ... and one succeeds once space returns.
        os.remove(filler)

        async def replicated():
            code, body = await self.threaded(dave.get, "/outbox/" + digest)
            return code == 200 and sha256(body) == digest

        await eventually(replicated, timeout=DELIVERY_TIMEOUT)
        # bob opens it from dave while alice is away.
        await alice.stop()
        await self.threaded(bob.imap, lambda c: listMessageIds(c, "INBOX"))
        await self.checkMailbox(bob, "INBOX")
        self.note(f"{mid} opened from dave")

    def test_replicationOnFullDisk(self):
        """
        A group member whose disk is full fails to replicate, serves nothing
        torn and keeps no part of it; once space returns it replicates,
        and the receiver opens the message from it, whole, while its sender
        is away.
        """
        return self.scenario(self._replication())

    async def _sending(self):
        await self.startTwo(aliceSize="8m")
        await self.sendAndCheck(self.newMessage(20_000))
        message = self.newMessage(500_000)
        filler = os.path.join(self.alice.dataDir, "filler")
        # Room for the spooled message, not for its ciphertext too.
        await self.threaded(fillerFile, filler, 800 * 1024)
        alice = self.alice
        await self.threaded(alice.submit, ["bob@demo"], message)
        self.book.add(message, True, ("bob", "INBOX"), ("alice", "Sent"))
        await sleep(3)
        self.note(f"alice while full: {re.findall(r'sending .* failed.*|.*No space left.*', alice.output())[:3]}")
        os.remove(filler)
        await self.checkAll()

    def test_sendingOnFullDisk(self):
        """
        A message accepted when its ciphertext no longer fits is delivered,
        once and whole, when space returns.
        """
        return self.scenario(self._sending())


#: A plain OpenDHT node on p2pmta's network, as anyone may run one: it
#: prints its port and node id, then serves until killed.
BARE_NODE = textwrap.dedent(
    """
    import sys, threading, opendht
    from p2pmta.dht import NETWORK_ID
    from p2pmta.dht.node import VALUE_TYPES
    runner = opendht.DhtRunner()
    config = opendht.DhtConfig()
    config.setNetwork(NETWORK_ID)
    config.setPeerDiscovery(False, False)
    runner.run(port=int(sys.argv[1]), ipv4="127.0.0.1", config=config)
    for typeId, name, expiry in VALUE_TYPES:
        runner.registerType(opendht.ValueType(typeId, name, expiry))
    for hostport in sys.argv[2:]:
        host, port = hostport.rsplit(":", 1)
        runner.bootstrap(host, port)
    print("node", runner.getBound().getPort(), runner.getNodeId(), flush=True)
    threading.Event().wait()
    """
)


class BareNode:
    """A plain OpenDHT node in a child process of its own."""

    def __init__(self, case: TestCase, bootstrap) -> None:
        self.process = TwistdProcess()
        argv = [sys.executable, "-c", BARE_NODE, str(freePort(socket.SOCK_DGRAM))]
        argv += [f"{host}:{port}" for host, port in bootstrap]
        reactor.spawnProcess(self.process, sys.executable, argv, env=dict(os.environ))
        case.addCleanup(self.kill)
        self.port: int | None = None
        self.nodeId: str | None = None

    async def started(self) -> BareNode:
        match = await self.process.waitFor(rb"node (\d+) ([0-9a-f]{40})", 30)
        self.port, self.nodeId = int(match.group(1)), match.group(2).decode()
        return self

    def kill(self):
        if not self.process.ended.called:
            self.process.transport.signalProcess("KILL")
        return self.process.ended


class DHTChurn(FaultCase):
    """
    Two peers whose DHT is L{NODES} plain OpenDHT nodes besides themselves,
    which vanish and join here and in L{stress.test_faults}.
    """

    timeout = 180

    #: The plain OpenDHT nodes besides the two peers.
    NODES = 6

    async def startChurn(self) -> None:
        self.mesh = mesh = Mesh(self, seed=False)
        self.nodes = [await BareNode(self, []).started()]
        for _ in range(self.NODES - 1):
            self.nodes.append(await BareNode(self, [("127.0.0.1", self.nodes[0].port)]).started())
        mesh.extraBootstrap = [("127.0.0.1", n.port) for n in self.nodes]
        self.alice, self.bob = mesh.peer("alice"), mesh.peer("bob")
        await mesh.start("alice", "bob")
        self.count = 0

    async def mail(self, n: int) -> None:
        """alice sends C{n} messages; bob opens them all, whole, once."""
        for _ in range(n):
            self.count += 1
            message = makeMessage("alice@demo", ["bob@demo"], f"churn {self.count}", os.urandom(10_000))
            await self.threaded(self.alice.submit, ["bob@demo"], message)
            self.book.add(message, True, ("bob", "INBOX"), ("alice", "Sent"))
        await self.checkMailbox(self.bob, "INBOX")
        await self.checkMailbox(self.alice, "Sent")

    async def vanish(self, doomed: list[BareNode]) -> None:
        for node in doomed:
            await node.kill()
            self.nodes.remove(node)
        self.note(f"killed DHT nodes {[n.port for n in doomed]}")

    async def drained(self) -> None:
        """alice hears every receipt through what is left of the DHT."""

        async def empty():
            _, listing = await self.threaded(self.alice.get, "/outbox/msglist")
            return not json.loads(listing)["messages"]

        try:
            await eventually(empty, timeout=DELIVERY_TIMEOUT)
        except AssertionError:
            self.failWith("alice never heard bob's receipts")


class DHTChurnTests(DHTChurn):
    """Mail still flows when DHT nodes vanish mid-run."""

    async def _churn(self):
        await self.startChurn()
        await self.mail(3)
        # A third of the nodes vanish: those nearest bob's notification
        # key, which hold his send notifications.
        target = int(str(infoHash("ns:bob@demo")), 16)
        await self.vanish(sorted(self.nodes, key=lambda n: int(n.nodeId, 16) ^ target)[: self.NODES // 3])
        await self.mail(3)
        await self.drained()

    def test_nodesVanish(self):
        """
        With six plain OpenDHT nodes besides the two peers, mail sent after
        the third of them nearest the receiver's key were SIGKILLed still
        arrives, once, whole, and the sender hears the receipts.
        """
        return self.scenario(self._churn())


class CleanAfterCrashTests(SynchronousTestCase):
    """
    L{cleanAfterCrash} keeps the spooled messages the ledger names as
    accepted and removes everything else a killed peer left half done.
    """

    def test_keepsOnlyAccepted(self):
        root = self.mktemp()
        spool, pulls = os.path.join(root, "spool"), os.path.join(root, "pulls")
        os.makedirs(spool)
        os.makedirs(pulls)
        names = {
            "accepted": ".smtp-accepted",  # 250 given, not yet sent
            "unaccepted": ".smtp-cut",  # the session died before its 250
            "link": ".smtp-accepted.Sent",  # a Sent link not taken yet
            "old": "0123.eml",  # a message whose sending was over
        }
        for name in names.values():
            with open(os.path.join(spool, name), "wb") as f:
                f.write(b"x")
        with open(os.path.join(pulls, "half.gpg"), "wb") as f:
            f.write(b"x")
        os.mkdir(os.path.join(spool, "folder"))
        # The ledger's path may name the folder otherwise than listdir does.
        accepted = os.path.join(root, ".", "spool", names["accepted"])
        cleanAfterCrash(spool, pulls, [accepted])
        self.assertEqual(sorted(os.listdir(spool)), [names["accepted"], "folder"])
        self.assertEqual(os.listdir(pulls), [])
