# -*- test-case-name: tests.test_tls -*-
"""
The peer's TLS identity: one self-signed certificate and its key, made on
first start and kept in the private folder, for STARTTLS in the submission
(and IMAP) servers.

Everything here blocks (key generation, file reads and writes): callers on
the reactor thread run L{loadOrCreateCertificate} in a thread, e.g. with
L{twisted.internet.threads.deferToThread}.

The certificate is made with C{cryptography}, the library pyOpenSSL itself
is built on: pyOpenSSL 24+ no longer offers the X.509 extension API a
subjectAltName needs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions, PrivateCertificate

from p2pmta.fileutil import createSecretFile

#: The name of the file, in the private folder, holding the key and the
#: certificate (PEM, key first).
CERTIFICATE_FILE = "tls.pem"

#: How long a new certificate is valid.
VALIDITY = datetime.timedelta(days=3650)


def loadOrCreateCertificate(privateDir: str, hostname: str) -> CertificateOptions:
    """
    Load the peer's TLS certificate and key from C{privateDir/tls.pem},
    making a self-signed one (EC P-256, valid ten years, common name and
    subjectAltName C{hostname}) on the first call.

    The file is created readable by its owner only, and never overwritten:
    a later call reuses it whatever C{hostname} is, so clients that pinned
    the certificate keep trusting it.  This blocks: run it in a thread.

    @param privateDir: The peer's private folder (it must exist).
    @param hostname: The name (or IP address) the certificate is for.

    @return: Server TLS options carrying the key and certificate.
    """
    path = os.path.join(privateDir, CERTIFICATE_FILE)
    try:
        pem = _read(path)
    except FileNotFoundError:
        pem = makeSelfSignedPEM(hostname)
        try:
            createSecretFile(path, pem)
        except FileExistsError:
            # Another start-up made it first: use that one.
            pem = _read(path)
    return PrivateCertificate.loadPEM(pem).options()


def makeSelfSignedPEM(hostname: str, now: datetime.datetime | None = None) -> bytes:
    """
    Make a new key and a self-signed certificate for C{hostname}.

    @param hostname: The certificate's common name (cut to 64 characters)
        and subjectAltName: a DNS name (IDNA-encoded if need be; the peer's
        address will do), or an IP address (then an IP subjectAltName).
    @param now: The start of the validity period (default: now, UTC).

    @return: The PEM key (PKCS#8, unencrypted) followed by the PEM
        certificate.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    # A common name is at most 64 characters; the subjectAltName is what
    # clients check.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    try:
        altName: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        dnsName = hostname if hostname.isascii() else hostname.encode("idna").decode()
        altName = x509.DNSName(dnsName)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        # A day of slack for clients whose clock is behind.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([altName]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
