"""
Send and receive notifications: the codecs a peer applies to what strangers
put under its DHT keys.
"""

import io
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.address import Address
from p2pmta.notification import (
    MAX_BATCH,
    MAX_NOTICE_SIZE,
    BadNotification,
    Doorbell,
    decodeBatch,
    encodeBatch,
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
        receipt = ReceiveNotification.make(BOB, [(b"p" * 32, "ab" * 32)]).encode()
        self.assertRaises(BadNotification, SendNotification.decode, receipt)
        self.assertRaises(BadNotification, SendNotification.decode, notification(sessionKey=b"k" * 7).encode())

    @given(st.binary(max_size=500))
    def test_decodeNeverCrashes(self, data):
        """Arbitrary bytes decode or raise BadNotification, nothing else."""
        for decode in (SendNotification.decode, ReceiveNotification.decode, Doorbell.decode, unwrapSigned):
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

    def test_batch(self):
        """
        One notification tells of several messages with its own password;
        one told of twice, mixed senders, or too many are refused.
        """
        first = notification(sessionKey=b"s" * 32)
        second = notification(digest="cd" * 32, headers=b"Subject: \xe9t\xe9\r\n\r\n")
        self.assertEqual(decodeBatch(encodeBatch([first, second], b"q" * 32)), (b"q" * 32, (first, second)))
        self.assertRaises(BadNotification, decodeBatch, encodeBatch([first, first], b"q" * 32))
        self.assertRaises(ValueError, encodeBatch, [first, notification(sender=BOB)], b"q" * 32)
        self.assertRaises(ValueError, encodeBatch, [first] * (MAX_BATCH + 1), b"q" * 32)
        self.assertRaises(BadNotification, decodeBatch, encodeBatch([first], b"short"))

    def test_wrapSigned(self):
        """
        A body and its signature travel together, in binary: an armoured
        signature loses its armour; anything cut short is refused.
        """
        self.assertEqual(unwrapSigned(wrapSigned(b"\x00body", b"sig")), (b"\x00body", b"sig"))
        armoured = b"-----BEGIN PGP SIGNATURE-----\n\nAAEC\n=abcd\n-----END PGP SIGNATURE-----\n"
        self.assertEqual(unwrapSigned(wrapSigned(b"{}", armoured)), (b"{}", b"\x00\x01\x02"))
        signed = wrapSigned(b"body", b"sig")
        for bad in (signed[:6], signed[:8], b"{" + signed, b""):
            self.assertRaises(BadNotification, unwrapSigned, bad)
        self.assertRaises(ValueError, wrapSigned, b"body", b"")

    def test_doorbell(self):
        """A doorbell names a notice by digest and size; anything else is refused."""
        bell = Doorbell(ALICE, "ab" * 32, 5000)
        self.assertEqual(Doorbell.decode(bell.encode()), bell)
        for bad in (
            Doorbell(ALICE, "AB" * 32, 5000),
            Doorbell(ALICE, "ab" * 31, 5000),
            Doorbell(ALICE, "ab" * 32, 0),
            Doorbell(ALICE, "ab" * 32, MAX_NOTICE_SIZE + 1),
        ):
            self.assertRaises(BadNotification, Doorbell.decode, bad.encode())
        self.assertRaises(BadNotification, Doorbell.decode, notification().encode())
        self.assertRaises(BadNotification, SendNotification.decode, bell.encode())


class ReceiveNotificationTests(SynchronousTestCase):
    def test_proof(self):
        """Only the password's holder can make a receipt for a digest and recipient."""
        made = ReceiveNotification.make(BOB, [(b"k" * 32, "cd" * 32), (b"j" * 32, "ef" * 32)])
        receipt = ReceiveNotification.decode(made.encode())
        self.assertEqual(receipt.prefixes, ["cd" * 8, "ef" * 8])
        self.assertLess(len(made.encode()), 150, "a receipt costs some 32 bytes per message")
        self.assertTrue(receipt.provenBy("cd" * 32, b"k" * 32))
        self.assertTrue(receipt.provenBy("ef" * 32, b"j" * 32))
        self.assertFalse(receipt.provenBy("cd" * 32, b"j" * 32), "each proof is for its own message")
        self.assertFalse(receipt.provenBy("cd" * 32, b"x" * 32))
        forged = ReceiveNotification(ALICE, receipt.done)
        self.assertFalse(forged.provenBy("cd" * 32, b"k" * 32), "the proof names its recipient")


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

    def test_attachmentsCountedByLineFeeds(self):
        """
        Sizes are the same whether the message is scanned whole (L{bytes})
        or read from a stream, and, for a message whose every line ends in
        CRLF, whether or not C{crlf} says so (its base64 line ends are then
        counted by their LFs alone).  Without C{crlf}, LF-only line ends
        count as they are.
        """
        from email import policy
        from email.message import EmailMessage

        m = EmailMessage()
        m["Subject"] = "x"
        m.set_content("hi")
        sizes = (1, 2, 57, 1000, 70_000)
        for n, size in enumerate(sizes):
            m.add_attachment(os.urandom(size), maintype="application", subtype="octet-stream", filename=f"f{n}")
        message = m.as_bytes(policy=policy.SMTP)
        self.assertEqual(message.count(b"\n"), message.count(b"\r\n"))
        expected = [{"name": f"f{n}", "type": "application/octet-stream", "size": size} for n, size in enumerate(sizes)]
        for crlf in (False, True):
            self.assertEqual(attachmentsOf(message, crlf=crlf), expected)
            self.assertEqual(attachmentsOf(io.BytesIO(message), crlf=crlf), expected)
            self.assertEqual(attachmentsOf(bytearray(message), crlf=crlf), expected)
        self.assertEqual(attachmentsOf(message.replace(b"\r\n", b"\n")), expected)

    def test_attachmentsAcrossReads(self):
        """
        A boundary line cut by the end of a read is still found, wherever
        the cut falls: the parts after it are listed with their sizes.
        """
        from p2pmta import notification

        line = b"QUJD" * 19 + b"\r\n"  # a base64 line of 76 characters
        head = (
            b"Content-Type: multipart/mixed; boundary=\"=_cut_here\"\r\n\r\n"
            b"--=_cut_here\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\n"
        )  # fmt: skip
        for shift in range(-16, 4):
            # The "\r\n--=_cut_here" after the first part ends at the first
            # read's end, plus shift.
            lines, rest = divmod(notification._BLOCK - len(head) - 12 + shift, 78)
            first = (b"y" * 76 + b"\r\n") * lines + b"z" * rest + b"\r\n"
            message = (
                head + first + b"--=_cut_here\r\nContent-Transfer-Encoding: base64\r\n"
                b"Content-Type: application/octet-stream; name=b.bin\r\n\r\n" + line * 3 +
                b"--=_cut_here--\r\n"
            )  # fmt: skip
            self.assertEqual(
                attachmentsOf(io.BytesIO(message)),
                [
                    {"name": "a.txt", "type": "text/plain", "size": len(first)},
                    {"name": "b.bin", "type": "application/octet-stream", "size": 3 * 57},
                ],
                f"shift {shift}",
            )

    def test_attachmentsBounded(self):
        """
        Multiparts nested 2,000 deep and 100,000 tiny parts are scanned in
        one pass: attachments are found, at most C{limit} of them.
        """
        deep = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
        for i in range(1, 2000):
            deep += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
        deep += b"--b1999\r\nContent-Disposition: attachment; filename=deep.txt\r\n\r\nabc\r\n--b1999--\r\n"
        self.assertEqual(attachmentsOf(deep), [], "nesting past MAX_MIME_DEPTH is not followed")
        parts = b"".join(
            b"--x\r\nContent-Disposition: attachment; filename=f%d\r\n\r\n%d\r\n" % (i, i) for i in range(100_000)
        )
        wide = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + parts + b"--x--\r\n"
        found = attachmentsOf(wide)
        self.assertEqual(len(found), 50)
        self.assertEqual(found[0], {"name": "f0", "type": "text/plain", "size": 3})
