# -*- test-case-name: tests.test_notification -*-
"""
Send and receive notifications (paper, section 4.3 steps 5 and 10).

A I{send notification}, put under C{ns:<recipient>}, tells a recipient that
a message waits in the sender's outbox: it carries the message's whole header
section, its size, its attachments, the SHA-256 of its ciphertext and a fresh
random password.  It is signed by the sender (a detached signature inside)
and the whole is encrypted to the recipient, so the DHT learns nothing.

A I{receive notification}, put under C{nr:<sender>} with the same password,
tells the sender that a recipient fetched (or discarded) the message.  It
names the ciphertext's digest and proves knowledge of the password with an
HMAC, so nobody but the recipient can make it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

from p2pmta.address import Address
from p2pmta.errors import P2PMTAError

_SEND_KIND = "p2pmta-send"
_RECEIVE_KIND = "p2pmta-received"


class BadNotification(P2PMTAError):
    """The notification is malformed, forged or not for this peer."""


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


def attachmentsOf(message: bytes, limit: int = 50) -> list[dict]:
    """
    Name, type and size of the attachments of a MIME message (the parts with
    a file name), at most C{limit} of them.
    """
    from email import message_from_bytes

    found = []
    try:
        parsed = message_from_bytes(message, policy=compat32)
        for part in parsed.walk():
            if len(found) >= limit:
                break
            filename = part.get_filename()
            if filename is None or part.is_multipart():
                continue
            payload = part.get_payload(decode=True) or b""
            found.append(
                {"name": str(filename)[:200], "type": part.get_content_type()[:100], "size": len(payload)}
            )
    except Exception:
        return found
    return found


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
    @ivar password: the password of this notification and of its receive
        notification.
    @ivar sent: POSIX time the message was sent.
    @ivar attachments: C{{"name", "type", "size"}} of each attachment.
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

    def encode(self) -> bytes:
        return json.dumps(
            {
                "kind": _SEND_KIND,
                "from": str(self.sender),
                "to": str(self.recipient),
                "digest": self.digest,
                "ciphertextSize": self.ciphertextSize,
                "size": self.size,
                "headers": base64.b64encode(self.headers).decode("ascii"),
                "password": base64.b64encode(self.password).decode("ascii"),
                "sent": self.sent,
                "attachments": list(self.attachments),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> SendNotification:
        """
        @raise BadNotification: if C{data} is not a well-formed notification.
        """
        try:
            doc = json.loads(data)
            if doc["kind"] != _SEND_KIND:
                raise BadNotification("not a send notification")
            notification = cls(
                sender=Address.parse(doc["from"]),
                recipient=Address.parse(doc["to"]),
                digest=str(doc["digest"]),
                ciphertextSize=int(doc["ciphertextSize"]),
                size=int(doc["size"]),
                headers=base64.b64decode(doc["headers"], validate=True),
                password=base64.b64decode(doc["password"], validate=True),
                sent=float(doc["sent"]),
                attachments=tuple(doc.get("attachments", ())),
            )
        except BadNotification:
            raise
        except (ValueError, KeyError, TypeError, P2PMTAError) as e:
            raise BadNotification(str(e)) from None
        if len(notification.digest) != 64 or notification.digest.strip("0123456789abcdef"):
            raise BadNotification("bad digest")
        if notification.size < 0 or notification.ciphertextSize < 0 or len(notification.password) < 16:
            raise BadNotification("bad size or password")
        if not notification.headers.endswith(b"\r\n\r\n"):
            raise BadNotification("bad header section")
        return notification


def wrapSigned(body: bytes, signature: bytes) -> bytes:
    """
    @return: a signed notification: C{body} with its detached signature.
    """
    return json.dumps(
        {"body": base64.b64encode(body).decode("ascii"), "signature": signature.decode("ascii")},
        separators=(",", ":"),
    ).encode("ascii")


def unwrapSigned(data: bytes) -> tuple[bytes, bytes]:
    """
    @return: C{(body, signature)} of a signed notification.

    @raise BadNotification: if malformed.
    """
    try:
        doc = json.loads(data)
        return base64.b64decode(doc["body"], validate=True), doc["signature"].encode("ascii")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadNotification(str(e)) from None


def receiptProof(password: bytes, digest: str, recipient: Address) -> str:
    """
    @return: the proof, known only to holders of C{password}, that
        C{recipient} is done with the message C{digest}.
    """
    return hmac.new(password, f"{_RECEIVE_KIND}\0{digest}\0{recipient}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ReceiveNotification:
    """
    A recipient's word that it is done with a message (fetched or
    discarded).
    """

    recipient: Address
    digest: str
    proof: str

    def encode(self) -> bytes:
        return json.dumps(
            {"kind": _RECEIVE_KIND, "from": str(self.recipient), "digest": self.digest, "proof": self.proof},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def make(cls, password: bytes, digest: str, recipient: Address) -> ReceiveNotification:
        return cls(recipient, digest, receiptProof(password, digest, recipient))

    @classmethod
    def decode(cls, data: bytes) -> ReceiveNotification:
        try:
            doc = json.loads(data)
            if doc["kind"] != _RECEIVE_KIND:
                raise BadNotification("not a receive notification")
            return cls(Address.parse(doc["from"]), str(doc["digest"]), str(doc["proof"]))
        except BadNotification:
            raise
        except (ValueError, KeyError, TypeError, P2PMTAError) as e:
            raise BadNotification(str(e)) from None

    def provenBy(self, password: bytes) -> bool:
        """@return: whether this receipt proves knowledge of C{password}."""
        return hmac.compare_digest(self.proof, receiptProof(password, self.digest, self.recipient))


def headerFields(headers: bytes) -> dict:
    """
    A few parsed header fields of a header section, for logs.
    """
    parsed = BytesHeaderParser(policy=compat32).parsebytes(headers)
    return {name: str(parsed.get(name, "")) for name in ("From", "Subject", "Date")}
