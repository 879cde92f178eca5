# -*- test-case-name: tests.test_openpgp -*-
"""
OpenPGP in-process, for the one kind of key p2pmta makes, without running gpg.

GnuPG 2.2 makes p2pmta's keys: a v4 EdDSA Ed25519 primary key that signs and
a v4 ECDH Curve25519 subkey that encrypts.  For those keys this module writes
and reads standard OpenPGP (RFC 4880 with RFC 6637 ECDH), so gpg reads what
we write and we read what gpg writes:

  - L{PublicKey.fromExport} and L{SecretKey.fromExport} read the output of
    C{gpg --export} and C{gpg --export-secret-keys} (binary or armoured); an
    encryption subkey counts only with a good binding signature by the
    primary key;
  - L{encrypt} writes PKESK v3 packets (X25519, RFC 6637 KDF, AES key wrap)
    and a SEIPD v1 packet (AES-256, with MDC) around an optional ZLIB
    compressed packet around a binary literal packet, streaming;
  - L{decrypt} reads such messages (from us or from gpg), streaming, and
    raises L{DecryptionFailed} for anything else;
  - L{sign} and L{verify} make and check detached v4 EdDSA signatures of
    binary data.

All functions block and are pure; run them in a thread.  L{decrypt} writes
plaintext before the MDC at the end of the message is checked: after a
failure the caller must discard everything written to C{dst} (p2pmta writes
to a temporary file and removes it).

Deliberately not supported: other key algorithms (RSA, DSA, ElGamal, NIST
and Brainpool curves, the RFC 9580 Ed25519/X25519 types), v3, v5 and v6 keys
or signatures; protected secret keys; session keys other than AES (we write
AES-256); AEAD and SEIPD v2; encrypted data without MDC (tag 9), which is
refused; signed-and-encrypted messages (one-pass signatures are refused);
BZip2 compression (refused); more than one compression layer; armoured
messages (keys and signatures may be armoured); text-mode (0x01) signatures.
User ids, their self-signatures and the primary key's expiry are not read:
which key belongs to an address is the keyring's business.  Partial body
chunks shorter than 512 bytes are refused (RFC 4880 allows them after the
first; gpg never writes them), so a message costs work in proportion to its
size.  The CRC-24 line of armour is ignored, as RFC 9580 asks; so are the
two repeated bytes of the encrypted prefix (the "quick check"): only the MDC
decides.  Session key packets for other keys or algorithms, and symmetric
ones, are skipped; a wildcard key id (zero) is tried with our key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from p2pmta.errors import BadKey, BadSignature, DecryptionFailed

_EDDSA, _ECDH = 22, 18
_ED25519 = bytes.fromhex("2b06010401da470f01")  # 1.3.6.1.4.1.11591.15.1
_CV25519 = bytes.fromhex("2b060104019755010501")  # 1.3.6.1.4.1.3029.1.5.1
_AES = {7: 16, 8: 24, 9: 32}  # OpenPGP cipher id: key size
_HASHES = {8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_KDF_HASHES = {8, 9, 10}
_KNOWN_SUBPACKETS = {2, 3, 9, 11, 16, 21, 22, 23, 25, 27, 30, 33}
_CHUNK = 1 << 16
_PARTIAL = bytes([0xE0 | 16])  # a partial body chunk of _CHUNK bytes
_MIN_PARTIAL = 512
_MAX_EXPORT = 1 << 20
_MAX_SMALL_PACKET = 1 << 16  # signatures, session key packets
_MAX_ESKS = 1000
_MDC_HEADER = b"\xd3\x14"
_MDC_SIZE = 22
_PREFIX_SIZE = 18  # AES block + 2 repeated bytes
_SIGN_HASH = 10  # SHA-512


class _Malformed(Exception):
    """Not OpenPGP as this module reads it; public functions translate it."""


_FAILURES = (
    _Malformed,
    ValueError,  # binascii.Error, UnicodeDecodeError, bad key lengths, ...
    zlib.error,
    InvalidUnwrap,
    InvalidSignature,
    UnsupportedAlgorithm,
)


# Reading packets: streams are anything with read(n), which returns at most
# n bytes and b"" only at the end.


def _exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise _Malformed("truncated")
        data += more
    return data


def _number(stream, n: int) -> int:
    return int.from_bytes(_exactly(stream, n), "big")


def _length(stream, partialAllowed: bool) -> tuple[int, bool]:
    """Read a new-format body length. @return: C{(length, partial)}."""
    first = _number(stream, 1)
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + _number(stream, 1) + 192, False
    if first == 255:
        return _number(stream, 4), False
    if not partialAllowed or 1 << (first & 0x1F) < _MIN_PARTIAL:
        raise _Malformed("partial body length not allowed here")
    return 1 << (first & 0x1F), True


class _Body:
    """The body of one packet, whatever its length encoding."""

    def __init__(self, stream, length: int | None, partial: bool):
        self._stream, self._left, self._partial = stream, length, partial

    def read(self, n: int) -> bytes:
        if self._left is None:  # indeterminate: to the end of the container
            return self._stream.read(n)
        while not self._left and self._partial:
            self._left, self._partial = _length(self._stream, True)
        if not self._left or n <= 0:
            return b""
        data = self._stream.read(min(n, self._left))
        if not data:
            raise _Malformed("truncated packet")
        self._left -= len(data)
        return data

    def readAll(self, limit: int) -> bytes:
        """@return: the whole body of a definite-length packet of C{limit} bytes at most."""
        if self._partial or self._left is None or self._left > limit:
            raise _Malformed("packet too long")
        return _exactly(self, self._left)


def _header(stream, partial=(), indeterminate=()) -> tuple[int, _Body] | None:
    """
    Read a packet header; only tags in C{partial} may have partial body
    lengths, only tags in C{indeterminate} old-format indeterminate ones.

    @return: C{(tag, body)}, or L{None} at the end of C{stream}.
    """
    first = stream.read(1)
    if not first:
        return None
    ctb = first[0]
    if not ctb & 0x80:
        raise _Malformed("not an OpenPGP packet")
    if ctb & 0x40:
        tag = ctb & 0x3F
        return tag, _Body(stream, *_length(stream, tag in partial))
    tag, kind = (ctb >> 2) & 0x0F, ctb & 3
    if kind == 3:
        if tag not in indeterminate:
            raise _Malformed("indeterminate length not allowed here")
        return tag, _Body(stream, None, False)
    return tag, _Body(stream, _number(stream, 1 << kind), False)


def _packets(data: bytes) -> list[tuple[int, bytes]]:
    """@return: the C{(tag, body)} of each definite-length packet in C{data}."""
    stream, packets = io.BytesIO(data), []
    while (found := _header(stream)) is not None:
        packets.append((found[0], found[1].readAll(len(data))))
    return packets


def _mpi(stream) -> bytes:
    """Read a multiprecision integer, which must be in canonical form."""
    bits = _number(stream, 2)
    value = _exactly(stream, (bits + 7) // 8)
    if int.from_bytes(value, "big").bit_length() != bits:
        raise _Malformed("non-canonical MPI")
    return value


def _point(stream) -> bytes:
    """Read a Curve25519 point (an MPI: 0x40 and 32 bytes)."""
    value = _mpi(stream)
    if len(value) != 33 or value[0] != 0x40:
        raise _Malformed("not a Curve25519 point")
    return value[1:]


def _fixed(value: bytes, size: int = 32) -> bytes:
    if len(value) > size:
        raise _Malformed("integer too long")
    return value.rjust(size, b"\0")


def unarmor(data: bytes) -> bytes:
    """
    @return: C{data}, with its ASCII armour taken off if it has one.

    @raise ValueError: if the armour is broken.
    """
    try:
        return _dearmor(data)
    except (_Malformed, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"bad ASCII armour: {e}") from None


def _dearmor(data: bytes) -> bytes:
    """@return: C{data}, with its ASCII armour taken off if it has one."""
    if data.lstrip()[:5] != b"-----":
        return data
    lines = [line.strip() for line in data.decode("ascii").splitlines()]
    begins = [i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP ")]
    if not begins:
        raise _Malformed("no armour")
    i = begins[0] + 1
    while i < len(lines) and ":" in lines[i]:  # armour headers
        i += 1
    body = []
    for line in lines[i:]:
        if line.startswith("-----END PGP "):
            return base64.b64decode("".join(body), validate=True)
        if not line.startswith("="):  # the CRC-24 line
            body.append(line)
    raise _Malformed("armour not ended")


# Writing packets.


def _lengthBytes(n: int) -> bytes:
    if n < 192:
        return bytes([n])
    if n < 8384:
        return bytes([((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def _packet(tag: int, body: bytes) -> bytes:
    return bytes([0xC0 | tag]) + _lengthBytes(len(body)) + body


def _mpiBytes(value: bytes) -> bytes:
    bits = int.from_bytes(value, "big").bit_length()
    return bits.to_bytes(2, "big") + value.lstrip(b"\0")


class _Terminal:
    """The end of a chain of writers: C{dst}, which we do not close."""

    def __init__(self, dst: BinaryIO):
        self.write = dst.write

    def close(self) -> None:
        pass


class _PacketWriter:
    """Write one packet, in partial body chunks once it exceeds one chunk."""

    def __init__(self, tag: int, sink, head: bytes = b""):
        self._tag, self._sink, self._buffer = tag, sink, bytearray(head)

    def write(self, data) -> None:
        self._buffer += data
        if len(self._buffer) > _CHUNK:  # keep >= 1 byte for the final header
            end = (len(self._buffer) - 1) // _CHUNK * _CHUNK
            with memoryview(self._buffer) as view:
                for start in range(0, end, _CHUNK):
                    self._sink.write(self._ctb() + _PARTIAL)
                    self._sink.write(view[start : start + _CHUNK])
                    self._tag = None  # the packet's tag has been written
            del self._buffer[:end]

    def _ctb(self) -> bytes:
        return b"" if self._tag is None else bytes([0xC0 | self._tag])

    def close(self) -> None:
        self._sink.write(self._ctb() + _lengthBytes(len(self._buffer)))
        self._sink.write(self._buffer)
        self._sink.close()


class _Compressing:
    def __init__(self, sink, level: int):
        self._sink, self._zlib = sink, zlib.compressobj(level)

    def write(self, data) -> None:
        self._sink.write(self._zlib.compress(data))

    def close(self) -> None:
        self._sink.write(self._zlib.flush())
        self._sink.close()


class _Encrypting:
    """The contents of a SEIPD v1 packet: random prefix, data, MDC; AES-CFB."""

    def __init__(self, sink, key: bytes):
        self._sink, self._hash = sink, hashlib.sha1()
        self._cipher = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
        prefix = os.urandom(16)
        self.write(prefix + prefix[-2:])

    def write(self, data) -> None:
        self._hash.update(data)
        self._sink.write(self._cipher.update(data))

    def close(self) -> None:
        self._hash.update(_MDC_HEADER)
        self._sink.write(self._cipher.update(_MDC_HEADER + self._hash.digest()))
        self._sink.write(self._cipher.finalize())
        self._sink.close()


# Keys.


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
        version, created, algorithm = struct.unpack(">BIB", _exactly(stream, 6))
        if version != 4 or algorithm not in (_EDDSA, _ECDH):
            raise _Malformed(
                f"unsupported key: version {version}, algorithm {algorithm}"
            )
        oid = _exactly(stream, _number(stream, 1))
        point, kdf = _point(stream), b""
        if algorithm == _ECDH:
            kdf = _exactly(stream, _number(stream, 1))
            if len(kdf) != 3 or kdf[0] != 1:
                raise _Malformed("unsupported ECDH parameters")
            kdf = kdf[1:]
        public, value = body[: stream.tell()], None
        if secret:
            if _number(stream, 1) != 0:
                raise _Malformed("the secret key is protected")
            start = stream.tell()
            value = _fixed(_mpi(stream))
            checksum = sum(body[start : stream.tell()]) & 0xFFFF
            if _number(stream, 2) != checksum:
                raise _Malformed("bad secret key checksum")
        if stream.read(1):
            raise _Malformed("data after the key")
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
        return _readKeyBlock(_packets(_dearmor(data)), secret)
    except _FAILURES as e:
        raise BadKey(str(e)) from None


def _readKeyBlock(packets, secret: bool):
    keyTag, subkeyTag = (5, 7) if secret else (6, 14)
    if not packets or packets[0][0] != keyTag:
        raise _Malformed("no primary key")
    primary = _KeyPacket.parse(packets[0][1], secret)
    if primary.algorithm != _EDDSA or primary.oid != _ED25519:
        raise _Malformed("the primary key is not Ed25519")
    signingKey = Ed25519PublicKey.from_public_bytes(primary.point)
    # subkey: None before any user id or subkey (where a key revocation
    # may be), False after a user id or a subkey we do not use.
    now, subkey, bound, revoked = time.time(), None, {}, set()
    for tag, body in packets[1:]:
        if tag == subkeyTag:
            try:
                subkey = _KeyPacket.parse(body, secret)
            except _Malformed:
                subkey = False
            else:
                ok = subkey.algorithm == _ECDH and subkey.oid == _CV25519
                ok = ok and subkey.kdf[0] in _KDF_HASHES and subkey.kdf[1] in _AES
                subkey = subkey if ok else False
        elif tag in (13, 17):  # user id, user attribute: their signatures follow
            subkey = False
        elif tag == 2:
            try:
                signature = _Signature.parse(body)
            except _Malformed:
                continue  # a certification we cannot read is no concern of ours
            if subkey is None:
                signed = (primary.hashed(),)
                if signature.type == 0x20 and signature.good(signingKey, now, *signed):
                    raise _Malformed("the key is revoked")
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
            raise _Malformed("more than one key")
        elif tag not in (10, 12):  # marker, trust
            raise _Malformed(f"unexpected packet {tag}")
    usable = [k for _, k, ok in bound.values() if ok and k.public not in revoked]
    if not usable:
        raise _Malformed("no usable encryption subkey")
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
        raise _Malformed("secret and public parts do not match")
    return publicKey, signing, decrypting


def _encrypts(binding: _Signature, subkey: _KeyPacket, now: float) -> bool:
    """@return: whether C{binding} lets C{subkey} encrypt now."""
    flags = binding.hashed.get(27, b"\x0c")[:1] or b"\0"
    expiry = int.from_bytes(binding.hashed.get(9, b""), "big")
    return bool(flags[0] & 0x0C) and not (expiry and subkey.created + expiry <= now)


# Signatures.


def _subpackets(area: bytes, hashed: bool) -> dict[int, bytes]:
    stream, found = io.BytesIO(area), {}
    while first := stream.read(1):
        n = first[0]
        if 192 <= n < 255:
            n = ((n - 192) << 8) + _number(stream, 1) + 192
        elif n == 255:
            n = _number(stream, 4)
        if n == 0:
            raise _Malformed("empty subpacket")
        kind, value = _number(stream, 1), _exactly(stream, n - 1)
        if hashed and kind & 0x80 and kind & 0x7F not in _KNOWN_SUBPACKETS:
            raise _Malformed(f"unknown critical subpacket {kind & 0x7F}")
        found.setdefault(kind & 0x7F, value)
    return found


def _subpacket(kind: int, value: bytes) -> bytes:
    return _lengthBytes(len(value) + 1) + bytes([kind]) + value


@dataclass(frozen=True)
class _Signature:
    """A v4 EdDSA signature packet."""

    type: int
    hashAlgorithm: int
    head: bytes  # version to the end of the hashed subpackets
    hashed: dict
    unhashed: dict
    left16: bytes
    value: bytes  # R || S

    @classmethod
    def parse(cls, body: bytes) -> _Signature:
        stream = io.BytesIO(body)
        version, kind, algorithm, hashAlgorithm = _exactly(stream, 4)
        if version != 4 or algorithm != _EDDSA or hashAlgorithm not in _HASHES:
            raise _Malformed("unsupported signature")
        hashed = _subpackets(_exactly(stream, _number(stream, 2)), True)
        head = body[: stream.tell()]
        unhashed = _subpackets(_exactly(stream, _number(stream, 2)), False)
        left16, r, s = _exactly(stream, 2), _fixed(_mpi(stream)), _fixed(_mpi(stream))
        if stream.read(1) or 2 not in hashed or len(hashed[2]) != 4:
            raise _Malformed("malformed signature")
        return cls(kind, hashAlgorithm, head, hashed, unhashed, left16, r + s)

    def good(self, key: Ed25519PublicKey, now: float, *signed: bytes) -> bool:
        """@return: whether this signature by C{key} over C{signed} is good now."""
        digest = hashlib.new(_HASHES[self.hashAlgorithm])
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
    head = bytes([4, 0x00, _EDDSA, _SIGN_HASH]) + len(hashed).to_bytes(2, "big")
    head += hashed
    digest = hashlib.new(_HASHES[_SIGN_HASH], data)
    digest.update(head + b"\x04\xff" + len(head).to_bytes(4, "big"))
    value = secretKey._signing.sign(digest.digest())
    unhashed = _subpacket(16, fingerprint[-8:])
    body = head + len(unhashed).to_bytes(2, "big") + unhashed + digest.digest()[:2]
    return _packet(2, body + _mpiBytes(value[:32]) + _mpiBytes(value[32:]))


def verify(data: bytes, signature: bytes, publicKey: PublicKey) -> str:
    """
    Check a detached signature of binary C{data} (binary or armoured, as
    C{gpg --detach-sign} makes) by C{publicKey}'s primary key.

    @return: the primary key's fingerprint.
    @raise BadSignature: for anything but one good signature by that key.
    """
    try:
        if len(signature) > _MAX_SMALL_PACKET:
            raise _Malformed("signature too long")
        packets = _packets(_dearmor(signature))
        if len(packets) != 1 or packets[0][0] != 2:
            raise _Malformed("not one signature packet")
        parsed = _Signature.parse(packets[0][1])
        issuer = parsed.hashed.get(33, parsed.unhashed.get(33))
        keyId = parsed.hashed.get(16, parsed.unhashed.get(16))
        fingerprint = bytes.fromhex(publicKey.fingerprint)
        if parsed.type != 0x00:
            raise _Malformed(f"not a binary document signature: {parsed.type:#x}")
        if issuer not in (None, b"\x04" + fingerprint):
            raise _Malformed("signed by another key")
        if keyId not in (None, fingerprint[-8:]):
            raise _Malformed("signed by another key")
        if not parsed.good(publicKey.signingKey, time.time(), data):
            raise _Malformed("bad signature")
    except (*_FAILURES, TypeError) as e:
        raise BadSignature(str(e)) from None
    return publicKey.fingerprint


# Encryption.


def _kek(shared: bytes, key: PublicKey) -> bytes:
    """The RFC 6637 key-encryption key for C{key}'s subkey."""
    parameters = bytes([len(_CV25519)]) + _CV25519 + bytes([_ECDH, 3, 1])
    parameters += bytes([key.kdfHash, key.kdfCipher]) + b"Anonymous Sender    "
    digest = hashlib.new(
        _HASHES[key.kdfHash],
        b"\0\0\0\1" + shared + parameters + key.encryptionFingerprint,
    )
    return digest.digest()[: _AES[key.kdfCipher]]


def _wrap(sessionKey: bytes, recipient: PublicKey) -> bytes:
    """@return: the body of a PKESK v3 packet giving C{recipient} C{sessionKey}."""
    ephemeral = X25519PrivateKey.generate()
    kek = _kek(ephemeral.exchange(recipient.encryptionKey), recipient)
    m = b"\x09" + sessionKey + (sum(sessionKey) & 0xFFFF).to_bytes(2, "big")
    m += bytes([8 - len(m) % 8]) * (8 - len(m) % 8)  # PKCS#5
    wrapped = aes_key_wrap(kek, m)
    point = _mpiBytes(b"\x40" + ephemeral.public_key().public_bytes_raw())
    head = b"\x03" + recipient.encryptionKeyId + bytes([_ECDH])
    return head + point + bytes([len(wrapped)]) + wrapped


def _unwrap(body: bytes, secretKey: SecretKey) -> bytes | None:
    """@return: the AES session key in PKESK C{body} for C{secretKey}, or L{None}."""
    publicKey = secretKey.publicKey
    if body[:1] != b"\x03" or body[9:10] != bytes([_ECDH]):
        return None
    if body[1:9] not in (publicKey.encryptionKeyId, bytes(8)):
        return None
    try:
        stream = io.BytesIO(body[10:])
        raw = _point(stream)
        if int.from_bytes(raw, "little") >= 2**255 - 19:  # not canonical
            return None
        point = X25519PublicKey.from_public_bytes(raw)
        wrapped = _exactly(stream, _number(stream, 1))
        if stream.read(1):
            return None
        kek = _kek(secretKey._decrypting.exchange(point), publicKey)
        m = aes_key_unwrap(kek, wrapped)
    except _FAILURES:
        return None
    pad = m[-1]
    m, padding = m[:-pad], m[-pad:]
    if not 1 <= pad <= 8 or padding != bytes([pad]) * pad or len(m) < 3:
        return None
    key, checksum = m[1:-2], int.from_bytes(m[-2:], "big")
    if _AES.get(m[0]) != len(key) or sum(key) & 0xFFFF != checksum:
        return None
    return key


def encrypt(
    src: BinaryIO,
    dst: BinaryIO,
    recipients: list[PublicKey],
    compress: int = 0,
    sessionKey: bytes | None = None,
) -> bytes:
    """
    Write to C{dst} a binary OpenPGP message of everything read from C{src},
    for each of C{recipients}, streaming in chunks.

    @param compress: the ZLIB level, 1 to 9; 0 for no compression.
    @param sessionKey: the AES-256 key to use (32 bytes); by default, a
        random one.
    @return: the session key.
    """
    if not recipients or not 0 <= compress <= 9:
        raise ValueError("no recipients, or compression level not in 0-9")
    sessionKey = os.urandom(32) if sessionKey is None else sessionKey
    if len(sessionKey) != 32:
        raise ValueError("the session key must have 32 bytes")
    dst.writelines(_packet(1, _wrap(sessionKey, r)) for r in recipients)
    sink = _Encrypting(_PacketWriter(18, _Terminal(dst), b"\x01"), sessionKey)
    if compress:
        sink = _Compressing(_PacketWriter(8, sink, b"\x02"), compress)
    # binary data, no file name, date 0
    sink = _PacketWriter(11, sink, b"b\x00\x00\x00\x00\x00")
    while chunk := src.read(_CHUNK):
        sink.write(chunk)
    sink.close()
    return sessionKey


# Decryption.


class _Decrypted:
    """
    The plaintext of a SEIPD v1 body, without its random prefix and its MDC,
    which is checked once the body has been read to the end.
    """

    def __init__(self, body: _Body, key: bytes):
        self._body, self._hash = body, hashlib.sha1()
        self._cipher = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
        self._pending = bytearray()
        self._done = False
        _exactly(self, _PREFIX_SIZE)

    def read(self, n: int) -> bytes:
        while not self._done and len(self._pending) < n + _MDC_SIZE:
            chunk = self._body.read(_CHUNK)
            if chunk:
                self._pending += self._cipher.update(chunk)
            else:
                self._finish()
        size = min(n, len(self._pending) - (0 if self._done else _MDC_SIZE))
        data = bytes(self._pending[:size])
        del self._pending[:size]
        if not self._done:
            self._hash.update(data)
        return data

    def _finish(self) -> None:
        self._done, pending = True, self._pending
        if len(pending) < _MDC_SIZE or pending[-_MDC_SIZE:-20] != _MDC_HEADER:
            raise _Malformed("no modification detection code")
        self._hash.update(pending[:-20])
        if not hmac.compare_digest(self._hash.digest(), bytes(pending[-20:])):
            raise _Malformed("modification detection code mismatch")
        del pending[-_MDC_SIZE:]


class _Inflated:
    """The decompressed contents of a compressed data packet."""

    def __init__(self, body: _Body, algorithm: int):
        if algorithm not in (1, 2):
            raise _Malformed(f"unsupported compression algorithm {algorithm}")
        self._body = body
        self._zlib = zlib.decompressobj(-15 if algorithm == 1 else 15)

    def read(self, n: int) -> bytes:
        z = self._zlib
        while n > 0 and not z.eof:
            data = z.unconsumed_tail or self._body.read(_CHUNK)
            if not data:
                raise _Malformed("truncated compressed data")
            out = z.decompress(data, n)  # at most n bytes: no bomb
            if out:
                return out
        if z.unused_data or self._body.read(1):
            raise _Malformed("data after the compressed data")
        return b""


def _literal(body: _Body, dst: BinaryIO, maxOutput: int) -> None:
    mode, nameLength = _exactly(body, 2)
    if mode not in b"btu":
        raise _Malformed("unsupported literal data format")
    _exactly(body, nameLength + 4)  # file name and date
    written = 0
    while chunk := body.read(_CHUNK):
        written += len(chunk)
        if written > maxOutput:
            raise _Malformed(f"plaintext larger than {maxOutput} bytes")
        dst.write(chunk)


def _message(stream, dst: BinaryIO, maxOutput: int, inflated: bool) -> None:
    """
    Read one literal packet, or (unless C{inflated}, when C{stream} is
    already the contents of a compressed packet) one compressed packet
    holding one literal packet, and nothing else.
    """
    found = _header(stream, partial=(8, 11), indeterminate=(8, 11))
    if found is None:
        raise _Malformed("no literal data")
    tag, body = found
    if tag == 8 and not inflated:
        _message(_Inflated(body, _number(body, 1)), dst, maxOutput, True)
    elif tag == 11:
        _literal(body, dst, maxOutput)
    else:
        raise _Malformed(f"unexpected packet {tag}")
    if stream.read(1):
        raise _Malformed("data after the literal data")


def decrypt(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    maxOutput: int,
    secretKey: SecretKey | None = None,
    sessionKey: bytes | None = None,
) -> bytes:
    """
    Decrypt the binary OpenPGP message read from C{src}, streaming its
    plaintext to C{dst}.  Plaintext is written before the message is known
    to be good: after a failure, discard what C{dst} got.

    @param maxOutput: the most plaintext bytes accepted.
    @param secretKey: the key to unwrap the session key with; or else
    @param sessionKey: the AES session key (16, 24 or 32 bytes).
    @return: the session key.
    @raise DecryptionFailed: for anything but an integrity-protected
        message for us of at most C{maxOutput} bytes of plaintext.
    """
    if (secretKey is None) == (sessionKey is None):
        raise TypeError("give one of secretKey and sessionKey")
    try:
        key, count = sessionKey, 0
        while True:
            found = _header(src, partial=(18,))
            if found is None:
                raise _Malformed("no encrypted data")
            tag, body = found
            if tag == 18:
                break
            count += 1
            if tag not in (1, 3) or count > _MAX_ESKS:
                raise _Malformed(f"unexpected packet {tag}")
            packet = body.readAll(_MAX_SMALL_PACKET)
            if tag == 1 and key is None:
                key = _unwrap(packet, secretKey)
        if key is None:
            raise _Malformed("not encrypted to our key")
        if _number(body, 1) != 1:
            raise _Malformed("unsupported encrypted data version")
        plain = _Decrypted(body, key)
        try:
            _message(plain, dst, maxOutput, False)
        except _FAILURES:
            while plain.read(_CHUNK):  # a bad MDC is the better reason
                pass
            raise
        if src.read(1):
            raise _Malformed("data after the encrypted data")
        return key
    except _FAILURES as e:
        raise DecryptionFailed(str(e)) from None


def parseSessionKey(output: str | bytes) -> bytes:
    """
    @return: the AES session key in the output of C{gpg --show-session-key}
        (C{"gpg: session key: '9:HEX'"} or the C{SESSION_KEY} status line).
    @raise ValueError: if there is none.
    """
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    match = re.search(r"(?:session key: '|SESSION_KEY )(\d+):([0-9A-Fa-f]+)", output)
    if match is None:
        raise ValueError("no session key in the output")
    key = bytes.fromhex(match.group(2))
    if _AES.get(int(match.group(1))) != len(key):
        raise ValueError("not an AES session key")
    return key
