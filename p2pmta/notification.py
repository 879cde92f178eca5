# -*- test-case-name: tests.test_notification -*-
"""
Send and receive notifications (paper, section 4.3 steps 5 and 10).

A I{send notification} tells a recipient that a message waits in the
sender's outbox: it carries the message's whole header section, its size,
its attachments, the SHA-256 of its ciphertext and a fresh random password.
One I{notice} tells of every message waiting for one recipient (up to
L{MAX_BATCH}); it is signed by the sender (a detached signature inside) and
the whole is encrypted to the recipient, so nobody else learns anything.

The notice itself waits in the sender's outbox, next to the ciphertexts and
replicated by its group like them; what goes under C{ns:<recipient>} in the
DHT is a L{Doorbell}: a small value, signed and encrypted in the same way,
naming the notice's SHA-256.  Every DHT node that stores a value sends it
to a listening recipient, so the DHT carries a few hundred bytes per notice
instead of the notice's every message.

A I{receive notification}, put under C{nr:<sender>} with the same password,
tells the sender that a recipient fetched (or discarded) messages.  For
each it names the ciphertext's digest (its first 8 bytes: the sender knows
the rest) and proves knowledge of the message's password with an HMAC, so
nobody but the recipient can make it.
"""

from __future__ import annotations

import base64
import io
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

from p2pmta.address import Address
from p2pmta.errors import P2PMTAError
from p2pmta.openpgp import unarmor

_SEND_KIND = "p2pmta-send"
_RECEIVE_KIND = "p2pmta-received"


class BadNotification(P2PMTAError):
    """The notification is malformed, forged or not for this peer."""


#: What malformed JSON of the right shape can raise while it is read.
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError, P2PMTAError)


def _object(data) -> dict:
    """The JSON object in C{data}, or L{BadNotification}."""
    try:
        doc = json.loads(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise BadNotification(f"not JSON: {e}"[:200]) from None
    if not isinstance(doc, dict):
        raise BadNotification("not a JSON object")
    return doc


def _address(value) -> Address:
    if not isinstance(value, str):
        raise BadNotification("an address is not a string")
    return Address.parse(value)


def splitHeaders(message: bytes) -> tuple[bytes, bytes]:
    """
    Split a message into its header section (with the blank line that ends
    it) and its body.
    """
    end = message.find(b"\r\n\r\n")
    if end == -1:
        if message.endswith(b"\r\n"):
            return message + b"\r\n", b""
        return message + b"\r\n\r\n", b""
    return message[: end + 4], message[end + 4 :]


#: How deep nested multiparts are followed when looking for attachments.
MAX_MIME_DEPTH = 50

_BLOCK = 1024 * 1024
_LOOKAHEAD = 64 * 1024


def _headerFields(lines: list[bytes]) -> dict[bytes, bytes]:
    """Unfolded header fields of a part, by lower-case name (first wins)."""
    fields: dict[bytes, bytes] = {}
    name = None
    for line in lines:
        if line[:1] in (b" ", b"\t") and name is not None:
            fields[name] += b" " + line.strip()
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            name = None
            continue
        name = name.strip().lower()
        if name in fields:
            name = None
            continue
        fields[name] = value.strip()
    return fields


_PARAMETER = re.compile(rb'(?i);\s*([a-z0-9*_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def _parameter(value: bytes, wanted: bytes) -> str | None:
    for name, found in _PARAMETER.findall(value[:4096]):
        if name.lower().rstrip(b"*") == wanted:
            if found.startswith(b'"'):
                found = found[1:-1]
            return found.decode("utf-8", "replace")
    return None


def _bodyEnd(data: bytes, pos: int, boundary: bytes | None, eof: bool) -> int:
    """
    Where the body lines from C{pos} (a line start, not of a "--" line) end
    in C{data}: at the next line that starts with C{"--" + boundary}, else
    at the last line end held that cannot start one cut off by the end of
    C{data} (everything, at the end of the stream).
    """
    if boundary is not None:
        needle = b"\n--" + boundary
        found = data.find(needle, pos)
        if found >= 0:
            return found + 1
        last = data.rfind(b"\n", pos, max(pos, len(data) - len(needle) + 1))
    else:
        last = data.rfind(b"\n", pos)
    return len(data) if eof or last < 0 else last + 1


def attachmentsOf(stream, limit: int = 50, crlf: bool = False) -> list[dict]:
    """
    Name, type and size of the attachments of a MIME message (the parts with
    a file name), at most C{limit} of them.

    One pass over the lines of C{stream} (a binary file, read a block at a
    time, or L{bytes}, scanned where it is): memory stays bounded whatever
    the message holds (100,000 parts, multiparts nested 2,000 deep), and
    nesting deeper than L{MAX_MIME_DEPTH} is not followed.  Sizes are the
    decoded sizes (estimated for quoted-printable).

    @param crlf: whether every CR and LF of the message is part of a CRLF,
        as in a message our SMTP server took (it refuses any other): a
        base64 body's line ends are then counted by their LFs alone, half
        the scanning (about 0.4 ms for a 1 MB attachment).
    """
    whole = isinstance(stream, bytes)
    if isinstance(stream, bytearray):
        stream = io.BytesIO(stream)
    found: list[dict] = []
    boundaries: list[bytes] = []
    headerLines: list[bytes] | None = []  # collecting a part's header section
    current: dict | None = None
    base64Body = False

    def startPart(lines: list[bytes]) -> None:
        nonlocal current, base64Body
        fields = _headerFields(lines[:1000])
        kind = fields.get(b"content-type", b"text/plain")
        mainType = kind.split(b";", 1)[0].strip().lower()
        if mainType.startswith(b"multipart/"):
            boundary = _parameter(kind, b"boundary")
            if boundary and len(boundaries) < MAX_MIME_DEPTH:
                boundaries.append(boundary.encode("utf-8", "replace"))
            return
        filename = _parameter(fields.get(b"content-disposition", b""), b"filename") or _parameter(kind, b"name")
        if filename is None or len(found) >= limit:
            return
        current = {"name": filename[:200], "type": mainType.decode("ascii", "replace")[:100], "size": 0}
        found.append(current)
        base64Body = fields.get(b"content-transfer-encoding", b"").strip().lower() == b"base64"

    # Header sections go line by line; bodies are skipped in bulk up to the
    # next line that starts the innermost part's boundary (a 1 MB attachment
    # is a few scans in C, not 20,000 turns of a Python loop; the boundary,
    # long and rare, is found faster than every "--" line start).
    data, pos, eof = (stream, 0, True) if whole else (b"", 0, False)
    while True:
        if len(data) - pos < _LOOKAHEAD and not eof:
            chunk = stream.read(_BLOCK)
            eof = not chunk
            data, pos = data[pos:] + chunk, 0
        if pos >= len(data):
            break
        if headerLines is not None or data.startswith(b"--", pos):
            lineEnd = data.find(b"\n", pos, pos + _LOOKAHEAD)
            if lineEnd < 0:
                lineEnd = min(len(data), pos + _LOOKAHEAD) - 1
            line, pos = data[pos : lineEnd + 1], lineEnd + 1
            if headerLines is not None:
                if line in (b"\r\n", b"\n"):
                    startPart(headerLines)
                    headerLines = None
                elif len(headerLines) < 1000:
                    headerLines.append(line.rstrip(b"\r\n"))
                continue
            marker = line.rstrip(b" \t\r\n")
            if boundaries and marker == b"--" + boundaries[-1]:
                current, headerLines = None, []
                continue
            if boundaries and marker == b"--" + boundaries[-1] + b"--":
                current = None
                boundaries.pop()
                continue
            start, end = pos - len(line), pos
        else:
            start, end = pos, _bodyEnd(data, pos, boundaries[-1] if boundaries else None, eof)
            pos = end
        if current is not None:
            if base64Body:
                # Line ends aside, base64 lines hold no white space; "=" pads
                # only the end.  A range ends at a line end (or the end of
                # the message), so its CRs pair with its LFs when crlf.
                lineFeeds = data.count(b"\n", start, end)
                spaces = 2 * lineFeeds if crlf else lineFeeds + data.count(b"\r", start, end)
                current["_chars"] = current.get("_chars", 0) + end - start - spaces
                current["_pad"] = current.get("_pad", 0) + data.count(b"=", max(start, end - 8), end)
            else:
                current["size"] += end - start
    for attachment in found:
        if "_chars" in attachment:
            attachment["size"] = attachment.pop("_chars") * 3 // 4 - attachment.pop("_pad")
    return found


#: The most messages one send notification (or receipt) carries.
MAX_BATCH = 500


@dataclass(frozen=True)
class SendNotification:
    """
    What a recipient learns of a message before pulling it.

    @ivar sender: who sent it.
    @ivar recipient: whom this notification is for.
    @ivar digest: hex SHA-256 of the ciphertext in the sender's outbox.
    @ivar ciphertextSize: the ciphertext's size in bytes.
    @ivar size: the plaintext message's size in bytes.
    @ivar headers: the message's exact header section.
    @ivar password: this message's secret with its recipient: receive
        notifications prove knowledge of it.
    @ivar sent: POSIX time the message was sent.
    @ivar attachments: C{{"name", "type", "size"}} of each attachment.
    @ivar sessionKey: the ciphertext's OpenPGP session key (C{b""} if not
        told), so that the recipient decrypts the body without a public-key
        operation.  The ciphertext stays a standard OpenPGP message, also
        readable with the recipient's secret key.
    """

    sender: Address
    recipient: Address
    digest: str
    ciphertextSize: int
    size: int
    headers: bytes
    password: bytes
    sent: float
    attachments: tuple = field(default=())
    sessionKey: bytes = b""

    def _item(self) -> dict:
        return {
            "digest": self.digest,
            "ciphertextSize": self.ciphertextSize,
            "size": self.size,
            # latin-1 maps every byte to one character: exact and compact.
            "headers": self.headers.decode("latin-1"),
            "password": base64.b64encode(self.password).decode("ascii"),
            "sent": self.sent,
            "attachments": list(self.attachments),
            "sessionKey": base64.b64encode(self.sessionKey).decode("ascii"),
        }

    def encode(self) -> bytes:
        """@return: a notification of this one message, under its password."""
        return encodeBatch([self], self.password)

    @classmethod
    def decode(cls, data: bytes) -> SendNotification:
        """
        @return: the only message of a notification.

        @raise BadNotification: if C{data} is not a well-formed notification
            of exactly one message.
        """
        _, batch = decodeBatch(data)
        if len(batch) != 1:
            raise BadNotification(f"{len(batch)} messages, not one")
        return batch[0]


def encodeBatch(notifications, password: bytes) -> bytes:
    """
    @param password: the DHT password of the notification itself, told to
        the recipient so that it can delete the notification.
    @return: one send notification telling of several messages, all from
        one sender to one recipient (paper, section 4.3 step 5, batched:
        one DHT value, signature and encryption for up to L{MAX_BATCH}
        messages).
    """
    notifications = list(notifications)
    if not 0 < len(notifications) <= MAX_BATCH:
        raise ValueError(f"{len(notifications)} messages in one notification")
    first = notifications[0]
    if any((n.sender, n.recipient) != (first.sender, first.recipient) for n in notifications):
        raise ValueError("one notification is from one sender to one recipient")
    return json.dumps(
        {
            "kind": _SEND_KIND,
            "from": str(first.sender),
            "to": str(first.recipient),
            "messages": [n._item() for n in notifications],
            "password": base64.b64encode(password).decode("ascii"),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")


def decodeBatch(data: bytes) -> tuple[bytes, tuple[SendNotification, ...]]:
    """
    @return: the notification's own DHT password, and the messages it
        tells of.

    @raise BadNotification: if C{data} is not a well-formed notification.
    """
    doc = _object(data)
    try:
        if doc.get("kind") != _SEND_KIND:
            raise BadNotification("not a send notification")
        sender, recipient = _address(doc["from"]), _address(doc["to"])
        password = base64.b64decode(doc["password"], validate=True)
        items = doc["messages"]
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH:
            raise BadNotification("no messages, or too many")
        batch = tuple(
            SendNotification(
                sender=sender,
                recipient=recipient,
                digest=str(item["digest"]),
                ciphertextSize=int(item["ciphertextSize"]),
                size=int(item["size"]),
                headers=item["headers"].encode("latin-1"),
                password=base64.b64decode(item["password"], validate=True),
                sent=float(item["sent"]),
                attachments=tuple(item.get("attachments", ())),
                sessionKey=base64.b64decode(item.get("sessionKey", ""), validate=True),
            )
            for item in items
        )
    except BadNotification:
        raise
    except _MALFORMED as e:
        raise BadNotification(str(e)[:200]) from None
    for notification in batch:
        if not math.isfinite(notification.sent):
            raise BadNotification("bad time")
        if len(notification.digest) != 64 or notification.digest.strip("0123456789abcdef"):
            raise BadNotification("bad digest")
        if notification.size < 0 or notification.ciphertextSize < 0 or len(notification.password) < 16:
            raise BadNotification("bad size or password")
        if notification.sessionKey and len(notification.sessionKey) not in (16, 24, 32):
            raise BadNotification("bad session key")
        if not notification.headers.endswith(b"\r\n\r\n"):
            raise BadNotification("bad header section")
    if len({n.digest for n in batch}) != len(batch):
        raise BadNotification("a message told of twice")
    if len(password) < 16:
        raise BadNotification("bad password")
    return password, batch


#: What a signed value starts with (L{wrapSigned}).
_SIGNED_MAGIC = b"P2S1"


def wrapSigned(body: bytes, signature: bytes) -> bytes:
    """
    @param signature: a detached OpenPGP signature of C{body}, armoured or
        not (it travels without its armour).
    @return: a signed value: C{body} with its detached signature, in
        binary (the encryption around a notice compresses its body; base64
        would hide its repetitions from the compressor).
    """
    signature = unarmor(signature)
    if not 0 < len(signature) <= 0xFFFF:
        raise ValueError(f"a signature of {len(signature)} bytes")
    return _SIGNED_MAGIC + len(signature).to_bytes(2, "big") + signature + body


def unwrapSigned(data: bytes) -> tuple[bytes, bytes]:
    """
    @return: C{(body, signature)} of a signed value.

    @raise BadNotification: if malformed.
    """
    if not isinstance(data, bytes) or not data.startswith(_SIGNED_MAGIC) or len(data) < 6:
        raise BadNotification("not a signed value")
    length = int.from_bytes(data[4:6], "big")
    if length == 0 or len(data) < 6 + length:
        raise BadNotification("a signed value cut short")
    return data[6 + length :], data[6 : 6 + length]


_BELL_KIND = "p2pmta-bell"

#: The largest notice a doorbell may announce.
MAX_NOTICE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Doorbell:
    """
    The DHT value under C{ns:<recipient>}: a notice (an encrypted, signed
    L{encodeBatch}) waits in C{sender}'s outbox under the SHA-256 C{notice},
    C{size} bytes long.
    """

    sender: Address
    notice: str
    size: int

    def encode(self) -> bytes:
        return json.dumps(
            {"kind": _BELL_KIND, "from": str(self.sender), "notice": self.notice, "size": self.size},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> Doorbell:
        """@raise BadNotification: if C{data} is not a well-formed doorbell."""
        doc = _object(data)
        try:
            if doc.get("kind") != _BELL_KIND:
                raise BadNotification("not a doorbell")
            bell = cls(_address(doc["from"]), str(doc["notice"]), int(doc["size"]))
        except BadNotification:
            raise
        except _MALFORMED as e:
            raise BadNotification(str(e)[:200]) from None
        if len(bell.notice) != 64 or bell.notice.strip("0123456789abcdef"):
            raise BadNotification("bad notice digest")
        if not 0 < bell.size <= MAX_NOTICE_SIZE:
            raise BadNotification("bad notice size")
        return bell


#: Bytes of a digest a receipt names, and of each proof.
_PREFIX, _PROOF = 8, 12

#: What a receipt starts with.
_RECEIPT_MAGIC = b"P2R1"


def receiptProof(password: bytes, digest: str, recipient: Address) -> bytes:
    """
    @return: the proof, known only to holders of C{password}, that
        C{recipient} is done with the message C{digest} (HMAC-SHA-256,
        truncated to 96 bits, as in RFC 4868's truncated HMACs: a forger
        gets one guess per DHT put).
    """
    mac = hmac.new(password, f"{_RECEIVE_KIND}\0{digest}\0{recipient}".encode(), hashlib.sha256)
    return mac.digest()[:_PROOF]


@dataclass(frozen=True)
class ReceiveNotification:
    """
    A recipient's word that it is done with messages (fetched or
    discarded): C{done} holds C{(prefix, proof)} pairs, one per message:
    the first 8 bytes of its digest, and its L{receiptProof}.
    """

    recipient: Address
    done: tuple

    @property
    def prefixes(self) -> list[str]:
        """The hex digest prefixes of the messages, in order."""
        return [prefix.hex() for prefix, _ in self.done]

    def encode(self) -> bytes:
        """
        @return: the receipt in binary (it is random bytes; the DHT entry
            around it is base64 already): magic, the recipient's address
            after its length, then 20 bytes a message.
        """
        recipient = str(self.recipient).encode("utf-8")
        records = b"".join(prefix + proof for prefix, proof in self.done)
        return _RECEIPT_MAGIC + bytes([len(recipient)]) + recipient + records

    @classmethod
    def make(cls, recipient: Address, messages) -> ReceiveNotification:
        """
        @param messages: C{(password, digest)} pairs.
        """
        return cls(
            recipient,
            tuple(
                (bytes.fromhex(digest)[:_PREFIX], receiptProof(password, digest, recipient))
                for password, digest in messages
            ),
        )

    @classmethod
    def decode(cls, data: bytes) -> ReceiveNotification:
        """@raise BadNotification: if C{data} is not a well-formed receipt."""
        if not isinstance(data, bytes) or not data.startswith(_RECEIPT_MAGIC) or len(data) < 5:
            raise BadNotification("not a receive notification")
        end = 5 + data[4]
        try:
            recipient = _address(data[5:end].decode("utf-8"))
        except (UnicodeDecodeError, *_MALFORMED) as e:
            raise BadNotification(str(e)[:200]) from None
        records, size = data[end:], _PREFIX + _PROOF
        if not records or len(records) % size or len(records) // size > MAX_BATCH:
            raise BadNotification("no messages, too many, or a record cut short")
        done = tuple((records[i : i + _PREFIX], records[i + _PREFIX : i + size]) for i in range(0, len(records), size))
        return cls(recipient, done)

    def provenBy(self, digest: str, password: bytes) -> bool:
        """@return: whether this receipt proves knowledge of C{password} for C{digest}."""
        expected = receiptProof(password, digest, self.recipient)
        prefix = bytes.fromhex(digest)[:_PREFIX]
        return any(p == prefix and hmac.compare_digest(proof, expected) for p, proof in self.done)


def headerFields(headers: bytes) -> dict:
    """
    A few parsed header fields of a header section, for logs.
    """
    parsed = BytesHeaderParser(policy=compat32).parsebytes(headers)
    return {name: str(parsed.get(name, "")) for name in ("From", "Subject", "Date")}
