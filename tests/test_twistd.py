"""
The peer as an operator runs it: C{twistd -n p2pmta ...} in a process of its
own, reached with curl and a bare OpenDHT node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading

import opendht
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from p2pmta.descriptor import decodeSigned
from p2pmta.dht import NETWORK_ID, entry

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class TwistdProcess(ProcessProtocol):
    """A twistd child whose output is collected and searched."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = Deferred()
        self._waiters: list[tuple[re.Pattern, Deferred]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for pattern, d in list(self._waiters):
            match = pattern.search(self.output)
            if match:
                self._waiters.remove((pattern, d))
                d.callback(match)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError("twistd ended:\n" + self.output.decode(errors="replace")))
        self._waiters = []
        self.ended.callback(reason.value.exitCode)

    def waitFor(self, pattern: bytes, timeout: float = 30) -> Deferred:
        regex = re.compile(pattern)
        match = regex.search(self.output)
        if match:
            return succeed(match)
        d = Deferred()
        self._waiters.append((regex, d))
        d.addTimeout(timeout, reactor)
        return d


class TwistdTests(TestCase):
    timeout = 120

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="p2t", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)

    def start(self, *args: str) -> TwistdProcess:
        proto = TwistdProcess()
        argv = [TWISTD, "-n", "--pidfile=", "p2pmta", *args]
        env = dict(os.environ)
        reactor.spawnProcess(proto, TWISTD, argv, env=env, path=self.root)

        def stop():
            if not proto.ended.called:
                try:
                    proto.transport.signalProcess("KILL")
                except Exception:
                    pass
            return proto.ended

        self.addCleanup(stop)
        return proto

    async def stop(self, proto: TwistdProcess) -> None:
        proto.transport.signalProcess(signal.SIGTERM)
        await proto.ended

    def peerArgs(self, dataDir: str) -> list[str]:
        return [
            "--data-dir", dataDir, "--address", "alice@demo", "--password", "pw",
            "--smtp", "tcp:0:interface=127.0.0.1", "--imap", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--dht-port", "0", "--dht-interface", "127.0.0.1",
        ]

    async def curl(self, url: str) -> bytes:
        out, err, code = await getProcessOutputAndValue("/usr/bin/curl", ["-sS", "-f", url])
        self.assertEqual(code, 0, err)
        return out

    async def _runs(self):
        data = os.path.join(self.root, "d1")
        proto = self.start(*self.peerArgs(data))
        outbox = await proto.waitFor(rb"public outbox listening on 127\.0\.0\.1:(\d+)")
        dhtPort = int((await proto.waitFor(rb"listening on UDP (\d+)")).group(1))
        await proto.waitFor(rb"published descriptor of alice@demo")
        url = f"http://127.0.0.1:{int(outbox.group(1))}"
        key = await self.curl(url + "/pubkey")
        self.assertIn(b"BEGIN PGP PUBLIC KEY BLOCK", key)
        self.assertEqual(json.loads(await self.curl(url + "/outbox/msglist")), {"messages": [], "notifications": []})

        # A bare OpenDHT node on p2pmta's network finds the descriptor.
        raws = await deferToThread(bareGet, dhtPort, "alice@demo")
        values = entry.liveValues(raws, reactor.seconds())
        self.assertEqual(len(values), 1)
        descriptor, _, _ = decodeSigned(values[0])
        self.assertEqual(descriptor.url, url)

        await self.stop(proto)
        self.assertNotIn(b"Traceback", proto.output)

        # A restart keeps the key.
        again = self.start(*self.peerArgs(data))
        outbox = await again.waitFor(rb"public outbox listening on 127\.0\.0\.1:(\d+)")
        await again.waitFor(rb"peer alice@demo started")
        self.assertIn(b"using OpenPGP key", again.output)
        self.assertEqual(await self.curl(f"http://127.0.0.1:{int(outbox.group(1))}/pubkey"), key)
        await self.stop(again)

    def test_runsAndRestarts(self):
        """
        twistd p2pmta starts, serves its key, publishes a descriptor a bare
        OpenDHT node can read, and keeps its key across a restart.
        """
        return ensureDeferred(self._runs())

    async def _usage(self):
        proto = self.start("--data-dir", "d", "--address", "not an address", "--password", "pw")
        code = await proto.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"not a p2pmta address", proto.output)
        self.assertNotIn(b"Traceback", proto.output)

    def test_usageError(self):
        """A bad option is one readable line, not a traceback."""
        return ensureDeferred(self._usage())

    async def _portInUse(self):
        blocker = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        args = self.peerArgs(os.path.join(self.root, "d2"))
        args[args.index("--http") + 1] = f"tcp:{blocker.getHost().port}:interface=127.0.0.1"
        proto = self.start(*args)
        await proto.waitFor(rb"p2pmta cannot start: .*public outbox cannot listen on")
        self.assertEqual(await proto.ended, 1)
        self.assertNotIn(b"Traceback", proto.output)

    def test_portInUse(self):
        """A port in use stops the peer with one readable line."""
        return ensureDeferred(self._portInUse())

    async def _listed(self):
        out, err, code = await getProcessOutputAndValue(TWISTD, ["--help"], env=dict(os.environ))
        self.assertIn(b"p2pmta", out)

    def test_pluginListed(self):
        """twistd --help lists the p2pmta plugin."""
        return ensureDeferred(self._listed())


def bareGet(port: int, key: str) -> list[bytes]:
    """Read C{key} with a plain OpenDHT node (blocking: run in a thread)."""
    runner = opendht.DhtRunner()
    config = opendht.DhtConfig()
    config.setNetwork(NETWORK_ID)
    config.setPeerDiscovery(False, False)
    runner.run(port=0, ipv4="127.0.0.1", config=config)
    try:
        runner.bootstrap("127.0.0.1", str(port))
        for _ in range(50):
            found = [v.data for v in runner.get(opendht.InfoHash.get(key))]
            if found:
                return found
            threading.Event().wait(0.2)
        return []
    finally:
        done = threading.Event()
        runner.shutdown(done.set)
        done.wait(10)
        runner.join()


class KillTests(TestCase):
    """A peer killed with SIGKILL loses nothing it accepted."""

    timeout = 180

    async def _killedAfter250(self):
        from tests.peers import PeerHarness
        from tests.test_mailflow import fetchOne, makeMessage, stripAdded, uids

        harness = PeerHarness(self)
        bob = await harness.start("bob")
        root = tempfile.mkdtemp(prefix="p2k", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        args = [
            "--data-dir", os.path.join(root, "alice"), "--address", "alice@demo", "--password", "pw",
            "--smtp", "tcp:0:interface=127.0.0.1", "--imap", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--dht-port", "0", "--dht-interface", "127.0.0.1",
            "--bootstrap", f"127.0.0.1:{bob.dht.port}", "--poll-interval", "1",
        ]
        runner = TwistdTests("test_runsAndRestarts")
        runner.root = root
        runner.addCleanup = self.addCleanup
        alice = runner.start(*args)
        smtpPort = int((await alice.waitFor(rb"SMTP submission listening on 127\.0\.0\.1:(\d+)")).group(1))
        await alice.waitFor(rb"peer alice@demo started")
        message = makeMessage("alice@demo", ["bob@demo"], "killed after 250", os.urandom(3000))

        def submit():
            import smtplib

            with smtplib.SMTP("127.0.0.1", smtpPort, timeout=30) as client:
                client.login("alice@demo", "pw")
                client.sendmail("alice@demo", ["bob@demo"], message)
                # The 250 is in: kill at once, before QUIT.
                os.kill(alice.transport.pid, signal.SIGKILL)

        await deferToThread(submit)
        await alice.ended
        again = runner.start(*args)
        await again.waitFor(rb"peer alice@demo started")

        [uid] = await harness.listed("bob", timeout=30)
        typ, data = await harness.imap("bob", lambda c: fetchOne(c, uid, "(BODY[])"))
        self.assertEqual(typ, "OK")
        self.assertEqual(stripAdded(data[0][1]), message)
        await TwistdTests.stop(runner, again)
        self.assertEqual(await harness.imap("bob", uids), [uid], "delivered once")

    def test_killedRightAfter250(self):
        """alice SIGKILLed the instant her client sees 250 still delivers, once, after a restart."""
        return ensureDeferred(self._killedAfter250())
