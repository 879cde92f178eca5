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
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from p2pmta.errors import DHTError, NotFound, ValueTooLarge, WrongPassword

#: The largest value p2pmta stores under one key.  OpenDHT refuses values
#: over 64 KiB; base64 and the JSON envelope take the rest.
MAX_VALUE_SIZE = 46 * 1024

#: Largest encoded entry accepted from the network.
MAX_ENTRY_SIZE = 64 * 1024

#: Most raw values read under one key: anyone may store anything under any
#: key, so a reader takes this many and ignores the rest.  A busy inbox key
#: holds a week of notifications and their tombstones, some thousands.
MAX_VALUES_PER_KEY = 8192

#: Most bytes of raw values read under one key (see L{MAX_VALUES_PER_KEY}).
MAX_BYTES_PER_KEY = 32 * 1024 * 1024

_VERSION = 1

_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class BadEntry(DHTError):
    """A value read from the DHT is not a well-formed p2pmta entry."""


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


def parse(raw: bytes) -> PutEntry | Tombstone:
    """
    Decode an entry read from the network.

    @raise BadEntry: if C{raw} is not a well-formed p2pmta entry (anyone may
        store anything under any key), saying why.
    """
    if not isinstance(raw, bytes):
        raise BadEntry(f"not bytes but {type(raw).__name__}")
    if len(raw) > MAX_ENTRY_SIZE:
        raise BadEntry(f"{len(raw)} bytes, at most {MAX_ENTRY_SIZE}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: "[[[[..." nested deeper than the interpreter's stack.
        raise BadEntry("not JSON") from None
    if not isinstance(doc, dict):
        raise BadEntry("not a JSON object")
    version = doc.get("p2pmta")
    if type(version) is not int or version != _VERSION:
        raise BadEntry("not a p2pmta entry of a known version")
    expires = doc.get("expires")
    if type(expires) not in (int, float):
        raise BadEntry("no expiry time")
    try:
        expires = float(expires)
    except OverflowError:
        raise BadEntry("expiry time out of range") from None
    if not math.isfinite(expires):
        raise BadEntry("expiry time out of range")
    kind = doc.get("kind")
    if kind == "put":
        pwhash = doc.get("pwhash")
        if not (isinstance(pwhash, str) and _SHA1_HEX.fullmatch(pwhash)):
            raise BadEntry("malformed password hash")
        return PutEntry(_base64(doc.get("value")), pwhash.lower(), expires)
    if kind == "del":
        target = doc.get("target")
        if not (isinstance(target, str) and _SHA256_HEX.fullmatch(target)):
            raise BadEntry("malformed target")
        return Tombstone(target.lower(), _base64(doc.get("password")), expires)
    raise BadEntry("unknown kind")


def _base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise BadEntry("malformed base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadEntry("malformed base64") from None


def decode(raw: bytes) -> PutEntry | Tombstone | None:
    """
    Decode an entry read from the network.

    @return: the entry, or L{None} if C{raw} is not a well-formed p2pmta
        entry (see L{parse}).
    """
    try:
        return parse(raw)
    except BadEntry:
        return None


def liveEntries(raws: Iterable[bytes], now: float, rejected=None) -> list[PutEntry]:
    """
    Apply the reading rules to the raw values found under one key: drop
    garbage, expired entries and tombstoned values, and keep each
    C{(value, passwordHash)} once, with its latest expiry.

    It takes time linear in the number and size of C{raws}: tombstones are
    looked up by target, not tried against every entry.

    @param rejected: if given, called with the L{BadEntry} of each raw value
        that is not an entry.

    @return: the live put entries, in the order first seen.
    """
    puts: dict[tuple[bytes, str], PutEntry] = {}
    # target -> hashes of the passwords revealed by live tombstones
    deletions: dict[str, set[str]] = {}
    for raw in raws:
        try:
            entry = parse(raw)
        except BadEntry as e:
            if rejected is not None:
                rejected(e)
            continue
        if entry.expires <= now:
            continue
        if isinstance(entry, Tombstone):
            deletions.setdefault(entry.target, set()).add(passwordHash(entry.password))
            continue
        ident = (entry.value, entry.passwordHash)
        known = puts.get(ident)
        if known is None or known.expires < entry.expires:
            puts[ident] = entry
    if not deletions:
        return list(puts.values())
    return [
        entry
        for entry in puts.values()
        if entry.passwordHash not in deletions.get(valueHash(entry.value), ())
    ]


def liveValues(raws: Iterable[bytes], now: float, rejected=None) -> list[bytes]:
    """
    @return: each live value under a key once (see L{liveEntries}).
    """
    seen: set[bytes] = set()
    values = []
    for entry in liveEntries(raws, now, rejected):
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
