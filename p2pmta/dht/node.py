# -*- test-case-name: tests.test_dht -*-
"""
The product's DHT: an embedded OpenDHT node, run as a Twisted service.

OpenDHT runs its own threads and calls back on them.  Every callback here
does the least it can (append to a list, or hand a value to
C{reactor.callFromThread}) and never calls back into the binding; only the
callback forms of C{get}/C{put}/C{listen} are used, since the blocking forms
deadlock on the reactor thread and drop C{permanent}.

Stopping is the delicate part.  The binding holds the GIL while
C{DhtRunner.join()} waits for the runner's lock, and the runner holds that
lock while it calls into Python (which needs the GIL): a join that overlaps
any callback deadlocks the process.  So the node first cancels its listeners
(so no value callback can come), then shuts down and waits for the shutdown
callback to have returned, and only then joins, in a thread.  The binding's
C{cancelListen} releases the callback object of the I{last} listener made,
not the one cancelled; each listener's callback object is therefore kept
here, and put back in the binding's slot just before its cancellation.
"""

from __future__ import annotations

from datetime import timedelta

import opendht
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta.dht import NETWORK_ID
from p2pmta.dht.base import EntryDHT
from p2pmta.dht.entry import keyHash
from p2pmta.errors import DHTError
from p2pmta.interfaces import IDHT

#: The value types every p2pmta node registers, shortest first: a storing
#: node keeps a value for its type's expiry, whoever put it.  Readers enforce
#: each entry's exact expiry on top.
VALUE_TYPES = (
    (0x7031, "p2pmta-1h", timedelta(hours=1)),
    (0x7032, "p2pmta-1d", timedelta(days=1)),
    (0x7033, "p2pmta-1w", timedelta(weeks=1)),
)

#: How long to wait for one DHT operation before reporting it failed.
OPERATION_TIMEOUT = 30.0

#: How long after the shutdown callback to wait before joining the runner.
JOIN_DELAY = 0.2


def valueTypeFor(ttl: float) -> int:
    """
    @return: the id of the shortest p2pmta value type that keeps a value
        for C{ttl} seconds.

    @raise DHTError: if C{ttl} is longer than any of them.
    """
    for typeId, _, expiry in VALUE_TYPES:
        if ttl <= expiry.total_seconds():
            return typeId
    raise DHTError(f"a time to live of {ttl:.0f}s is longer than one week")


def infoHash(key: str) -> opendht.InfoHash:
    """
    @return: the OpenDHT key of the text key C{key} (or of C{"hash:<hex>"}).
    """
    if key.startswith("hash:"):
        return opendht.InfoHash(keyHash(key).encode("ascii"))
    return opendht.InfoHash.get(key)


@implementer(IDHT)
class OpenDHTNode(EntryDHT, Service):
    """
    An OpenDHT node on UDP C{port}, joined through C{bootstrap}.

    @ivar port: the UDP port actually bound, once running.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        port: int = 0,
        interface: str = "",
        network: int = NETWORK_ID,
        bootstrap=(),
        clock=None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._wantedPort = port
        self._interface = interface
        self._network = network
        self._bootstrap = tuple(bootstrap)
        self._runner: opendht.DhtRunner | None = None
        self._stopping: Deferred | None = None
        self._listeners: list[tuple[opendht.ListenToken, object]] = []
        self.port: int | None = None
        #: Storing nodes keep a value for its type's expiry, at least its TTL.
        self.storagePeriod: float | None = None

    # Lifecycle

    def startService(self) -> None:
        Service.startService(self)
        runner = opendht.DhtRunner()
        config = opendht.DhtConfig()  # never share the default config
        config.setNetwork(self._network)
        config.setPeerDiscovery(False, False)  # no multicast: join explicitly
        # Storage maintenance is left off: with it, a node's shutdown hands
        # its values to others first, and the last node of a network waits
        # some 40 s for nodes that are gone.  Instead, put reports how many
        # other nodes took a value, and publishers put again soon when none
        # did (the first peer of a network).
        try:
            if self._interface:
                runner.run(port=self._wantedPort, ipv4=self._interface, config=config)
            else:
                runner.run(port=self._wantedPort, config=config)
        except Exception as e:
            raise DHTError(f"cannot start a DHT node on UDP {self._wantedPort}: {e}")
        for typeId, name, expiry in VALUE_TYPES:
            runner.registerType(opendht.ValueType(typeId, name, expiry))
        self._runner = runner
        self.port = runner.getBound().getPort()
        self.log.info(
            "DHT node {node} listening on UDP {port}, network {network:#x}",
            node=str(runner.getNodeId()),
            port=self.port,
            network=self._network,
        )
        for host, port in self._bootstrap:
            self.addBootstrap(host, port)

    def addBootstrap(self, host: str, port: int) -> Deferred:
        """
        Join the network through the node at C{host}:C{port}.

        @return: a Deferred firing with whether that node answered.
        """
        runner = self._runner
        if runner is None:
            return fail(DHTError("the DHT node is not running"))

        def resolveAndPing() -> bool:
            # Name resolution blocks, so this runs in a thread; the ping's
            # answer comes back through a callback on OpenDHT's thread.
            runner.bootstrap(host, str(port))
            return True

        answered = Deferred()

        def pinged(ok: bool) -> None:
            self._reactor.callFromThread(answered.callback, bool(ok))

        def started(_: object) -> Deferred:
            try:
                addresses = opendht.SockAddr.resolve(host, str(port))
            except Exception:
                addresses = []
            if not addresses:
                return succeed(False)
            runner.ping(addresses[0], done_cb=pinged)
            return answered

        def report(ok: bool) -> bool:
            if ok:
                self.log.info("joined DHT through {host}:{port}", host=host, port=port)
            else:
                self.log.warn("DHT node {host}:{port} did not answer", host=host, port=port)
            return ok

        d = deferToThread(resolveAndPing)
        d.addCallback(started)
        d.addTimeout(OPERATION_TIMEOUT, self._reactor, onTimeoutCancel=lambda *a: False)
        return d.addCallback(report)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        runner, self._runner = self._runner, None
        if runner is None:
            return self._stopping or succeed(None)
        listeners, self._listeners = self._listeners, []
        slot = opendht.ListenToken._cb
        for token, callbackObject in listeners:
            slot["cb"] = callbackObject
            runner.cancelListen(token)
        stopped = Deferred()
        runner.shutdown(lambda: self._reactor.callFromThread(stopped.callback, None))
        stopped.addTimeout(OPERATION_TIMEOUT, self._reactor)

        def join(_: object) -> Deferred:
            # Give the shutdown callback time to return (and release the
            # GIL) on OpenDHT's thread before join() takes the GIL and
            # waits for the runner's lock.
            return deferLater(self._reactor, JOIN_DELAY, lambda: None).addCallback(
                lambda _: deferToThread(runner.join)
            )

        def joined(result: object) -> None:
            # The callback objects may be freed only now.
            del listeners[:]
            self.log.info("DHT node stopped")

        stopped.addBoth(join)
        stopped.addBoth(joined)
        self._stopping = stopped
        return stopped

    # The raw primitives of EntryDHT

    def _running(self) -> opendht.DhtRunner:
        if self._runner is None:
            raise DHTError("the DHT node is not running")
        return self._runner

    def _putRaw(self, key: str, raw: bytes, ttl: float) -> Deferred:
        try:
            runner = self._running()
            value = opendht.Value(raw, valueTypeFor(ttl))
        except DHTError as e:
            return fail(e)
        done = Deferred()

        def finished(ok: bool, nodes) -> None:
            self._reactor.callFromThread(done.callback, len(nodes) if ok else 0)

        def check(reached: int) -> int:
            # A lone node (the first of a new network) keeps the value
            # locally and reaches no other node: peers that join later still
            # find it there, but it goes when this node does.
            if not reached:
                self.log.debug("put under {key} reached no other node", key=key)
            return reached

        runner.put(infoHash(key), value, done_cb=finished)
        done.addTimeout(OPERATION_TIMEOUT, self._reactor)
        return done.addCallback(check)

    def _getRaw(self, key: str) -> Deferred:
        try:
            runner = self._running()
        except DHTError as e:
            return fail(e)
        found: list[bytes] = []
        done = Deferred()
        # One more than EntryDHT reads, so that it can tell a flood; OpenDHT
        # stops the search when the callback returns False.
        limit = self.maxValuesPerKey + 1

        def gotValue(value: opendht.Value) -> bool:
            if len(found) >= limit:
                return False
            found.append(value.data)
            return True

        def finished(ok: bool, nodes: object) -> None:
            self._reactor.callFromThread(done.callback, found)

        runner.get(infoHash(key), get_cb=gotValue, done_cb=finished)
        done.addTimeout(OPERATION_TIMEOUT, self._reactor)
        return done

    def _listenRaw(self, key: str, callback) -> Deferred:
        try:
            runner = self._running()
        except DHTError as e:
            return fail(e)

        def gotValue(value: opendht.Value, expired: bool) -> bool:
            if not expired:
                self._reactor.callFromThread(self._deliver, callback, value.data)
            return True

        token = runner.listen(infoHash(key), gotValue)
        # See the module docstring: keep the binding's callback object.
        self._listeners.append((token, opendht.ListenToken._cb.get("cb")))
        return succeed(None)

    def _deliver(self, callback, raw: bytes) -> None:
        if self._runner is not None:
            callback(raw)
