"""
Tests for L{p2pmta.tls}: the peer's self-signed TLS certificate.
"""

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.tls import CERTIFICATE_FILE, loadOrCreateCertificate, makeSelfSignedPEM


def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE") :])


class LoadOrCreateCertificateTests(SynchronousTestCase):
    """
    Tests for L{loadOrCreateCertificate}.
    """

    def setUp(self) -> None:
        self.private = self.mktemp()
        os.makedirs(self.private, mode=0o700)
        self.path = os.path.join(self.private, CERTIFICATE_FILE)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_createsSecretFile(self) -> None:
        """
        The first call writes the key and certificate to C{tls.pem}, mode 0600.
        """
        options = loadOrCreateCertificate(self.private, "peer.example")
        self.assertIsInstance(options, CertificateOptions)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        pem = self.read()
        self.assertIn(b"-----BEGIN PRIVATE KEY-----", pem)
        self.assertIn(b"-----BEGIN CERTIFICATE-----", pem)

    def test_certificateNamesHost(self) -> None:
        """
        The certificate is self-signed for the host name (CN and SAN), EC
        P-256, valid for ten years starting no later than now.
        """
        loadOrCreateCertificate(self.private, "peer.example")
        cert = _certificate(self.read())
        self.assertEqual(cert.subject, cert.issuer)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "peer.example")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["peer.example"])
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLessEqual(cert.not_valid_before_utc, now)
        lifetime = cert.not_valid_after_utc - now
        self.assertGreater(lifetime, datetime.timedelta(days=3640))
        self.assertLess(lifetime, datetime.timedelta(days=3660))

    def test_ipAddressHost(self) -> None:
        """
        An IP address becomes an IP subjectAltName.
        """
        cert = _certificate(makeSelfSignedPEM("127.0.0.1"))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1")],
        )

    def test_otherNames(self) -> None:
        """
        A peer address, a long name and a non-ASCII name all give a
        certificate (CN cut to 64 characters, SAN IDNA-encoded).
        """
        for hostname, san in [
            ("alice@demo", "alice@demo"),
            ("a" * 60 + "@" + "b" * 60 + ".example", "a" * 60 + "@" + "b" * 60 + ".example"),
            ("bücher.example", "xn--bcher-kva.example"),
        ]:
            cert = _certificate(makeSelfSignedPEM(hostname))
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            self.assertEqual(cn, hostname[:64])
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.assertEqual(ext.value.get_values_for_type(x509.DNSName), [san])

    def test_reused(self) -> None:
        """
        A later call reuses the stored certificate, even for another name.
        """
        loadOrCreateCertificate(self.private, "peer.example")
        first = self.read()
        options = loadOrCreateCertificate(self.private, "other.example")
        self.assertEqual(self.read(), first)
        self.assertEqual(
            options.certificate.get_subject().CN, "peer.example"
        )

    def test_existingFileKept(self) -> None:
        """
        A certificate already there (made elsewhere) is loaded, not replaced.
        """
        pem = makeSelfSignedPEM("made.before")
        with open(self.path, "wb") as f:
            f.write(pem)
        options = loadOrCreateCertificate(self.private, "peer.example")
        self.assertEqual(self.read(), pem)
        self.assertEqual(options.certificate.get_subject().CN, "made.before")

    def test_optionsMakeContext(self) -> None:
        """
        The options build a server TLS context from the key and certificate.
        """
        options = loadOrCreateCertificate(self.private, "peer.example")
        self.assertIsNotNone(options.getContext())

    def test_missingFolder(self) -> None:
        """
        A missing private folder is an error, not a silently made folder.
        """
        self.assertRaises(
            FileNotFoundError,
            loadOrCreateCertificate,
            os.path.join(self.private, "nope"),
            "peer.example",
        )
