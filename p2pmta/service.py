# -*- test-case-name: tests.test_service -*-
"""
The peer: one MultiService of named child services built from a L{Config}.

Children, by name:
  - C{"dht"}: the OpenDHT node (or any L{IDHT} service passed in);
  - C{"http"}: the public outbox;
  - C{"descriptor"}: keeps this peer's descriptor in the DHT;
  - C{"group"}: the group descriptor, on the group master only;
  - C{"mailflow"}: listens and polls for notifications;
  - C{"replication"}: replicates the other group members' outboxes;
  - C{"smtp"}, C{"imap"}: the mail client's servers.

The bounded thread pool for gpg, SQLite and disk work (L{Peer.threads}) runs
from first to last.

Starting needs the OpenPGP key (generated on first start), so the children
after C{"dht"} are added once it is ready; L{Peer.whenReady} fires then.
"""

from __future__ import annotations

import os
import secrets
import sys
from urllib.parse import urlunsplit

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadpool import ThreadPool

from p2pmta.config import Config
from p2pmta.crypto import Keyring
from p2pmta.descriptor import DescriptorPublisher, PeerDirectory
from p2pmta.dht import DESCRIPTOR_TTL
from p2pmta.dht.node import OpenDHTNode
from p2pmta.errors import P2PMTAError, StartError, StoreError
from p2pmta.fileutil import createSecretFile, ensureDir, removeIfThere
from p2pmta.httpclient import makeAgent
from p2pmta.store import Outbox
from p2pmta.web import makeSite
from p2pmta.auth import makePortal
from p2pmta.imap import IMAPFactory
from p2pmta.imapaccount import Account
from p2pmta.groups import GroupDirectory, GroupPublisher
from p2pmta.ledger import Ledger
from p2pmta.replication import Replicator, ServedOutbox
from p2pmta.mailstore import MailStore
from p2pmta.polling import MailFlowService
from p2pmta.receiving import Receiver
from p2pmta.sealers import Sealers
from p2pmta.sending import Sender
from p2pmta.spool import findUnrecorded, keepsEnvelopes
from p2pmta.smtp import SubmissionFactory
from p2pmta.tls import loadOrCreateCertificate
from twisted.mail.imap4 import IAccount
from twisted.mail.smtp import IMessageDelivery

#: How many gpg or disk jobs run at once.
THREADS = 4

#: How many empty spool files the SMTP server keeps made ahead of time.
SPOOL_AHEAD = 16


class DataDir:
    """
    The layout of a peer's data directory: the data dir I{is} the peer.

      - C{private/} (0700): C{gnupg/} (the OpenPGP keys and key cache),
        C{dht-secret} (the password of this peer's own DHT entries);
      - C{spool/}: messages accepted from the mail client, not yet sent;
      - C{outbox/}: ciphertexts waiting to be pulled;
      - C{replicas/}: other group members' ciphertexts;
      - C{inbox/}: the received mail, a Maildir;
      - C{p2pmta.sqlite}: metadata.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.private = os.path.join(self.path, "private")
        self.gnupg = os.path.join(self.private, "gnupg")
        self.dhtSecret = os.path.join(self.private, "dht-secret")
        self.spool = os.path.join(self.path, "spool")
        self.outbox = os.path.join(self.path, "outbox")
        self.replicas = os.path.join(self.path, "replicas")
        self.inbox = os.path.join(self.path, "inbox")
        self.database = os.path.join(self.path, "p2pmta.sqlite")

    def prepare(self) -> bytes:
        """
        Create what is missing (blocking: call it in a thread).

        @return: this peer's DHT password.
        """
        try:
            ensureDir(self.path, 0o755)
            ensureDir(self.private, 0o700)
            ensureDir(self.gnupg, 0o700)
            for folder in (self.spool, self.outbox, self.replicas):
                ensureDir(folder, 0o755)
            for sub in ("tmp", "new", "cur"):
                ensureDir(os.path.join(self.inbox, sub), 0o700)
            if not os.path.exists(self.dhtSecret):
                createSecretFile(self.dhtSecret, secrets.token_hex(32).encode("ascii"))
            with open(self.dhtSecret, "rb") as f:
                return f.read().strip()
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror or e}") from None


def cleanAfterCrash(spool: str, pulls: str, accepted) -> None:
    """
    Remove what a killed peer left half done (blocking; before the
    pipelines start): from the spool, every file but the C{accepted}
    messages' (SMTP sessions' files never accepted, ciphertexts and links
    not finished, messages whose sending was over); and bodies being
    pulled, pulled again when opened.

    @param accepted: the paths of the spooled messages still to be sent.
    """
    accepted = {os.path.abspath(path) for path in accepted}
    for folder, leftover in (
        (spool, lambda path: path not in accepted),
        (pulls, lambda path: True),
    ):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.abspath(os.path.join(folder, name))
            if leftover(path) and not os.path.isdir(path):
                removeIfThere(path)


class ThreadPoolService(Service):
    """
    Runs a bounded L{ThreadPool} while the service runs.
    """

    def __init__(self, size: int = THREADS, name: str = "p2pmta") -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()


class ListeningService(Service):
    """
    A listening port that this service owns; stops listening when stopped.
    """

    log = Logger()

    def __init__(self, reactor, description: str, factory, what: str) -> None:
        self._reactor = reactor
        self._description = description
        # Tracks connections, so that stopping closes them too, as a
        # process exit would.
        self._factory = WrappingFactory(factory)
        self._what = what
        self.port: IListeningPort | None = None

    async def listen(self) -> IListeningPort:
        endpoint = endpoints.serverFromString(self._reactor, self._description)
        try:
            self.port = await endpoint.listen(self._factory)
        except Exception as e:
            raise StartError(f"{self._what} cannot listen on {self._description}: {e}") from None
        host = self.port.getHost()
        self.log.info(
            "{what} listening on {host}:{port}", what=self._what, host=host.host, port=host.port
        )
        return self.port

    def stopService(self):
        Service.stopService(self)
        for connection in list(self._factory.protocols):
            connection.transport.abortConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return succeed(None)


def publicURLFor(config: Config, port: IListeningPort) -> str:
    """
    @return: how other peers reach the outbox: C{--public-url}, or the
        address the outbox listens on (127.0.0.1 when it listens on all).
    """
    if config.publicURL:
        return config.publicURL.rstrip("/")
    host = port.getHost()
    name = host.host if host.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in name:
        name = f"[{name}]"
    return urlunsplit(("http", f"{name}:{host.port}", "", "", ""))


class Peer(MultiService):
    """
    A running p2pmta peer.

    @ivar whenReady: fires with this peer once every child service runs, or
        fails with the start-up error.
    """

    log = Logger()

    def __init__(self, config: Config, reactor, dht=None, stopReactorOnFailure: bool = False, clock=None) -> None:
        """
        @param clock: what the pipelines read the time from, to decide what
            has expired (default: C{reactor}); tests move it forward.
        """
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.dataDir = DataDir(config.dataDir)
        self._stopReactorOnFailure = stopReactorOnFailure
        # Not children: they must outlive the other services when stopping.
        self.threads = ThreadPoolService()
        # The ledger's SQLite work runs one statement at a time anyway: it
        # gets a thread of its own instead of holding pool threads while
        # they wait for its lock (and keeping file and crypto work waiting).
        self.ledgerThread = ThreadPoolService(1, "p2pmta-ledger")
        # An SMTP 250 waits for its message's flush: two threads of its
        # own, so that it never waits behind the pipeline's encryption and
        # filing in the pool.
        self.smtpThreads = ThreadPoolService(2, "p2pmta-smtp")
        if dht is None:
            dht = OpenDHTNode(
                reactor,
                port=config.dhtPort,
                interface=config.dhtInterface,
                network=config.dhtNetwork,
                bootstrap=config.bootstrap,
            )
        self.dht = dht
        dht.setName("dht")
        dht.setServiceParent(self)
        self.keyring: Keyring | None = None
        self.outbox: Outbox | None = None
        self.publicURL: str | None = None
        self.whenReady: Deferred = Deferred()
        self._tasks: set[Deferred] = set()
        self.sender: Sender | None = None
        #: Where the sending pipeline encrypts (started when first used).
        self.sealers = Sealers(reactor)

    def startService(self) -> None:
        for pool in (self.threads, self.ledgerThread, self.smtpThreads):
            pool.startService()
        try:
            MultiService.startService(self)
        except Exception as e:
            self._failed(e)
            return
        d = Deferred.fromCoroutine(self._startRest())
        d.addCallbacks(self._started, self._failed)

    def _started(self, _: object) -> None:
        self.log.info("peer {address} started", address=str(self.config.address))
        self.whenReady.callback(self)

    def _failed(self, reason) -> None:
        error = getattr(reason, "value", reason)
        message = str(error) if isinstance(error, P2PMTAError) else repr(error)
        self.log.critical("p2pmta cannot start: {message}", message=message)
        if not self.whenReady.called:
            self.whenReady.errback(reason)
        self.whenReady.addErrback(lambda _: None)
        if self._stopReactorOnFailure and self.reactor.running:
            # twistd has no way to set its exit status: leave with 1 once
            # the reactor has shut down, so that scripts and service
            # managers see the failure.
            self.reactor.addSystemEventTrigger("after", "shutdown", _exitFailed)
            self.reactor.stop()

    def inThreads(self, f, *args, **kwargs) -> Deferred:
        """Run blocking C{f} in the peer's bounded thread pool."""
        return deferToThreadPool(self.reactor, self.threads.pool, f, *args, **kwargs)

    async def _startRest(self) -> None:
        config = self.config
        password = await self.inThreads(self.dataDir.prepare)
        self.keyring = await Keyring.open(self.reactor, self.dataDir.gnupg, config.address, self.threads.pool)
        # Opening a store cleans what a crash left: disk work, in a thread.
        self.outbox = await self.inThreads(Outbox, self.reactor, self.dataDir.outbox, self.threads.pool)
        self.replicas = await self.inThreads(Outbox, self.reactor, self.dataDir.replicas, self.threads.pool)
        self.agent, self.httpPool = makeAgent(self.reactor)
        self.directory = PeerDirectory(self.reactor, self.dht, self.keyring, self.agent)
        self.groups = GroupDirectory(self.reactor, self.dht, self.keyring, self.directory)

        site = makeSite(
            ServedOutbox(self.outbox, self.replicas, lambda: self.sender.notices.notifications() if self.sender else []),
            self.keyring.publicKey,
            reactor=self.reactor,
            maxConnectionsPerClient=config.httpMaxConnectionsPerClient or None,
            maxDownloadsPerClient=config.httpMaxDownloadsPerClient or None,
        )
        http = ListeningService(self.reactor, config.http, site, "public outbox")
        http.setName("http")
        port = await http.listen()
        http.setServiceParent(self)
        self.publicURL = publicURLFor(config, port)

        publisher = DescriptorPublisher(
            self.reactor, self.dht, self.keyring, lambda: succeed(self.publicURL), password,
            interval=self._renewInterval(DESCRIPTOR_TTL),
        )
        publisher.setName("descriptor")
        publisher.setServiceParent(self)
        if config.groupMembers:
            master = GroupPublisher(
                self.reactor, self.dht, self.keyring, config.groupMembers, password, self.directory,
                interval=self._renewInterval(DESCRIPTOR_TTL),
            )
            master.setName("group")
            master.setServiceParent(self)

        await self._startMail()

    def _renewInterval(self, ttl: float) -> float:
        """
        How often to renew an entry of C{ttl}: a quarter of its life, or
        half the DHT's storage period if storing nodes keep values for less.
        """
        period = getattr(self.dht, "storagePeriod", None)
        return min(ttl / 4, period / 2) if period else ttl / 4

    async def _startMail(self) -> None:
        config = self.config
        self.ledger = await self.inThreads(Ledger, self.reactor, self.dataDir.database, self.ledgerThread.pool)
        self.mailStore = await MailStore(
            self.reactor, self.dataDir.database, self.dataDir.inbox, self.threads.pool
        ).open()
        self.sender = Sender(
            self, config.maxMessageSize, keepsEnvelopes=await self.inThreads(keepsEnvelopes, self.dataDir.spool)
        )
        recorded = await self.ledger.query("SELECT spool, state FROM outgoing")
        found = await self.inThreads(findUnrecorded, self.dataDir.spool, [r["spool"] for r in recorded if r["spool"]])
        await self.sender.recoverUnrecorded(found)
        # The messages still to send, those just recorded again among them.
        accepted = [r["spool"] for r in recorded if r["state"] in ("spooled", "encrypted")]
        accepted += [path for path, _ in found]
        await self.inThreads(cleanAfterCrash, self.dataDir.spool, os.path.join(self.dataDir.path, "pulls"), accepted)
        await self.sender.forgetUnspooled()
        await self.sender.dropUnrecorded()
        self.receiver = Receiver(self)
        self.mailStore.bodyFetcher = self.receiver.fetchBody
        self.mailStore.expungeHook = self._expunged
        self.mailStore.attachedHook = self.receiver.bodyStored

        flow = MailFlowService(
            self.reactor, self.dht, config.address, self.sender, self.receiver, config.pollInterval, self.track
        )
        flow.setName("mailflow")
        flow.setServiceParent(self)
        replication = Replicator(self, config.replicationInterval)
        replication.setName("replication")
        replication.setServiceParent(self)

        tlsOptions = await self.inThreads(loadOrCreateCertificate, self.dataDir.private, str(config.address))
        portal = makePortal(
            self.reactor,
            config.address,
            config.password,
            {IAccount: lambda: Account(self.mailStore), IMessageDelivery: lambda: None},
        )
        smtp = ListeningService(
            self.reactor,
            config.smtp,
            SubmissionFactory(
                portal,
                self.sender,
                tlsOptions=tlsOptions,
                clock=self.reactor,
                runBlocking=lambda f, *args: deferToThreadPool(self.reactor, self.smtpThreads.pool, f, *args),
                maxConnections=config.smtpMaxConnections,
                timeout=config.smtpIdleTimeout,
                spoolAhead=SPOOL_AHEAD,
            ),
            "SMTP submission",
        )
        smtp.setName("smtp")
        await smtp.listen()
        smtp.setServiceParent(self)
        imap = ListeningService(
            self.reactor,
            config.imap,
            IMAPFactory(
                portal, self.mailStore, tlsOptions=tlsOptions, clock=self.reactor, maxMessageSize=config.maxMessageSize
            ),
            "IMAP",
        )
        imap.setName("imap")
        await imap.listen()
        imap.setServiceParent(self)

    def _expunged(self, mailbox: str, records) -> Deferred:
        if mailbox.upper() == "INBOX":
            return Deferred.fromCoroutine(self.receiver.inboxExpunged(records))
        if mailbox == "Outbox":
            return Deferred.fromCoroutine(self.sender.outboxExpunged(records))
        return succeed(None)

    def track(self, d: Deferred) -> Deferred:
        """
        Remember background work in flight, so that stopping waits for it
        before the stores and the DHT go.
        """
        self._tasks.add(d)

        def forget(result):
            self._tasks.discard(d)
            return result

        return d.addBoth(forget)

    def drain(self, timeout: float = 5.0) -> Deferred:
        """
        Wait, at most C{timeout} seconds, for the background work in flight
        (see L{track}) while everything still runs: what stopping does
        before the DHT node goes, for peers that share a process and must
        all drain before any of their DHT nodes goes (the demo).
        """
        return Deferred.fromCoroutine(self._drain(timeout))

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        try:
            # Front ends first, the DHT last, one after the other; background
            # work is drained before the DHT and the stores go.  The thread
            # pool goes last of all: closing the stores still needs it.
            for child in reversed(list(self)):
                if child is self.dht:
                    await self._drain()
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    self.log.failure("stopping {name} failed", name=child.name)
            # The pipeline is drained: nothing more to seal.
            await self.sealers.stop()
            if getattr(self, "httpPool", None) is not None:
                await self.httpPool.closeCachedConnections()
            for resource in ("mailStore", "keyring"):
                if getattr(self, resource, None) is not None:
                    try:
                        await getattr(self, resource).close()
                    except Exception:
                        self.log.failure("closing the {what} failed", what=resource)
            if getattr(self, "ledger", None) is not None:
                await self.inThreads(self.ledger.close)
        finally:
            for pool in (self.smtpThreads, self.ledgerThread, self.threads):
                pool.stopService()
            self.log.info("peer {address} stopped", address=str(self.config.address))

    async def _drain(self, timeout: float = 5.0) -> None:
        while self._tasks:
            pending = DeferredList(list(self._tasks), consumeErrors=True)
            pending.addTimeout(timeout, self.reactor)
            try:
                await pending
            except Exception:
                self.log.warn("stopping with {n} background tasks unfinished", n=len(self._tasks))
                return


def _exitFailed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def buildService(config: Config, reactor, dht=None, stopReactorOnFailure: bool = True, clock=None) -> Peer:
    """
    @return: the peer for C{config}, not yet started.
    """
    return Peer(config, reactor, dht=dht, stopReactorOnFailure=stopReactorOnFailure, clock=clock)
