# -*- test-case-name: tests.test_openpgp -*-
"""
Detached v4 EdDSA signatures of binary data, made by L{sign} and checked by
L{verify} as C{gpg --detach-sign} and C{gpg --verify} do, and the signature
packets (L{Signature}) that also bind a key's subkeys.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pmta.errors import BadSignature
from p2pmta.openpgp.packets import (
    EDDSA,
    FAILURES,
    HASHES,
    MAX_SMALL_PACKET,
    Malformed,
    dearmor,
    fixedLength,
    lengthBytes,
    mpiBytes,
    packetBytes,
    readExactly,
    readMPI,
    readNumber,
    readPackets,
)

if TYPE_CHECKING:
    from p2pmta.openpgp.keys import PublicKey, SecretKey

_KNOWN_SUBPACKETS = {2, 3, 9, 11, 16, 21, 22, 23, 25, 27, 30, 33}
_SIGN_HASH = 10  # SHA-512


def _subpackets(area: bytes, hashed: bool) -> dict[int, bytes]:
    stream, found = io.BytesIO(area), {}
    while first := stream.read(1):
        n = first[0]
        if 192 <= n < 255:
            n = ((n - 192) << 8) + readNumber(stream, 1) + 192
        elif n == 255:
            n = readNumber(stream, 4)
        if n == 0:
            raise Malformed("empty subpacket")
        kind, value = readNumber(stream, 1), readExactly(stream, n - 1)
        if hashed and kind & 0x80 and kind & 0x7F not in _KNOWN_SUBPACKETS:
            raise Malformed(f"unknown critical subpacket {kind & 0x7F}")
        found.setdefault(kind & 0x7F, value)
    return found


def _subpacket(kind: int, value: bytes) -> bytes:
    return lengthBytes(len(value) + 1) + bytes([kind]) + value


@dataclass(frozen=True)
class Signature:
    """A v4 EdDSA signature packet."""

    type: int
    hashAlgorithm: int
    head: bytes  # version to the end of the hashed subpackets
    hashed: dict
    unhashed: dict
    left16: bytes
    value: bytes  # R || S

    @classmethod
    def parse(cls, body: bytes) -> Signature:
        stream = io.BytesIO(body)
        version, kind, algorithm, hashAlgorithm = readExactly(stream, 4)
        if version != 4 or algorithm != EDDSA or hashAlgorithm not in HASHES:
            raise Malformed("unsupported signature")
        hashed = _subpackets(readExactly(stream, readNumber(stream, 2)), True)
        head = body[: stream.tell()]
        unhashed = _subpackets(readExactly(stream, readNumber(stream, 2)), False)
        left16, r, s = (
            readExactly(stream, 2),
            fixedLength(readMPI(stream)),
            fixedLength(readMPI(stream)),
        )
        if stream.read(1) or 2 not in hashed or len(hashed[2]) != 4:
            raise Malformed("malformed signature")
        return cls(kind, hashAlgorithm, head, hashed, unhashed, left16, r + s)

    def good(self, key: Ed25519PublicKey, now: float, *signed: bytes) -> bool:
        """@return: whether this signature by C{key} over C{signed} is good now."""
        digest = hashlib.new(HASHES[self.hashAlgorithm])
        for part in signed:
            digest.update(part)
        digest.update(self.head + b"\x04\xff" + len(self.head).to_bytes(4, "big"))
        created = int.from_bytes(self.hashed[2], "big")
        expiry = int.from_bytes(self.hashed.get(3, b""), "big")
        if expiry and created + expiry <= now or digest.digest()[:2] != self.left16:
            return False
        try:
            key.verify(self.value, digest.digest())
        except InvalidSignature:
            return False
        return True


def sign(data: bytes, secretKey: SecretKey) -> bytes:
    """
    @return: a detached binary v4 signature of C{data} by C{secretKey}'s
        primary key (EdDSA over SHA-512), as C{gpg --detach-sign} makes.
    """
    fingerprint = bytes.fromhex(secretKey.publicKey.fingerprint)
    hashed = _subpacket(33, b"\x04" + fingerprint)
    hashed += _subpacket(2, int(time.time()).to_bytes(4, "big"))
    head = bytes([4, 0x00, EDDSA, _SIGN_HASH]) + len(hashed).to_bytes(2, "big")
    head += hashed
    digest = hashlib.new(HASHES[_SIGN_HASH], data)
    digest.update(head + b"\x04\xff" + len(head).to_bytes(4, "big"))
    value = secretKey._signing.sign(digest.digest())
    unhashed = _subpacket(16, fingerprint[-8:])
    body = head + len(unhashed).to_bytes(2, "big") + unhashed + digest.digest()[:2]
    return packetBytes(2, body + mpiBytes(value[:32]) + mpiBytes(value[32:]))


def verify(data: bytes, signature: bytes, publicKey: PublicKey) -> str:
    """
    Check a detached signature of binary C{data} (binary or armoured, as
    C{gpg --detach-sign} makes) by C{publicKey}'s primary key.

    @return: the primary key's fingerprint.
    @raise BadSignature: for anything but one good signature by that key.
    """
    try:
        if len(signature) > MAX_SMALL_PACKET:
            raise Malformed("signature too long")
        packets = readPackets(dearmor(signature))
        if len(packets) != 1 or packets[0][0] != 2:
            raise Malformed("not one signature packet")
        parsed = Signature.parse(packets[0][1])
        issuer = parsed.hashed.get(33, parsed.unhashed.get(33))
        keyId = parsed.hashed.get(16, parsed.unhashed.get(16))
        fingerprint = bytes.fromhex(publicKey.fingerprint)
        if parsed.type != 0x00:
            raise Malformed(f"not a binary document signature: {parsed.type:#x}")
        if issuer not in (None, b"\x04" + fingerprint):
            raise Malformed("signed by another key")
        if keyId not in (None, fingerprint[-8:]):
            raise Malformed("signed by another key")
        if not parsed.good(publicKey.signingKey, time.time(), data):
            raise Malformed("bad signature")
    except (*FAILURES, TypeError) as e:
        raise BadSignature(str(e)) from None
    return publicKey.fingerprint
