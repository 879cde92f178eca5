# -*- test-case-name: tests.test_dht,tests.test_hostile_dht -*-
"""
The paper's put/get/delete/listen over a store of opaque values: what every
provider shares.

Anyone may store anything under any key, so what is read is bounded before
it is decoded: at most L{EntryDHT.maxValuesPerKey} values and
L{EntryDHT.maxBytesPerKey} bytes per key, each value at most
L{entry.MAX_ENTRY_SIZE}.  Values that are not entries are skipped and
reported in one log line per key, at most once every
L{EntryDHT.complaintInterval} seconds, however many there are.
"""

from __future__ import annotations

import hashlib

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from p2pmta.dht import entry
from p2pmta.errors import DHTError


class _Complaints:
    """
    What was wrong with the values read under one key, and when it was last
    said.
    """

    def __init__(self) -> None:
        self.lastSaid: dict[tuple[str, str], float] = {}

    def due(self, key: str, what: str, now: float, interval: float) -> bool:
        """
        @return: whether C{what} about C{key} may be logged now, and if so
            note that it was.
        """
        last = self.lastSaid.get((key, what))
        if last is not None and now - last < interval:
            return False
        if len(self.lastSaid) > 4096:
            # Forget what was said long ago, not what is being held back.
            self.lastSaid = {
                k: t for k, t in self.lastSaid.items() if now - t < interval
            }
        self.lastSaid[(key, what)] = now
        return True


class _Rejected:
    """
    Counts the values of one read that are not entries, and keeps the first
    reason.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def __call__(self, error: entry.BadEntry) -> None:
        self.count += 1
        if self.first is None:
            self.first = str(error)


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

    @cvar maxValuesPerKey: the most raw values read under one key; the rest
        are ignored.
    @cvar maxBytesPerKey: the most bytes of raw values read under one key.
    @cvar complaintInterval: seconds between two log lines about the same
        kind of bad input under the same key.
    """

    log = Logger()

    maxValuesPerKey = entry.MAX_VALUES_PER_KEY
    maxBytesPerKey = entry.MAX_BYTES_PER_KEY
    complaintInterval = 600.0

    # Reading, bounded

    def _complaints(self) -> _Complaints:
        # A mixin without __init__: providers do not call ours.
        complaints = self.__dict__.get("_complaintsState")
        if complaints is None:
            complaints = self.__dict__["_complaintsState"] = _Complaints()
        return complaints

    def _complain(self, key: str, what: str, format: str, **kwargs) -> bool:
        """
        Log a warning about C{key} unless the same C{what} was said less
        than L{complaintInterval} seconds ago.

        @return: whether it was logged.
        """
        if not self._complaints().due(
            key, what, self._clock.seconds(), self.complaintInterval
        ):
            return False
        self.log.warn(format, key=key, interval=self.complaintInterval, **kwargs)
        return True

    def _readRaw(self, key: str) -> Deferred:
        """
        L{_getRaw}, bounded: a Deferred firing with at most
        L{maxValuesPerKey} values of at most L{entry.MAX_ENTRY_SIZE} bytes,
        L{maxBytesPerKey} in all.
        """
        return self._getRaw(key).addCallback(self._bound, key)

    def _bound(self, raws, key: str) -> list[bytes]:
        kept: list[bytes] = []
        total = 0
        oversize = 0
        truncated = False
        for raw in raws:
            if len(kept) >= self.maxValuesPerKey:
                truncated = True
                break
            if not isinstance(raw, bytes):
                oversize += 1
                continue
            size = len(raw)
            if size > entry.MAX_ENTRY_SIZE:
                oversize += 1
                continue
            if total + size > self.maxBytesPerKey:
                truncated = True
                break
            kept.append(raw)
            total += size
        if oversize:
            self._complain(
                key,
                "oversize",
                "ignored {count} values over {limit} bytes under {key}"
                " (said at most once every {interval:.0f}s)",
                count=oversize,
                limit=entry.MAX_ENTRY_SIZE,
            )
        if truncated:
            self._complain(
                key,
                "flood",
                "read only the first {values} values ({size} bytes) under {key}:"
                " someone is flooding it (said at most once every {interval:.0f}s)",
                values=len(kept),
                size=total,
            )
        return kept

    def _live(self, raws: list[bytes], key: str) -> list[entry.PutEntry]:
        rejected = _Rejected()
        live = entry.liveEntries(raws, self._clock.seconds(), rejected)
        self._reportRejected(key, rejected)
        return live

    def _reportRejected(self, key: str, rejected: _Rejected) -> bool:
        return bool(rejected.count) and self._complain(
            key,
            "malformed",
            "ignored {count} values under {key} that are not p2pmta entries,"
            " the first because: {reason} (said at most once every {interval:.0f}s)",
            count=rejected.count,
            reason=rejected.first,
        )

    # IDHT

    def put(self, key: str, value: bytes, password: bytes, ttl: float) -> Deferred:
        try:
            stored = entry.makePut(value, password, ttl, self._clock.seconds())
        except Exception as e:
            return fail(e)
        return self._putRaw(key, stored.encode(), ttl)

    def get(self, key: str) -> Deferred:
        def values(raws: list[bytes]) -> list[bytes]:
            rejected = _Rejected()
            found = entry.liveValues(raws, self._clock.seconds(), rejected)
            self._reportRejected(key, rejected)
            return found

        return self._readRaw(key).addCallback(values)

    def delete(self, key: str, value: bytes, password: bytes) -> Deferred:
        async def deleting() -> None:
            raws = await self._readRaw(key)
            now = self._clock.seconds()
            stone = entry.makeTombstone(raws, value, password, now)
            await self._putRaw(key, stone.encode(), stone.expires - now)
            return None

        return Deferred.fromCoroutine(deleting())

    def retract(self, key: str, value: bytes, password: bytes, ttl: float) -> Deferred:
        stone = entry.Tombstone(entry.valueHash(value), password, self._clock.seconds() + ttl)
        return self._putRaw(key, stone.encode(), ttl).addCallback(lambda _: None)

    def liveEntries(self, key: str) -> Deferred:
        return self._readRaw(key).addCallback(
            lambda raws: [e.encode() for e in self._live(raws, key)]
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
            stones = [
                e
                for e in map(entry.decode, raws)
                if isinstance(e, entry.Tombstone) and e.expires > now
            ]
            return any(stone.deletes(found) for stone in stones)

        return self._readRaw(key).addCallback(check)

    def listen(self, key: str, callback) -> Deferred:
        # What was heard, by digest: a flood costs 32 bytes a value, and at
        # most maxValuesPerKey of them (then it starts over: callers
        # de-duplicate anyway).
        seen: set[bytes] = set()
        rejected = _Rejected()

        def received(raw: bytes) -> None:
            try:
                found = entry.parse(raw)
            except entry.BadEntry as e:
                rejected(e)
                if self._reportRejected(key, rejected):
                    # Said: count afresh from here.
                    rejected.count, rejected.first = 0, None
                return
            if not isinstance(found, entry.PutEntry):
                return
            if found.expires <= self._clock.seconds():
                return
            ident = hashlib.sha256(
                found.passwordHash.encode("ascii") + b"\0" + found.value
            ).digest()
            if ident in seen:
                return
            if len(seen) >= self.maxValuesPerKey:
                seen.clear()
            seen.add(ident)
            try:
                callback(found.value)
            except Exception:
                self.log.failure("DHT listener for {key} failed", key=key)

        return self._listenRaw(key, received)
