"""
Real peers for end-to-end tests: each with its own data dir, real gpg, a
real OpenDHT node and real TCP ports on 127.0.0.1, driven by the stdlib's
C{smtplib} and C{imaplib} in threads so the reactor keeps serving.
"""

from __future__ import annotations

import imaplib
import os
import random
import shutil
import smtplib
import socket
import sqlite3
import tempfile
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from p2pmta.address import Address
from p2pmta.config import Config
from p2pmta.service import buildService
from p2pmta.web import ACCESS_LOG_NAMESPACE


def freePort(kind: int = socket.SOCK_STREAM) -> int:
    """
    A port of 127.0.0.1 free now, for a peer to keep across restarts.  It
    is taken below the ephemeral range, so that no outgoing connection gets
    it while its peer is down between a kill and a restart.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(10000, max(10001, low))
        if port in _givenPorts:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _givenPorts.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


#: The ports L{freePort} gave: never twice in one run.
_givenPorts: set[int] = set()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def eventually(probe, timeout: float = 20.0, interval: float = 0.1):
    """
    Await C{probe()} until it returns something true; fail after
    C{timeout} seconds.
    """
    waited = 0.0
    while True:
        result = await probe()
        if result:
            return result
        if waited >= timeout:
            raise AssertionError(f"still not true after {timeout}s: {result!r}")
        await sleep(interval)
        waited += interval


def uids(client, mailbox: str = "INBOX") -> list[int]:
    """The UIDs of C{mailbox}, with a logged-in C{imaplib} client."""
    typ, _ = client.select(mailbox)
    assert typ == "OK", typ
    typ, data = client.uid("SEARCH", None, "ALL")
    return [int(u) for u in data[0].split()]


class AccessLog:
    """Collects the outbox access-log lines of every peer in the test."""

    def __init__(self, messages=frozenset) -> None:
        """
        @param messages: returns the digests of the message ciphertexts the
            peers made (outboxes also serve notices).
        """
        self.lines: list[str] = []
        self._messages = messages

    def __call__(self, event) -> None:
        if event.get("log_namespace") == ACCESS_LOG_NAMESPACE:
            self.lines.append(str(event.get("line", "")))

    @staticmethod
    def asked(line: str) -> list[str]:
        """What one request line asks the outbox for: one name, or a batch's digests."""
        target = line.split('"GET /outbox/', 1)[1].split()[0]
        if target.startswith("batch?"):
            return [part[2:] for part in target[len("batch?") :].split("&") if part.startswith("d=")]
        return [target]

    def bodyRequests(self) -> list[str]:
        """The requests of message bodies, alone or in batches (not of msglists or notices)."""
        messages = self._messages()
        return [
            line
            for line in self.lines
            if '"GET /outbox/' in line and any(name in messages for name in self.asked(line))
        ]


class PeerHarness:
    """
    Starts and stops real peers for one test case.
    """

    def __init__(self, testCase) -> None:
        self.testCase = testCase
        self.root = tempfile.mkdtemp(prefix="p2e", dir="/tmp")
        testCase.addCleanup(shutil.rmtree, self.root, True)
        self.access = AccessLog(self.sentDigests)
        globalLogPublisher.addObserver(self.access)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.access)
        self.running: dict[str, object] = {}
        self.configs: dict[str, Config] = {}

    async def start(self, name: str, group: str = "demo", dht=None, clock=None, **overrides):
        """
        Start (or restart, with the same data dir) peer C{name@group}, on
        a real OpenDHT node unless C{dht} is given.
        """
        config = self.configs.get(name)
        if config is None:
            config = Config(
                dataDir=os.path.join(self.root, name),
                address=Address(name, group),
                password=f"{name}-pw",
                smtp="tcp:0:interface=127.0.0.1",
                imap="tcp:0:interface=127.0.0.1",
                http="tcp:0:interface=127.0.0.1",
                dhtPort=0,
                dhtInterface="127.0.0.1",
                pollInterval=1.0,
            )
        bootstrap = tuple(("127.0.0.1", p.dht.port) for p in self.running.values() if getattr(p.dht, "port", None))
        config = replace(config, bootstrap=bootstrap, **overrides)
        self.configs[name] = config
        peer = buildService(config, reactor, dht=dht, stopReactorOnFailure=False, clock=clock)
        peer.startService()
        self.testCase.addCleanup(self._stopIfRunning, name, peer)
        await peer.whenReady
        publisher = peer.getServiceNamed("descriptor")

        async def published():
            return publisher.published is not None

        await eventually(published)
        self.running[name] = peer
        return peer

    async def stop(self, name: str) -> None:
        peer = self.running.pop(name)
        await peer.stopService()

    def _stopIfRunning(self, name: str, peer):
        if self.running.get(name) is peer:
            del self.running[name]
        if peer.running:
            return peer.stopService()

    def port(self, name: str, service: str) -> int:
        return self.running[name].getServiceNamed(service).port.getHost().port

    def send(self, sender: str, recipients, message: bytes):
        """
        Submit C{message} over SMTP with AUTH, in a thread.

        @return: a Deferred firing with smtplib's refused-recipients dict.
        """
        port = self.port(sender, "smtp")
        config = self.configs[sender]

        def submit():
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.login(str(config.address), config.password)
                return client.sendmail(str(config.address), list(recipients), message)

        return deferToThread(submit)

    def imap(self, name: str, work):
        """
        Run C{work(client)} with a logged-in C{imaplib} client, in a thread.
        """
        port = self.port(name, "imap")
        config = self.configs[name]

        def session():
            client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            try:
                client.login(str(config.address), config.password)
                return work(client)
            finally:
                try:
                    client.logout()
                except Exception:
                    pass

        return deferToThread(session)

    async def listed(self, name: str, count: int = 1, timeout: float = 20.0) -> list[int]:
        """
        Wait until peer C{name}'s INBOX lists at least C{count} messages.

        @return: their UIDs.
        """

        async def probe():
            found = await self.imap(name, uids)
            return found if len(found) >= count else None

        return await eventually(probe, timeout=timeout)

    def _ledgers(self, query: str) -> set:
        """The first column of C{query} over every peer's ledger (running or not)."""
        found = set()
        for config in self.configs.values():
            path = os.path.join(config.dataDir, "p2pmta.sqlite")
            if not os.path.exists(path):
                continue
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                found.update(row[0] for row in connection.execute(query))
            except sqlite3.OperationalError:  # no such table yet
                pass
            finally:
                connection.close()
        return found

    def sentDigests(self) -> set[str]:
        """The digests of every message ciphertext any peer of the test made."""
        return self._ledgers("SELECT digest FROM outgoing WHERE digest IS NOT NULL")

    def messageDigests(self, digests) -> list[str]:
        """
        The message ciphertexts among C{digests} (outbox or replica
        digests): not the notices that outboxes also hold.
        """
        sent = self.sentDigests()
        return [digest for digest in digests if digest in sent]

    def outboxDigests(self, name: str) -> list[str]:
        """The message ciphertexts in C{name}'s outbox."""
        return self.messageDigests(self.running[name].outbox.digests())
