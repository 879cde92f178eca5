"""
Send and receive notifications: the codecs a peer applies to what strangers
put under its DHT keys.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.address import Address
from p2pmta.notification import (
    BadNotification,
    ReceiveNotification,
    SendNotification,
    attachmentsOf,
    splitHeaders,
    unwrapSigned,
    wrapSigned,
)

ALICE, BOB = Address("alice", "demo"), Address("bob", "demo")


def notification(**changes):
    fields = dict(
        sender=ALICE,
        recipient=BOB,
        digest="ab" * 32,
        ciphertextSize=100,
        size=80,
        headers=b"Subject: hi\r\n\r\n",
        password=b"p" * 32,
        sent=1.5,
        attachments=({"name": "a.bin", "type": "application/octet-stream", "size": 3},),
    )
    fields.update(changes)
    return SendNotification(**fields)


class SendNotificationTests(SynchronousTestCase):
    def test_roundTrip(self):
        """A notification decodes to itself."""
        n = notification()
        self.assertEqual(SendNotification.decode(n.encode()), n)

    def test_refused(self):
        """Bad digests, short passwords, broken header sections, wrong kinds are refused."""
        for bad in (
            notification(digest="AB" * 32),
            notification(digest="ab" * 31),
            notification(password=b"short"),
            notification(headers=b"Subject: no end"),
            notification(size=-1),
        ):
            self.assertRaises(BadNotification, SendNotification.decode, bad.encode())
        receipt = ReceiveNotification.make(b"p" * 32, "ab" * 32, BOB).encode()
        self.assertRaises(BadNotification, SendNotification.decode, receipt)

    @given(st.binary(max_size=500))
    def test_decodeNeverCrashes(self, data):
        """Arbitrary bytes decode or raise BadNotification, nothing else."""
        for decode in (SendNotification.decode, ReceiveNotification.decode, unwrapSigned):
            try:
                decode(data)
            except BadNotification:
                pass

    @given(st.binary(min_size=16, max_size=64), st.binary(max_size=2000))
    def test_anyPasswordAndHeaders(self, password, extra):
        """Any password and header bytes survive encoding."""
        headers = extra.replace(b"\r\n\r\n", b"") + b"\r\n\r\n"
        n = notification(password=password, headers=headers)
        self.assertEqual(SendNotification.decode(n.encode()), n)

    def test_wrapSigned(self):
        """A body and its signature travel together."""
        self.assertEqual(unwrapSigned(wrapSigned(b"\x00body", b"sig")), (b"\x00body", b"sig"))


class ReceiveNotificationTests(SynchronousTestCase):
    def test_proof(self):
        """Only the password's holder can make a receipt for a digest and recipient."""
        receipt = ReceiveNotification.decode(ReceiveNotification.make(b"k" * 32, "cd" * 32, BOB).encode())
        self.assertTrue(receipt.provenBy(b"k" * 32))
        self.assertFalse(receipt.provenBy(b"x" * 32))
        forged = ReceiveNotification(ALICE, receipt.digest, receipt.proof)
        self.assertFalse(forged.provenBy(b"k" * 32), "the proof names its recipient")


class MessageFactsTests(SynchronousTestCase):
    def test_splitHeaders(self):
        """The header section keeps the blank line that ends it."""
        self.assertEqual(splitHeaders(b"A: 1\r\n\r\nbody\r\n"), (b"A: 1\r\n\r\n", b"body\r\n"))
        self.assertEqual(splitHeaders(b"A: 1\r\n"), (b"A: 1\r\n\r\n", b""))

    def test_attachments(self):
        """Attachments are listed with name, type and decoded size."""
        from email.message import EmailMessage

        m = EmailMessage()
        m["Subject"] = "x"
        m.set_content("hi")
        m.add_attachment(b"\x00" * 1000, maintype="image", subtype="png", filename="p.png")
        self.assertEqual(attachmentsOf(m.as_bytes()), [{"name": "p.png", "type": "image/png", "size": 1000}])
        self.assertEqual(attachmentsOf(b"not mime at all"), [])
