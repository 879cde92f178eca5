# -*- test-case-name: tests.test_openpgp -*-
"""
OpenPGP in-process, for the one kind of key p2pmta makes, without running gpg.

GnuPG 2.2 makes p2pmta's keys: a v4 EdDSA Ed25519 primary key that signs and
a v4 ECDH Curve25519 subkey that encrypts.  For those keys this package writes
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
    raises L{p2pmta.errors.DecryptionFailed} for anything else;
  - L{sign} and L{verify} make and check detached v4 EdDSA signatures of
    binary data;
  - L{armor} puts ASCII armour on (as gpg does), L{unarmor} takes it off.

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

The package's modules: L{p2pmta.openpgp.packets} (headers, lengths, MPIs,
armour), L{p2pmta.openpgp.keys}, L{p2pmta.openpgp.signatures} and
L{p2pmta.openpgp.encryption}; this one names what the rest of p2pmta uses.
"""

from p2pmta.openpgp.encryption import decrypt, encrypt, parseSessionKey
from p2pmta.openpgp.keys import PublicKey, SecretKey
from p2pmta.openpgp.packets import armor, unarmor
from p2pmta.openpgp.signatures import sign, verify

__all__ = [
    "PublicKey",
    "SecretKey",
    "armor",
    "decrypt",
    "encrypt",
    "parseSessionKey",
    "sign",
    "unarmor",
    "verify",
]
