# -*- test-case-name: tests.test_dht -*-
"""
An in-memory DHT network with a clock the tests control.

It keeps OpenDHT's contract and its weak spot: a value lives only on the
nodes that stored it (the putter and up to C{replicas - 1} others that were
online when it was put), only for the network's storage period (OpenDHT's
value-type expiry, renewed by a new put), and is gone once all its holders
have left.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from p2pmta.dht.base import EntryDHT
from p2pmta.dht.entry import keyHash
from p2pmta.errors import DHTError
from p2pmta.interfaces import IDHT


@dataclass
class _Stored:
    raw: bytes
    holders: set[str]
    storedUntil: float


@dataclass
class MemoryNetwork:
    """
    The shared state of in-memory DHT nodes.

    @ivar clock: an L{twisted.internet.interfaces.IReactorTime}.
    @ivar storagePeriod: how long a storing node keeps a value after it was
        put, in seconds, or L{None} for as long as its holders live.
    @ivar replicas: how many online nodes store each value.
    """

    clock: object
    storagePeriod: float | None = None
    replicas: int = 8
    # key -> raw -> stored copy, in the order first stored
    _values: dict[str, dict[bytes, _Stored]] = field(default_factory=dict)
    _listeners: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    _online: dict[str, bool] = field(default_factory=dict)

    def _holdersFor(self, key: str, putter: str) -> set[str]:
        others = sorted(
            (name for name, up in self._online.items() if up and name != putter),
            key=lambda name: hashlib.sha1(f"{key}/{name}".encode()).digest(),
        )
        return {putter, *others[: max(self.replicas - 1, 0)]}

    def store(self, key: str, raw: bytes, putter: str) -> int:
        """
        @return: how many nodes besides C{putter} hold C{raw} now.
        """
        now = self.clock.seconds()
        until = now + self.storagePeriod if self.storagePeriod else float("inf")
        stored = self._values.setdefault(key, {})
        item = stored.get(raw)
        if item is None:
            item = stored[raw] = _Stored(raw, self._holdersFor(key, putter), until)
        else:
            item.holders |= self._holdersFor(key, putter)
            item.storedUntil = until
        for name, callback in list(self._listeners.get(key, ())):
            if self._online.get(name):
                self.clock.callLater(0, self._deliver, name, callback, raw)
        return len(item.holders - {putter})

    def _deliver(self, name: str, callback, raw: bytes) -> None:
        if self._online.get(name):
            callback(raw)

    def fetch(self, key: str) -> list[bytes]:
        now = self.clock.seconds()
        stored = self._values.get(key)
        if not stored:
            return []
        gone = [
            raw
            for raw, item in stored.items()
            if item.storedUntil <= now
            or not any(self._online.get(name) for name in item.holders)
        ]
        for raw in gone:
            del stored[raw]
        return list(stored)

    def listen(self, key: str, name: str, callback) -> None:
        self._listeners.setdefault(key, []).append((name, callback))

    def join(self, name: str) -> None:
        self._online[name] = True

    def leave(self, name: str) -> None:
        """
        Take node C{name} offline: what only it held is gone, and its
        listeners hear nothing more.
        """
        self._online[name] = False
        for key, listeners in self._listeners.items():
            self._listeners[key] = [(n, cb) for n, cb in listeners if n != name]
        for stored in self._values.values():
            for raw, item in list(stored.items()):
                item.holders.discard(name)
                if not item.holders:
                    del stored[raw]


@implementer(IDHT)
class MemoryDHT(EntryDHT, Service):
    """
    One node of a L{MemoryNetwork}.  Online while running as a service (or
    after L{join}).
    """

    def __init__(self, network: MemoryNetwork, name: str) -> None:
        self._network = network
        self._clock = network.clock
        self.nodeName = name
        self.storagePeriod = network.storagePeriod

    def join(self) -> None:
        """Bring this node online."""
        self._network.join(self.nodeName)

    def startService(self) -> None:
        Service.startService(self)
        self.join()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._network.leave(self.nodeName)
        return succeed(None)

    def _checkOnline(self) -> None:
        if not self._network._online.get(self.nodeName):
            raise DHTError(f"node {self.nodeName} is not online")

    def _putRaw(self, key: str, raw: bytes, ttl: float) -> Deferred:
        try:
            self._checkOnline()
        except DHTError as e:
            return fail(e)
        return succeed(self._network.store(keyHash(key), raw, self.nodeName))

    def _getRaw(self, key: str) -> Deferred:
        try:
            self._checkOnline()
        except DHTError as e:
            return fail(e)
        return succeed(self._network.fetch(keyHash(key)))

    def _listenRaw(self, key: str, callback) -> Deferred:
        try:
            self._checkOnline()
        except DHTError as e:
            return fail(e)
        self._network.listen(keyHash(key), self.nodeName, callback)
        return succeed(None)
