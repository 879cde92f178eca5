# -*- test-case-name: tests.test_openpgp -*-
"""
Encrypted messages: L{encrypt} writes, and L{decrypt} reads, PKESK v3 packets
(X25519, RFC 6637 KDF, AES key wrap) and a SEIPD v1 packet (AES, with MDC)
around an optional compressed packet around a binary literal packet,
streaming; L{parseSessionKey} reads a session key that gpg shows.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import zlib
from typing import BinaryIO

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from p2pmta.errors import DecryptionFailed
from p2pmta.openpgp.keys import PublicKey, SecretKey
from p2pmta.openpgp.packets import (
    AES_KEY_SIZES,
    CHUNK,
    CV25519,
    ECDH,
    FAILURES,
    HASHES,
    MAX_SMALL_PACKET,
    Body,
    Malformed,
    PacketWriter,
    Terminal,
    mpiBytes,
    packetBytes,
    readExactly,
    readHeader,
    readNumber,
    readPoint,
)

_MAX_ESKS = 1000
_MDC_HEADER = b"\xd3\x14"
_MDC_SIZE = 22
_PREFIX_SIZE = 18  # AES block + 2 repeated bytes


# Encryption.


class _Compressing:
    def __init__(self, sink, level: int, strategy: int):
        self._sink, self._zlib = sink, zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy)

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


def _kek(shared: bytes, key: PublicKey) -> bytes:
    """The RFC 6637 key-encryption key for C{key}'s subkey."""
    parameters = bytes([len(CV25519)]) + CV25519 + bytes([ECDH, 3, 1])
    parameters += bytes([key.kdfHash, key.kdfCipher]) + b"Anonymous Sender    "
    digest = hashlib.new(
        HASHES[key.kdfHash],
        b"\0\0\0\1" + shared + parameters + key.encryptionFingerprint,
    )
    return digest.digest()[: AES_KEY_SIZES[key.kdfCipher]]


def _wrap(sessionKey: bytes, recipient: PublicKey) -> bytes:
    """@return: the body of a PKESK v3 packet giving C{recipient} C{sessionKey}."""
    ephemeral = X25519PrivateKey.generate()
    kek = _kek(ephemeral.exchange(recipient.encryptionKey), recipient)
    m = b"\x09" + sessionKey + (sum(sessionKey) & 0xFFFF).to_bytes(2, "big")
    m += bytes([8 - len(m) % 8]) * (8 - len(m) % 8)  # PKCS#5
    wrapped = aes_key_wrap(kek, m)
    point = mpiBytes(b"\x40" + ephemeral.public_key().public_bytes_raw())
    head = b"\x03" + recipient.encryptionKeyId + bytes([ECDH])
    return head + point + bytes([len(wrapped)]) + wrapped


def _unwrap(body: bytes, secretKey: SecretKey) -> bytes | None:
    """@return: the AES session key in PKESK C{body} for C{secretKey}, or L{None}."""
    publicKey = secretKey.publicKey
    if body[:1] != b"\x03" or body[9:10] != bytes([ECDH]):
        return None
    if body[1:9] not in (publicKey.encryptionKeyId, bytes(8)):
        return None
    try:
        stream = io.BytesIO(body[10:])
        raw = readPoint(stream)
        if int.from_bytes(raw, "little") >= 2**255 - 19:  # not canonical
            return None
        point = X25519PublicKey.from_public_bytes(raw)
        wrapped = readExactly(stream, readNumber(stream, 1))
        if stream.read(1):
            return None
        kek = _kek(secretKey._decrypting.exchange(point), publicKey)
        m = aes_key_unwrap(kek, wrapped)
    except FAILURES:
        return None
    pad = m[-1]
    m, padding = m[:-pad], m[-pad:]
    if not 1 <= pad <= 8 or padding != bytes([pad]) * pad or len(m) < 3:
        return None
    key, checksum = m[1:-2], int.from_bytes(m[-2:], "big")
    if AES_KEY_SIZES.get(m[0]) != len(key) or sum(key) & 0xFFFF != checksum:
        return None
    return key


def encrypt(
    src: BinaryIO,
    dst: BinaryIO,
    recipients: list[PublicKey],
    compress: int = 0,
    sessionKey: bytes | None = None,
    strategy: int = zlib.Z_DEFAULT_STRATEGY,
) -> bytes:
    """
    Write to C{dst} a binary OpenPGP message of everything read from C{src},
    for each of C{recipients}, streaming in chunks.

    @param compress: the ZLIB level, 1 to 9; 0 for no compression.
    @param strategy: zlib's strategy when compressing: C{Z_HUFFMAN_ONLY}
        codes each byte by its frequency and looks for no repeats, which
        shrinks base64 as well as level 6 does at a fifth of its cost.
    @param sessionKey: the AES-256 key to use (32 bytes); by default, a
        random one.
    @return: the session key.
    """
    if not recipients or not 0 <= compress <= 9:
        raise ValueError("no recipients, or compression level not in 0-9")
    sessionKey = os.urandom(32) if sessionKey is None else sessionKey
    if len(sessionKey) != 32:
        raise ValueError("the session key must have 32 bytes")
    dst.writelines(packetBytes(1, _wrap(sessionKey, r)) for r in recipients)
    sink = _Encrypting(PacketWriter(18, Terminal(dst), b"\x01"), sessionKey)
    if compress:
        sink = _Compressing(PacketWriter(8, sink, b"\x02"), compress, strategy)
    # binary data, no file name, date 0
    sink = PacketWriter(11, sink, b"b\x00\x00\x00\x00\x00")
    while chunk := src.read(CHUNK):
        sink.write(chunk)
    sink.close()
    return sessionKey


# Decryption.


class _Decrypted:
    """
    The plaintext of a SEIPD v1 body, without its random prefix and its MDC,
    which is checked once the body has been read to the end (only its form,
    if C{authenticated}: see L{decrypt}).
    """

    def __init__(self, body: Body, key: bytes, authenticated: bool = False):
        self._body, self._hash = body, None if authenticated else hashlib.sha1()
        self._cipher = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
        self._pending = bytearray()
        self._done = False
        readExactly(self, _PREFIX_SIZE)

    def read(self, n: int) -> bytes:
        while not self._done and len(self._pending) < n + _MDC_SIZE:
            chunk = self._body.read(CHUNK)
            if chunk:
                self._pending += self._cipher.update(chunk)
            else:
                self._finish()
        size = min(n, len(self._pending) - (0 if self._done else _MDC_SIZE))
        with memoryview(self._pending) as view:
            data = view[:size].tobytes()  # one copy, not a slice's two
        del self._pending[:size]
        if not self._done and self._hash is not None:
            self._hash.update(data)
        return data

    def _finish(self) -> None:
        self._done, pending = True, self._pending
        _checkMDC(pending, self._hash)
        del pending[-_MDC_SIZE:]


def _checkMDC(plain, hasher) -> None:
    """
    Check that C{plain}, the end of a SEIPD body's plaintext, ends in its
    MDC packet, whose SHA-1 is that of all before the hash: C{hasher} has
    the SHA-1 of what came before C{plain}, and is given the rest (L{None}:
    the packet's form alone is checked).
    """
    if len(plain) < _MDC_SIZE or plain[-_MDC_SIZE:-20] != _MDC_HEADER:
        raise Malformed("no modification detection code")
    if hasher is None:
        return
    with memoryview(plain) as view:
        hasher.update(view[:-20])
        if not hmac.compare_digest(hasher.digest(), view[-20:]):
            raise Malformed("modification detection code mismatch")


class _Inflated:
    """The decompressed contents of a compressed data packet."""

    def __init__(self, body: Body, algorithm: int):
        if algorithm not in (1, 2):
            raise Malformed(f"unsupported compression algorithm {algorithm}")
        self._body = body
        self._zlib = zlib.decompressobj(-15 if algorithm == 1 else 15)

    def read(self, n: int) -> bytes:
        z = self._zlib
        while n > 0 and not z.eof:
            data = z.unconsumed_tail or self._body.read(CHUNK)
            if not data:
                raise Malformed("truncated compressed data")
            out = z.decompress(data, n)  # at most n bytes: no bomb
            if out:
                return out
        if z.unused_data or self._body.read(1):
            raise Malformed("data after the compressed data")
        return b""


_WHOLE_BODY = 4 * CHUNK
"""
The largest definite-length encrypted packet L{decrypt} reads whole (see
L{_openWhole}): ours, up to L{CHUNK}, and others' of some size.
"""


def _openWhole(sealed: bytes, key: bytes, dst: BinaryIO, maxOutput: int, authenticated: bool) -> None:
    """
    L{decrypt}'s way with a SEIPD v1 body (after its version) read whole:
    one pass of AES and one of SHA-1 over all of it, the MDC checked before
    anything is written, then its packets read from memory.  It reads what
    the streaming way (L{_Decrypted}) reads, in a tenth of the calls.
    """
    if len(sealed) < _PREFIX_SIZE + _MDC_SIZE:
        raise Malformed("no modification detection code")
    plain = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor().update(sealed)
    _checkMDC(plain, None if authenticated else hashlib.sha1())
    _message(io.BytesIO(plain[_PREFIX_SIZE:-_MDC_SIZE]), dst, maxOutput, False)


def _literal(body: Body, dst: BinaryIO, maxOutput: int) -> None:
    mode, nameLength = readExactly(body, 2)
    if mode not in b"btu":
        raise Malformed("unsupported literal data format")
    readExactly(body, nameLength + 4)  # file name and date
    written = 0
    while chunk := body.read(CHUNK):
        written += len(chunk)
        if written > maxOutput:
            raise Malformed(f"plaintext larger than {maxOutput} bytes")
        dst.write(chunk)


def _message(stream, dst: BinaryIO, maxOutput: int, inflated: bool) -> None:
    """
    Read one literal packet, or (unless C{inflated}, when C{stream} is
    already the contents of a compressed packet) one compressed packet
    holding one literal packet, and nothing else.
    """
    found = readHeader(stream, partial=(8, 11), indeterminate=(8, 11))
    if found is None:
        raise Malformed("no literal data")
    tag, body = found
    if tag == 8 and not inflated:
        _message(_Inflated(body, readNumber(body, 1)), dst, maxOutput, True)
    elif tag == 11:
        _literal(body, dst, maxOutput)
    else:
        raise Malformed(f"unexpected packet {tag}")
    if stream.read(1):
        raise Malformed("data after the literal data")


def decrypt(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    maxOutput: int,
    secretKey: SecretKey | None = None,
    sessionKey: bytes | None = None,
    authenticated: bool = False,
) -> bytes:
    """
    Decrypt the binary OpenPGP message read from C{src}, streaming its
    plaintext to C{dst}.  Plaintext is written before the message is known
    to be good: after a failure, discard what C{dst} got.

    @param maxOutput: the most plaintext bytes accepted.
    @param secretKey: the key to unwrap the session key with; or else
    @param sessionKey: the AES session key (16, 24 or 32 bytes).
    @param authenticated: whether C{src} is known to be the very message its
        sender made (a pulled ciphertext whose SHA-256 is the one its
        sender's signed notification gave).  Its MDC packet is then checked
        for its place and form, but its SHA-1 is not computed: it could only
        find fault with what the sender itself made.  That is 0.75 ms of
        CPU per 1.4 MB, more than half of the decryption.  Leave it L{False}
        for anything not so checked: the MDC is then what catches a
        message changed on its way (EFAIL).
    @return: the session key.
    @raise DecryptionFailed: for anything but an integrity-protected
        message for us of at most C{maxOutput} bytes of plaintext.
    """
    if (secretKey is None) == (sessionKey is None):
        raise TypeError("give one of secretKey and sessionKey")
    try:
        key, count = sessionKey, 0
        while True:
            found = readHeader(src, partial=(18,))
            if found is None:
                raise Malformed("no encrypted data")
            tag, body = found
            if tag == 18:
                break
            count += 1
            if tag not in (1, 3) or count > _MAX_ESKS:
                raise Malformed(f"unexpected packet {tag}")
            packet = body.readAll(MAX_SMALL_PACKET)
            if tag == 1 and key is None:
                key = _unwrap(packet, secretKey)
        if key is None:
            raise Malformed("not encrypted to our key")
        if readNumber(body, 1) != 1:
            raise Malformed("unsupported encrypted data version")
        left = body.definiteLeft()
        if left is not None and left <= _WHOLE_BODY:
            _openWhole(body.readAll(_WHOLE_BODY), key, dst, maxOutput, authenticated)
        else:
            plain = _Decrypted(body, key, authenticated)
            try:
                _message(plain, dst, maxOutput, False)
            except FAILURES:
                while plain.read(CHUNK):  # a bad MDC is the better reason
                    pass
                raise
        if src.read(1):
            raise Malformed("data after the encrypted data")
        return key
    except FAILURES as e:
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
    if AES_KEY_SIZES.get(int(match.group(1))) != len(key):
        raise ValueError("not an AES session key")
    return key
