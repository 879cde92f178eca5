# -*- test-case-name: tests.test_openpgp -*-
"""
p2pmta's OpenPGP keys, L{PublicKey} and L{SecretKey}, read from the output
of C{gpg --export} and C{gpg --export-secret-keys}: a v4 EdDSA Ed25519
primary key and a v4 ECDH Curve25519 encryption subkey, which counts only
with a good binding signature by the primary key.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from p2pmta.errors import BadKey
from p2pmta.openpgp.packets import (
    AES_KEY_SIZES,
    CV25519,
    ECDH,
    EDDSA,
    FAILURES,
    Malformed,
    dearmor,
    fixedLength,
    readExactly,
    readMPI,
    readNumber,
    readPackets,
    readPoint,
)
from p2pmta.openpgp.signatures import Signature

_ED25519 = bytes.fromhex("2b06010401da470f01")  # 1.3.6.1.4.1.11591.15.1
_KDF_HASHES = {8, 9, 10}
_MAX_EXPORT = 1 << 20


def _fingerprint(public: bytes) -> bytes:
    return hashlib.sha1(b"\x99" + len(public).to_bytes(2, "big") + public).digest()


@dataclass(frozen=True)
class _KeyPacket:
    created: int
    algorithm: int
    oid: bytes
    point: bytes
    kdf: bytes  # ECDH only: hash id, cipher id
    public: bytes  # the public part of the body, as hashed in fingerprints
    secret: bytes | None

    @classmethod
    def parse(cls, body: bytes, secret: bool) -> _KeyPacket:
        stream = io.BytesIO(body)
        version, created, algorithm = struct.unpack(">BIB", readExactly(stream, 6))
        if version != 4 or algorithm not in (EDDSA, ECDH):
            raise Malformed(
                f"unsupported key: version {version}, algorithm {algorithm}"
            )
        oid = readExactly(stream, readNumber(stream, 1))
        point, kdf = readPoint(stream), b""
        if algorithm == ECDH:
            kdf = readExactly(stream, readNumber(stream, 1))
            if len(kdf) != 3 or kdf[0] != 1:
                raise Malformed("unsupported ECDH parameters")
            kdf = kdf[1:]
        public, value = body[: stream.tell()], None
        if secret:
            if readNumber(stream, 1) != 0:
                raise Malformed("the secret key is protected")
            start = stream.tell()
            value = fixedLength(readMPI(stream))
            checksum = sum(body[start : stream.tell()]) & 0xFFFF
            if readNumber(stream, 2) != checksum:
                raise Malformed("bad secret key checksum")
        if stream.read(1):
            raise Malformed("data after the key")
        return cls(created, algorithm, oid, point, kdf, public, value)

    def hashed(self) -> bytes:
        return b"\x99" + len(self.public).to_bytes(2, "big") + self.public


@dataclass(frozen=True)
class PublicKey:
    """
    A p2pmta public key: an Ed25519 primary key and a Curve25519 subkey.

    @ivar fingerprint: the primary key's v4 fingerprint, upper-case hex.
    @ivar signingKey: the primary key.
    @ivar encryptionKey: the encryption subkey.
    @ivar encryptionFingerprint: the subkey's v4 fingerprint (20 bytes).
    @ivar kdfHash: the subkey's RFC 6637 KDF hash (OpenPGP id).
    @ivar kdfCipher: the subkey's RFC 6637 key wrap cipher (OpenPGP id).
    """

    fingerprint: str
    signingKey: Ed25519PublicKey
    encryptionKey: X25519PublicKey
    encryptionFingerprint: bytes
    kdfHash: int
    kdfCipher: int

    @property
    def keyId(self) -> bytes:
        return bytes.fromhex(self.fingerprint)[-8:]

    @property
    def encryptionKeyId(self) -> bytes:
        return self.encryptionFingerprint[-8:]

    @classmethod
    def fromExport(cls, data: bytes) -> PublicKey:
        """
        Read the output of C{gpg --export} (binary or armoured) of one key.

        @raise BadKey: if C{data} is not one Ed25519 key with a bound,
            unrevoked, unexpired Curve25519 encryption subkey, or is over 1 MiB.
        """
        return _readKey(data, secret=False)[0]


class SecretKey:
    """
    A p2pmta secret key, from L{SecretKey.fromExport}.

    @ivar publicKey: its L{PublicKey}.
    """

    def __init__(self, publicKey: PublicKey, signing, decrypting):
        self.publicKey = publicKey
        self._signing: Ed25519PrivateKey = signing
        self._decrypting: X25519PrivateKey = decrypting

    @classmethod
    def fromExport(cls, data: bytes) -> SecretKey:
        """
        Read the output of C{gpg --export-secret-keys} of one unprotected key.

        @raise BadKey: as L{PublicKey.fromExport}, or if the key is protected.
        """
        return cls(*_readKey(data, secret=True))

    def __repr__(self) -> str:
        return f"<SecretKey {self.publicKey.fingerprint}>"


def _readKey(data: bytes, secret: bool):
    if not isinstance(data, bytes) or len(data) > _MAX_EXPORT:
        raise BadKey("not bytes, or over 1 MiB")
    try:
        return _readKeyBlock(readPackets(dearmor(data)), secret)
    except FAILURES as e:
        raise BadKey(str(e)) from None


def _readKeyBlock(packets, secret: bool):
    keyTag, subkeyTag = (5, 7) if secret else (6, 14)
    if not packets or packets[0][0] != keyTag:
        raise Malformed("no primary key")
    primary = _KeyPacket.parse(packets[0][1], secret)
    if primary.algorithm != EDDSA or primary.oid != _ED25519:
        raise Malformed("the primary key is not Ed25519")
    signingKey = Ed25519PublicKey.from_public_bytes(primary.point)
    # subkey: None before any user id or subkey (where a key revocation
    # may be), False after a user id or a subkey we do not use.
    now, subkey, bound, revoked = time.time(), None, {}, set()
    for tag, body in packets[1:]:
        if tag == subkeyTag:
            try:
                subkey = _KeyPacket.parse(body, secret)
            except Malformed:
                subkey = False
            else:
                ok = subkey.algorithm == ECDH and subkey.oid == CV25519
                ok = (
                    ok
                    and subkey.kdf[0] in _KDF_HASHES
                    and subkey.kdf[1] in AES_KEY_SIZES
                )
                subkey = subkey if ok else False
        elif tag in (13, 17):  # user id, user attribute: their signatures follow
            subkey = False
        elif tag == 2:
            try:
                signature = Signature.parse(body)
            except Malformed:
                continue  # a certification we cannot read is no concern of ours
            if subkey is None:
                signed = (primary.hashed(),)
                if signature.type == 0x20 and signature.good(signingKey, now, *signed):
                    raise Malformed("the key is revoked")
            elif subkey:
                signed = (primary.hashed(), subkey.hashed())
                if not signature.good(signingKey, now, *signed):
                    continue
                if signature.type == 0x28:
                    revoked.add(subkey.public)
                elif signature.type == 0x18:  # the newest binding counts
                    when, usable = (
                        signature.hashed[2],
                        _encrypts(signature, subkey, now),
                    )
                    if bound.get(subkey.public, (b"",))[0] <= when:
                        bound[subkey.public] = when, subkey, usable
        elif tag == keyTag:
            raise Malformed("more than one key")
        elif tag not in (10, 12):  # marker, trust
            raise Malformed(f"unexpected packet {tag}")
    usable = [k for _, k, ok in bound.values() if ok and k.public not in revoked]
    if not usable:
        raise Malformed("no usable encryption subkey")
    subkey = max(usable, key=lambda k: k.created)
    publicKey = PublicKey(
        _fingerprint(primary.public).hex().upper(),
        signingKey,
        X25519PublicKey.from_public_bytes(subkey.point),
        _fingerprint(subkey.public),
        subkey.kdf[0],
        subkey.kdf[1],
    )
    if not secret:
        return (publicKey,)
    signing = Ed25519PrivateKey.from_private_bytes(primary.secret)
    # gpg stores the Curve25519 scalar as a big-endian MPI: reversed.
    decrypting = X25519PrivateKey.from_private_bytes(subkey.secret[::-1])
    if (
        signing.public_key() != publicKey.signingKey
        or decrypting.public_key() != publicKey.encryptionKey
    ):
        raise Malformed("secret and public parts do not match")
    return publicKey, signing, decrypting


def _encrypts(binding: Signature, subkey: _KeyPacket, now: float) -> bool:
    """@return: whether C{binding} lets C{subkey} encrypt now."""
    flags = binding.hashed.get(27, b"\x0c")[:1] or b"\0"
    expiry = int.from_bytes(binding.hashed.get(9, b""), "big")
    return bool(flags[0] & 0x0C) and not (expiry and subkey.created + expiry <= now)
