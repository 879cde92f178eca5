# -*- test-case-name: tests.test_dht_entry -*-
"""
The entries p2pmta stores in a DHT, and the reading rules shared by every
provider.

OpenDHT stores opaque values and has no remote delete, so the paper's
contract is built on top of it, as OpenDHT/Bamboo's C{rm} was: each stored
value is a small JSON document.  A I{put} entry carries the value, the SHA-1
of its password (never the password) and its exact expiry time; a
I{tombstone} deletes a put entry by naming the SHA-256 of its value and
revealing the password, and lives as long as its target.  Readers enforce
expiry, hide tombstoned values and drop duplicates (OpenDHT may hand back the
same value twice, or an old copy beside a renewed one).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

from p2pmta.errors import NotFound, ValueTooLarge, WrongPassword

#: The largest value p2pmta stores under one key.  OpenDHT refuses values
#: over 64 KiB; base64 and the JSON envelope take the rest.
MAX_VALUE_SIZE = 46 * 1024

#: Largest encoded entry accepted from the network.
MAX_ENTRY_SIZE = 64 * 1024

_VERSION = 1


def keyHash(key: str) -> str:
    """
    @return: the hex SHA-1 of a text key: its OpenDHT C{InfoHash}.  The
        key C{"hash:" + keyHash(k)} names the same DHT key as C{k}, for
        those who may store under a key without learning its name.
    """
    if key.startswith("hash:"):
        return key[5:].lower()
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def passwordHash(password: bytes) -> str:
    """
    @return: the hex SHA-1 of C{password}, as the paper's DHT stores it.
    """
    return hashlib.sha1(password).hexdigest()


def valueHash(value: bytes) -> str:
    """
    @return: the hex SHA-256 naming C{value} in tombstones.
    """
    return hashlib.sha256(value).hexdigest()


@dataclass(frozen=True)
class PutEntry:
    """
    A value stored under a key.

    @ivar value: the stored bytes.
    @ivar passwordHash: hex SHA-1 of the password that may delete it.
    @ivar expires: POSIX time after which readers ignore it.
    """

    value: bytes
    passwordHash: str
    expires: float

    def encode(self) -> bytes:
        return _dump(
            {
                "p2pmta": _VERSION,
                "kind": "put",
                "value": base64.b64encode(self.value).decode("ascii"),
                "pwhash": self.passwordHash,
                "expires": self.expires,
            }
        )


@dataclass(frozen=True)
class Tombstone:
    """
    The deletion of a put entry.

    @ivar target: hex SHA-256 of the deleted value.
    @ivar password: the password given at put, which proves the right to
        delete.
    @ivar expires: POSIX time after which the tombstone is no longer needed.
    """

    target: str
    password: bytes
    expires: float

    def encode(self) -> bytes:
        return _dump(
            {
                "p2pmta": _VERSION,
                "kind": "del",
                "target": self.target,
                "password": base64.b64encode(self.password).decode("ascii"),
                "expires": self.expires,
            }
        )

    def deletes(self, entry: PutEntry) -> bool:
        """
        @return: whether this tombstone deletes C{entry}: it names the
            entry's value and proves its password.
        """
        return (
            self.target == valueHash(entry.value)
            and passwordHash(self.password) == entry.passwordHash
        )


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("ascii")


def makePut(value: bytes, password: bytes, ttl: float, now: float) -> PutEntry:
    """
    Build the entry that stores C{value} for C{ttl} seconds from C{now}.

    @raise ValueTooLarge: if C{value} exceeds L{MAX_VALUE_SIZE}.
    """
    if not isinstance(value, bytes) or not isinstance(password, bytes):
        raise TypeError("DHT values and passwords are bytes")
    if len(value) > MAX_VALUE_SIZE:
        raise ValueTooLarge(f"{len(value)} bytes, at most {MAX_VALUE_SIZE}")
    if ttl <= 0:
        raise ValueError("a time to live must be positive")
    return PutEntry(value, passwordHash(password), now + ttl)


def decode(raw: bytes) -> PutEntry | Tombstone | None:
    """
    Decode an entry read from the network.

    @return: the entry, or L{None} if C{raw} is not a well-formed p2pmta
        entry (anyone may store anything under any key).
    """
    if len(raw) > MAX_ENTRY_SIZE:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("p2pmta") != _VERSION:
            return None
        expires = doc["expires"]
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            return None
        if doc["kind"] == "put":
            pwhash = doc["pwhash"]
            if not (isinstance(pwhash, str) and len(pwhash) == 40):
                return None
            int(pwhash, 16)
            value = base64.b64decode(doc["value"], validate=True)
            return PutEntry(value, pwhash.lower(), float(expires))
        if doc["kind"] == "del":
            target = doc["target"]
            if not (isinstance(target, str) and len(target) == 64):
                return None
            int(target, 16)
            password = base64.b64decode(doc["password"], validate=True)
            return Tombstone(target.lower(), password, float(expires))
    except (ValueError, KeyError, TypeError):
        return None
    return None


def liveEntries(raws: Iterable[bytes], now: float) -> list[PutEntry]:
    """
    Apply the reading rules to the raw values found under one key: drop
    garbage, expired entries and tombstoned values, and keep each
    C{(value, passwordHash)} once, with its latest expiry.

    @return: the live put entries, in the order first seen.
    """
    puts: dict[tuple[bytes, str], PutEntry] = {}
    tombstones: list[Tombstone] = []
    for raw in raws:
        entry = decode(raw)
        if entry is None or entry.expires <= now:
            continue
        if isinstance(entry, Tombstone):
            tombstones.append(entry)
            continue
        ident = (entry.value, entry.passwordHash)
        known = puts.get(ident)
        if known is None or known.expires < entry.expires:
            puts[ident] = entry
    return [
        entry
        for entry in puts.values()
        if not any(stone.deletes(entry) for stone in tombstones)
    ]


def liveValues(raws: Iterable[bytes], now: float) -> list[bytes]:
    """
    @return: each live value under a key once (see L{liveEntries}).
    """
    seen: set[bytes] = set()
    values = []
    for entry in liveEntries(raws, now):
        if entry.value not in seen:
            seen.add(entry.value)
            values.append(entry.value)
    return values


def makeTombstone(
    raws: Iterable[bytes], value: bytes, password: bytes, now: float
) -> Tombstone:
    """
    Build the tombstone that deletes C{value}, given the raw values under
    its key.

    @raise NotFound: if no live entry holds C{value}.
    @raise WrongPassword: if none of them was stored with C{password}.
    """
    holders = [entry for entry in liveEntries(raws, now) if entry.value == value]
    if not holders:
        raise NotFound()
    wanted = passwordHash(password)
    matching = [entry for entry in holders if entry.passwordHash == wanted]
    if not matching:
        raise WrongPassword()
    return Tombstone(
        valueHash(value), password, max(entry.expires for entry in matching)
    )
