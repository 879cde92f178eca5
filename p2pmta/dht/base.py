# -*- test-case-name: tests.test_dht -*-
"""
The paper's put/get/delete/listen over a store of opaque values: what every
provider shares.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from p2pmta.dht import entry
from p2pmta.errors import DHTError


class EntryDHT:
    """
    Mixin implementing L{p2pmta.interfaces.IDHT} on three primitives that a
    provider supplies:

      - C{_putRaw(key, raw, ttl)}: store C{raw} under C{key} for at least
        C{ttl} seconds; a Deferred firing with how many other nodes took it;
      - C{_getRaw(key)}: a Deferred firing with every raw value found;
      - C{_listenRaw(key, callback)}: call C{callback(raw)} in the reactor
        thread for each raw value that appears; a Deferred firing with
        L{None} once set.

    and a C{_clock} whose C{seconds()} decides what has expired.
    """

    log = Logger()

    def put(self, key: str, value: bytes, password: bytes, ttl: float) -> Deferred:
        try:
            stored = entry.makePut(value, password, ttl, self._clock.seconds())
        except Exception as e:
            return fail(e)
        return self._putRaw(key, stored.encode(), ttl)

    def get(self, key: str) -> Deferred:
        return self._getRaw(key).addCallback(
            lambda raws: entry.liveValues(raws, self._clock.seconds())
        )

    def delete(self, key: str, value: bytes, password: bytes) -> Deferred:
        async def deleting() -> None:
            raws = await self._getRaw(key)
            now = self._clock.seconds()
            stone = entry.makeTombstone(raws, value, password, now)
            await self._putRaw(key, stone.encode(), stone.expires - now)
            return None

        return Deferred.fromCoroutine(deleting())

    def liveEntries(self, key: str) -> Deferred:
        return self._getRaw(key).addCallback(
            lambda raws: [e.encode() for e in entry.liveEntries(raws, self._clock.seconds())]
        )

    def republish(self, key: str, raw: bytes) -> Deferred:
        found = entry.decode(raw)
        now = self._clock.seconds()
        if not isinstance(found, entry.PutEntry) or found.expires <= now:
            return fail(DHTError("not a live entry"))
        return self._putRaw(key, found.encode(), found.expires - now)

    def deleted(self, key: str, raw: bytes) -> Deferred:
        found = entry.decode(raw)
        if not isinstance(found, entry.PutEntry):
            return fail(DHTError("not an entry"))

        def check(raws) -> bool:
            now = self._clock.seconds()
            stones = [e for e in map(entry.decode, raws) if isinstance(e, entry.Tombstone) and e.expires > now]
            return any(stone.deletes(found) for stone in stones)

        return self._getRaw(key).addCallback(check)

    def listen(self, key: str, callback) -> Deferred:
        seen: set[tuple[bytes, str]] = set()

        def received(raw: bytes) -> None:
            found = entry.decode(raw)
            if not isinstance(found, entry.PutEntry):
                return
            if found.expires <= self._clock.seconds():
                return
            ident = (found.value, found.passwordHash)
            if ident in seen:
                return
            seen.add(ident)
            try:
                callback(found.value)
            except Exception:
                self.log.failure("DHT listener for {key} failed", key=key)

        return self._listenRaw(key, received)
