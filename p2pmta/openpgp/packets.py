# -*- test-case-name: tests.test_openpgp -*-
"""
OpenPGP's encoding as L{p2pmta.openpgp} reads and writes it: packet headers
and body lengths (partial bodies included), multiprecision integers, ASCII
armour, and the algorithm ids and limits the other modules share.

Reading raises L{Malformed}; the public functions of L{p2pmta.openpgp}
translate it, and the other L{FAILURES}, into their own errors.
"""

from __future__ import annotations

import base64
import io
import zlib
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap

EDDSA, ECDH = 22, 18
CV25519 = bytes.fromhex("2b060104019755010501")  # 1.3.6.1.4.1.3029.1.5.1
AES_KEY_SIZES = {7: 16, 8: 24, 9: 32}  # OpenPGP cipher id: key size
HASHES = {8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
CHUNK = 1 << 16
_PARTIAL = bytes([0xE0 | 16])  # a partial body chunk of CHUNK bytes
_MIN_PARTIAL = 512
MAX_SMALL_PACKET = 1 << 16  # signatures, session key packets


class Malformed(Exception):
    """Not OpenPGP as this package reads it; the public functions translate it."""


FAILURES = (
    Malformed,
    ValueError,  # binascii.Error, UnicodeDecodeError, bad key lengths, ...
    zlib.error,
    InvalidUnwrap,
    InvalidSignature,
    UnsupportedAlgorithm,
)


# Reading packets: streams are anything with read(n), which returns at most
# n bytes and b"" only at the end.


def readExactly(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise Malformed("truncated")
        data += more
    return data


def readNumber(stream, n: int) -> int:
    return int.from_bytes(readExactly(stream, n), "big")


def _length(stream, partialAllowed: bool) -> tuple[int, bool]:
    """Read a new-format body length. @return: C{(length, partial)}."""
    first = readNumber(stream, 1)
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + readNumber(stream, 1) + 192, False
    if first == 255:
        return readNumber(stream, 4), False
    if not partialAllowed or 1 << (first & 0x1F) < _MIN_PARTIAL:
        raise Malformed("partial body length not allowed here")
    return 1 << (first & 0x1F), True


class Body:
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
            raise Malformed("truncated packet")
        self._left -= len(data)
        return data

    def definiteLeft(self) -> int | None:
        """
        @return: how many bytes are left of a body whose length is known
            whole (not partial, not indeterminate), or L{None}.
        """
        return None if self._partial else self._left

    def readAll(self, limit: int) -> bytes:
        """@return: the whole body of a definite-length packet of C{limit} bytes at most."""
        left = self.definiteLeft()
        if left is None or left > limit:
            raise Malformed("packet too long")
        return readExactly(self, left)


def readHeader(stream, partial=(), indeterminate=()) -> tuple[int, Body] | None:
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
        raise Malformed("not an OpenPGP packet")
    if ctb & 0x40:
        tag = ctb & 0x3F
        return tag, Body(stream, *_length(stream, tag in partial))
    tag, kind = (ctb >> 2) & 0x0F, ctb & 3
    if kind == 3:
        if tag not in indeterminate:
            raise Malformed("indeterminate length not allowed here")
        return tag, Body(stream, None, False)
    return tag, Body(stream, readNumber(stream, 1 << kind), False)


def readPackets(data: bytes) -> list[tuple[int, bytes]]:
    """@return: the C{(tag, body)} of each definite-length packet in C{data}."""
    stream, packets = io.BytesIO(data), []
    while (found := readHeader(stream)) is not None:
        packets.append((found[0], found[1].readAll(len(data))))
    return packets


def readMPI(stream) -> bytes:
    """Read a multiprecision integer, which must be in canonical form."""
    bits = readNumber(stream, 2)
    value = readExactly(stream, (bits + 7) // 8)
    if int.from_bytes(value, "big").bit_length() != bits:
        raise Malformed("non-canonical MPI")
    return value


def readPoint(stream) -> bytes:
    """Read a Curve25519 point (an MPI: 0x40 and 32 bytes)."""
    value = readMPI(stream)
    if len(value) != 33 or value[0] != 0x40:
        raise Malformed("not a Curve25519 point")
    return value[1:]


def fixedLength(value: bytes, size: int = 32) -> bytes:
    if len(value) > size:
        raise Malformed("integer too long")
    return value.rjust(size, b"\0")


# Writing packets.


def lengthBytes(n: int) -> bytes:
    if n < 192:
        return bytes([n])
    if n < 8384:
        return bytes([((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def packetBytes(tag: int, body: bytes) -> bytes:
    return bytes([0xC0 | tag]) + lengthBytes(len(body)) + body


def mpiBytes(value: bytes) -> bytes:
    bits = int.from_bytes(value, "big").bit_length()
    return bits.to_bytes(2, "big") + value.lstrip(b"\0")


class Terminal:
    """The end of a chain of writers: C{dst}, which we do not close."""

    def __init__(self, dst: BinaryIO):
        self.write = dst.write

    def close(self) -> None:
        pass


class PacketWriter:
    """Write one packet, in partial body chunks once it exceeds one chunk."""

    def __init__(self, tag: int, sink, head: bytes = b""):
        self._tag, self._sink, self._buffer = tag, sink, bytearray(head)

    def write(self, data) -> None:
        self._buffer += data
        if len(self._buffer) > CHUNK:  # keep >= 1 byte for the final header
            end = (len(self._buffer) - 1) // CHUNK * CHUNK
            with memoryview(self._buffer) as view:
                for start in range(0, end, CHUNK):
                    self._sink.write(self._ctb() + _PARTIAL)
                    self._sink.write(view[start : start + CHUNK])
                    self._tag = None  # the packet's tag has been written
            del self._buffer[:end]

    def _ctb(self) -> bytes:
        return b"" if self._tag is None else bytes([0xC0 | self._tag])

    def close(self) -> None:
        self._sink.write(self._ctb() + lengthBytes(len(self._buffer)))
        self._sink.write(self._buffer)
        self._sink.close()


# ASCII armour.


def unarmor(data: bytes) -> bytes:
    """
    @return: C{data}, with its ASCII armour taken off if it has one.

    @raise ValueError: if the armour is broken.
    """
    try:
        return dearmor(data)
    except (Malformed, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"bad ASCII armour: {e}") from None


def dearmor(data: bytes) -> bytes:
    """@return: C{data}, with its ASCII armour taken off if it has one."""
    if data.lstrip()[:5] != b"-----":
        return data
    lines = [line.strip() for line in data.decode("ascii").splitlines()]
    begins = [i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP ")]
    if not begins:
        raise Malformed("no armour")
    i = begins[0] + 1
    while i < len(lines) and ":" in lines[i]:  # armour headers
        i += 1
    body = []
    for line in lines[i:]:
        if line.startswith("-----END PGP "):
            return base64.b64decode("".join(body), validate=True)
        if not line.startswith("="):  # the CRC-24 line
            body.append(line)
    raise Malformed("armour not ended")


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(data: bytes, kind: str) -> bytes:
    """ASCII armour (RFC 4880, section 6), as gpg writes it."""
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    checksum = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode("ascii")
    text = "\n".join([f"-----BEGIN {kind}-----", "", *lines, "=" + checksum, f"-----END {kind}-----", ""])
    return text.encode("ascii")
