"""
Tests for L{p2pmta.openpgp}: interoperability with the real gpg binary both
ways, and refusal of every kind of bad message, key and signature.
"""

import atexit
import base64
import hashlib
import io
import os
import random
import shutil
import subprocess
import tempfile
import time
import tracemalloc
import zlib

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from p2pmta.errors import BadKey, BadSignature, DecryptionFailed
from p2pmta.gpg import KEY_PARAMETERS
from p2pmta.openpgp import (
    PublicKey,
    SecretKey,
    decrypt,
    encrypt,
    parseSessionKey,
    sign,
    verify,
)
from p2pmta.openpgp import encryption
from p2pmta.openpgp.packets import lengthBytes, packetBytes, readPackets
from p2pmta.receiving import _Chunks

_WHOLE_BODY = encryption._WHOLE_BODY

GPG = shutil.which("gpg")

_FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=list(HealthCheck)
)


def _gpg(home, *args, input=None):
    """Run gpg on C{home}, status lines on stderr. @return: the CompletedProcess."""
    command = ["gpg", "--homedir", home, "--batch", "--no-tty", "--status-fd", "2"]
    command += ["--trust-model", "always", *args]
    env = dict(os.environ, LC_ALL="C", LANGUAGE="C")
    return subprocess.run(
        command, input=input, capture_output=True, timeout=120, env=env, check=False
    )


def _status(result) -> set:
    """@return: the C{[GNUPG:]} status lines of a gpg run, without the prefix."""
    lines = result.stderr.decode("utf-8", "replace").splitlines()
    return {line[9:] for line in lines if line.startswith("[GNUPG:] ")}


class _Zeros:
    """A stream of C{size} zero bytes, never held in memory."""

    def __init__(self, size: int):
        self._left = size

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        self._left -= n
        return bytes(n)


class _Digest:
    """A sink that keeps only the SHA-256 and the length of what it is given."""

    def __init__(self):
        self.hash, self.size = hashlib.sha256(), 0

    def write(self, data) -> None:
        self.hash.update(data)
        self.size += len(data)


def _decrypt(message: bytes, maxOutput: int = 1 << 24, **keys) -> bytes:
    out = io.BytesIO()
    decrypt(io.BytesIO(message), out, maxOutput=maxOutput, **keys)
    return out.getvalue()


def _encrypt(data: bytes, recipients, **options) -> bytes:
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, recipients, **options)
    return out.getvalue()


# Hand-made packets, for messages our encrypt never writes.


def _literal(data: bytes) -> bytes:
    return packetBytes(11, b"b\x00\x00\x00\x00\x00" + data)


def _compressed(inner: bytes, algorithm: int = 2) -> bytes:
    return packetBytes(8, bytes([algorithm]) + zlib.compress(inner))


def _seipd(key: bytes, inner: bytes, mdc: bytes | None = None, tag=18) -> bytes:
    """A SEIPD packet (or with C{tag=9} a SED packet) of C{inner} under C{key}."""
    prefix = os.urandom(16)
    plain = prefix + prefix[-2:] + inner
    if mdc is None:
        plain += b"\xd3\x14"
        mdc = hashlib.sha1(plain).digest()
    encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
    body = encryptor.update(plain + mdc) + encryptor.finalize()
    return packetBytes(tag, (b"\x01" if tag == 18 else b"") + body)


def _kill(home: str) -> None:
    """Stop the gpg-agent of C{home}, if any."""
    command = ["gpgconf", "--homedir", home, "--kill", "all"]
    subprocess.run(command, capture_output=True, timeout=30, check=False)


_KEYS: dict = {}


def _keys() -> dict:
    """
    Make three p2pmta keys with gpg, once per test run, each in a template
    GnuPG home (agent stopped, removed at exit).

    @return: C{{name: (home, public, armored, secret)}}.
    """
    if not _KEYS:
        root = tempfile.mkdtemp(prefix="og", dir="/tmp")
        atexit.register(shutil.rmtree, root, True)
        for name in ("alice", "bob", "carol"):
            home = os.path.join(root, name)
            os.mkdir(home, 0o700)
            parameters = KEY_PARAMETERS.format(address=f"{name}@demo").encode()
            result = _gpg(home, "--gen-key", input=parameters)
            exports = [
                _gpg(home, *args).stdout
                for args in [
                    ["--export"],
                    ["--armor", "--export"],
                    ["--export-secret-keys"],
                ]
            ]
            _kill(home)
            assert result.returncode == 0 and all(exports), result.stderr
            _KEYS[name] = (home, *exports)
    return _KEYS


class _Homes(dict):
    """Each key's GnuPG home for one test, copied when first asked for."""

    def __init__(self, test: TestCase, keys: dict):
        super().__init__()
        self._test, self._keys = test, keys

    def __missing__(self, name: str) -> str:
        home = tempfile.mkdtemp(prefix="og", dir="/tmp")
        self._test.addCleanup(shutil.rmtree, home, True)
        self._test.addCleanup(_kill, home)
        ignore = shutil.ignore_patterns("S.*", "*.lock", ".#*")
        shutil.copytree(self._keys[name][0], home, ignore=ignore, dirs_exist_ok=True)
        self[name] = home
        return home


class _GPGTestCase(TestCase):
    """
    Three p2pmta keys made by gpg: C{alice}, C{bob} and C{carol}, each in
    its own GnuPG home (a copy, for this test only, of a template made once).
    """

    def setUp(self):
        if GPG is None:
            raise self.skipTest("gpg is not installed")
        keys = _keys()
        self.public = {name: k[1] for name, k in keys.items()}
        self.armored = {name: k[2] for name, k in keys.items()}
        self.secret = {name: k[3] for name, k in keys.items()}
        self.keys = {name: SecretKey.fromExport(k) for name, k in self.secret.items()}
        self.pubs = {name: k.publicKey for name, k in self.keys.items()}
        self.homes = _Homes(self, keys)

    def gpgDecrypt(self, name: str, message: bytes) -> bytes:
        """@return: what gpg in C{name}'s home decrypts C{message} to."""
        result = _gpg(self.homes[name], "--decrypt", input=message)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue({"DECRYPTION_OKAY", "GOODMDC"} <= _status(result))
        return result.stdout

    def gpgEncrypt(self, data: bytes, *args, name="alice") -> bytes:
        """@return: C{data} (or with L{None}, a file in C{args}) encrypted by gpg to C{name}."""
        home, recipient = self.homes[name], f"{name}@demo"
        stdin = b"" if data is None else data
        result = _gpg(home, "-o", "-", "-e", "-r", recipient, *args, input=stdin)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def scratchKey(self, *commands) -> str:
        """
        Run gpg C{commands} (lists of arguments, where C{FPR} stands for the
        fingerprint of the last key made) in a fresh home, for this test only.

        @return: the home.
        """
        home = tempfile.mkdtemp(prefix="og", dir="/tmp")
        self.addCleanup(shutil.rmtree, home, True)
        self.addCleanup(_kill, home)
        with open(os.path.join(home, "gpg-agent.conf"), "w") as f:
            f.write("s2k-count 65536\n")  # protect keys fast, not well
        fingerprint = None
        for command in commands:
            command = [fingerprint if arg == "FPR" else arg for arg in command]
            result = _gpg(home, "--pinentry-mode", "loopback", *command)
            self.assertEqual(result.returncode, 0, result.stderr)
            for line in _status(result):
                if line.startswith(("KEY_CREATED P ", "KEY_CREATED B ")):
                    fingerprint = line.split()[2]
        return home


class KeyTests(_GPGTestCase):
    """L{PublicKey.fromExport} and L{SecretKey.fromExport}."""

    def test_publicKey(self):
        """The fingerprints and key ids are gpg's, binary or armoured."""
        result = _gpg(self.homes["alice"], "--with-colons", "--list-keys")
        lines = [line.split(":") for line in result.stdout.decode().splitlines()]
        fingerprints = [fields[9] for fields in lines if fields[0] == "fpr"]
        subkeyIds = [fields[4] for fields in lines if fields[0] == "sub"]
        key = PublicKey.fromExport(self.public["alice"])
        self.assertEqual(key.fingerprint, fingerprints[0])
        self.assertEqual(key.encryptionFingerprint.hex().upper(), fingerprints[1])
        self.assertEqual(key.encryptionKeyId.hex().upper(), subkeyIds[0])
        self.assertEqual(key.keyId, bytes.fromhex(fingerprints[0])[-8:])
        self.assertEqual((key.kdfHash, key.kdfCipher), (8, 7))
        self.assertEqual(PublicKey.fromExport(self.armored["alice"]), key)

    def test_secretKey(self):
        """A secret key export, binary or armoured, gives the same public key."""
        self.assertEqual(self.keys["alice"].publicKey, self.pubs["alice"])
        self.assertEqual(self.pubs["alice"], PublicKey.fromExport(self.public["alice"]))
        self.assertNotEqual(self.pubs["alice"], self.pubs["bob"])
        self.assertIn(self.pubs["alice"].fingerprint, repr(self.keys["alice"]))
        armored = _gpg(self.homes["bob"], "--armor", "--export-secret-keys").stdout
        self.assertEqual(SecretKey.fromExport(armored).publicKey, self.pubs["bob"])

    def test_garbage(self):
        """Anything but one key export is BadKey."""
        for data in [b"", b"hello", b"\x99", b"-----BEGIN PGP", bytes(1 << 20 | 1)]:
            self.assertRaises(BadKey, PublicKey.fromExport, data)
            self.assertRaises(BadKey, SecretKey.fromExport, data)
        self.assertRaises(BadKey, PublicKey.fromExport, self.secret["alice"])
        self.assertRaises(BadKey, SecretKey.fromExport, self.public["alice"])
        both = self.public["alice"] + self.public["bob"]
        self.assertRaises(BadKey, PublicKey.fromExport, both)
        self.assertRaises(BadKey, PublicKey.fromExport, self.public["alice"][:-5])

    def test_otherAlgorithms(self):
        """RSA keys, keys without a Curve25519 subkey and NIST subkeys are BadKey."""
        home = self.scratchKey(
            [
                "--passphrase",
                "",
                "--quick-gen-key",
                "rsa@demo",
                "rsa1024",
                "default",
                "0",
            ],
            [
                "--passphrase",
                "",
                "--quick-gen-key",
                "nist@demo",
                "ed25519",
                "sign",
                "0",
            ],
            ["--passphrase", "", "--quick-add-key", "FPR", "nistp256", "encr", "0"],
            [
                "--passphrase",
                "",
                "--quick-gen-key",
                "lone@demo",
                "ed25519",
                "sign",
                "0",
            ],
        )
        for address in ("rsa@demo", "nist@demo", "lone@demo"):
            exported = _gpg(home, "--export", address).stdout
            self.assertRaises(BadKey, PublicKey.fromExport, exported)

    def test_protectedSecretKey(self):
        """A passphrase-protected secret key is BadKey."""
        home = self.scratchKey(
            ["--passphrase", "pw", "--quick-gen-key", "p@demo", "ed25519", "sign", "0"],
            ["--passphrase", "pw", "--quick-add-key", "FPR", "cv25519", "encr", "0"],
        )
        exported = _gpg(
            home, "--pinentry-mode", "loopback", "--passphrase", "pw",
            "--export-secret-keys",
        ).stdout  # fmt: skip
        self.assertTrue(exported)
        self.assertRaises(BadKey, SecretKey.fromExport, exported)
        PublicKey.fromExport(_gpg(home, "--export").stdout)

    def test_foreignSubkey(self):
        """A subkey bound by another primary key is not used: BadKey."""
        alice = readPackets(self.public["alice"])
        bob = readPackets(self.public["bob"])
        forged = b"".join(packetBytes(t, b) for t, b in alice[:3] + bob[3:])
        self.assertEqual(len(alice), 5)
        self.assertRaises(BadKey, PublicKey.fromExport, forged)
        unbound = b"".join(packetBytes(t, b) for t, b in alice[:4])
        self.assertRaises(BadKey, PublicKey.fromExport, unbound)
        same = b"".join(packetBytes(t, b) for t, b in alice)
        self.assertEqual(PublicKey.fromExport(same), self.pubs["alice"])

    def test_revokedKey(self):
        """A key with its revocation certificate is BadKey."""
        home = self.scratchKey(
            ["--passphrase", "", "--quick-gen-key", "r@demo", "ed25519", "sign", "0"],
            ["--passphrase", "", "--quick-add-key", "FPR", "cv25519", "encr", "0"],
        )
        PublicKey.fromExport(_gpg(home, "--export").stdout)
        folder = os.path.join(home, "openpgp-revocs.d")
        with open(os.path.join(folder, os.listdir(folder)[0]), "rb") as f:
            certificate = f.read().replace(b":-----BEGIN", b"-----BEGIN")
        self.assertEqual(_gpg(home, "--import", input=certificate).returncode, 0)
        self.assertRaises(BadKey, PublicKey.fromExport, _gpg(home, "--export").stdout)


class EncryptTests(_GPGTestCase):
    """gpg reads what L{encrypt} writes."""

    def test_gpgDecrypts(self):
        """gpg decrypts messages of many sizes, compressed or not, to the plaintext."""
        for size in (0, 1, 10 * 1024, (1 << 16) - 7, 3 << 16, (1 << 20) + 12345):
            data = os.urandom(size // 2) + bytes(size - size // 2)
            for compress in (0, 1, 9):
                message = _encrypt(data, [self.pubs["alice"]], compress=compress)
                self.assertEqual(self.gpgDecrypt("alice", message), data)
                self.assertEqual(_decrypt(message, secretKey=self.keys["alice"]), data)

    def test_huffmanOnly(self):
        """
        A message compressed with zlib's Huffman-only strategy (base64 of
        binary attachments) is standard: gpg decrypts it, and it is smaller.
        """
        data = base64.encodebytes(os.urandom(100_000)).replace(b"\n", b"\r\n")
        plain = _encrypt(data, [self.pubs["alice"]])
        message = _encrypt(data, [self.pubs["alice"]], compress=1, strategy=zlib.Z_HUFFMAN_ONLY)
        self.assertLess(len(message), 0.8 * len(plain))
        self.assertEqual(self.gpgDecrypt("alice", message), data)
        self.assertEqual(_decrypt(message, secretKey=self.keys["alice"]), data)

    def test_eachRecipient(self):
        """Each of three recipients decrypts, with gpg and with L{decrypt}."""
        data = os.urandom(10 * 1024)
        for compress in (0, 6):
            message = _encrypt(data, list(self.pubs.values()), compress=compress)
            for name in ("alice", "bob", "carol"):
                self.assertEqual(self.gpgDecrypt(name, message), data)
                self.assertEqual(_decrypt(message, secretKey=self.keys[name]), data)

    def test_sessionKey(self):
        """The session key returned (or given) is the one gpg finds."""
        out = io.BytesIO()
        key = encrypt(io.BytesIO(b"hi"), out, [self.pubs["bob"]])
        result = _gpg(
            self.homes["bob"], "--show-session-key", "-d", input=out.getvalue()
        )
        self.assertEqual(parseSessionKey(result.stderr), key)
        self.assertEqual(len(key), 32)
        given = os.urandom(32)
        out = io.BytesIO()
        self.assertEqual(
            encrypt(io.BytesIO(b"x"), out, [self.pubs["bob"]], sessionKey=given), given
        )
        self.assertEqual(_decrypt(out.getvalue(), sessionKey=given), b"x")
        self.assertRaises(ValueError, encrypt, io.BytesIO(), out, [])

    def test_streams(self):
        """16 MB go through encrypt and decrypt with little memory."""
        size = 16 << 20
        with tempfile.TemporaryFile() as message:
            tracemalloc.start()
            try:
                encrypt(_Zeros(size), message, [self.pubs["alice"]], compress=1)
                encryptPeak = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                message.seek(0)
                out = _Digest()
                decrypt(message, out, maxOutput=size, secretKey=self.keys["alice"])
                decryptPeak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        self.assertEqual(out.hash.digest(), hashlib.sha256(bytes(size)).digest())
        self.assertLess(encryptPeak, 2 << 20)
        self.assertLess(decryptPeak, 2 << 20)


class DecryptTests(_GPGTestCase):
    """L{decrypt} reads what gpg writes, and only that."""

    def test_gpgMessages(self):
        """Messages from gpg, however compressed and whichever AES, decrypt."""
        data = os.urandom(100_000) + bytes(100_000)
        variants = [
            [],
            ["--compress-algo", "zlib"],
            ["--compress-algo", "zip"],
            ["-z", "0"],
            ["--cipher-algo", "AES128"],
            ["--cipher-algo", "AES192", "-z", "0"],
        ]
        for args in variants:
            message = self.gpgEncrypt(data, *args)
            self.assertEqual(_decrypt(message, secretKey=self.keys["alice"]), data)

    def test_fromFile(self):
        """A message gpg makes from a file (definite lengths) decrypts."""
        path = os.path.join(self.homes["alice"], "plain")
        for data in (b"", b"short", os.urandom(70_000)):
            with open(path, "wb") as f:
                f.write(data)
            message = self.gpgEncrypt(None, path)
            self.assertEqual(_decrypt(message, secretKey=self.keys["alice"]), data)

    def test_sessionKey(self):
        """A message decrypts with the session key gpg shows, and returns it."""
        message = self.gpgEncrypt(b"secret")
        result = _gpg(self.homes["alice"], "--show-session-key", "-d", input=message)
        key = parseSessionKey(result.stderr)
        self.assertEqual(_decrypt(message, sessionKey=key), b"secret")
        out = io.BytesIO()
        found = decrypt(
            io.BytesIO(message), out, maxOutput=10, secretKey=self.keys["alice"]
        )
        self.assertEqual(found, key)
        self.assertRaises(ValueError, parseSessionKey, "gpg: no session key")

    def test_shortReads(self):
        """
        A message read from a stream whose reads return less than asked (a
        pulled ciphertext's chunks as they came from the network, through
        L{receiving._Chunks}) decrypts the same, and a cut one fails.
        """
        data = os.urandom(150_000) + bytes(50_000)
        for args in ([], ["-z", "0"]):
            message = self.gpgEncrypt(data, *args)
            cuts = sorted({0, len(message)} | {random.randrange(len(message)) for _ in range(40)})
            chunks = [message[a:b] for a, b in zip(cuts, cuts[1:])] + [b""]
            out = io.BytesIO()
            decrypt(_Chunks(chunks), out, maxOutput=len(data), secretKey=self.keys["alice"])
            self.assertEqual(out.getvalue(), data)
            self.assertRaises(
                DecryptionFailed,
                decrypt,
                _Chunks(chunks[:-2]),
                io.BytesIO(),
                maxOutput=len(data),
                secretKey=self.keys["alice"],
            )

    def test_chunksSeek(self):
        """
        L{receiving._Chunks} tells where it is and goes back there, across
        its chunks, empty ones included.
        """
        chunks = [b"abc", b"", b"defg", b"h"]
        stream = _Chunks(chunks)
        self.assertTrue(stream.seekable())
        self.assertEqual((stream.read(2), stream.tell()), (b"ab", 2))
        self.assertEqual((stream.read(10), stream.read(2), stream.tell()), (b"c", b"de", 5))
        self.assertEqual(b"".join(iter(lambda: stream.read(3), b"")), b"fgh")
        self.assertEqual(stream.tell(), 8)
        for offset in range(9):
            self.assertEqual(stream.seek(offset), offset)
            self.assertEqual(b"".join(iter(lambda: stream.read(1), b"")), b"abcdefgh"[offset:])
        self.assertEqual((stream.seek(20), stream.read(1)), (8, b""))

    def test_severalRecipients(self):
        """Any recipient of a gpg message to several decrypts it."""
        _gpg(self.homes["alice"], "--import", input=self.public["bob"])
        message = self.gpgEncrypt(b"both", "-r", "bob@demo")
        for name in ("alice", "bob"):
            self.assertEqual(_decrypt(message, secretKey=self.keys[name]), b"both")
        self.assertRaises(
            DecryptionFailed, _decrypt, message, secretKey=self.keys["carol"]
        )

    def test_wrongKey(self):
        """Another key, or a wrong session key, fails."""
        message = self.gpgEncrypt(b"for alice")
        self.assertRaises(
            DecryptionFailed, _decrypt, message, secretKey=self.keys["bob"]
        )
        for key in (os.urandom(32), os.urandom(16), b"", os.urandom(33)):
            self.assertRaises(DecryptionFailed, _decrypt, message, sessionKey=key)

    def test_maxOutput(self):
        """More plaintext than maxOutput fails; exactly maxOutput does not."""
        data = os.urandom(10 * 1024)
        for message in (self.gpgEncrypt(data), _encrypt(data, [self.pubs["alice"]])):
            self.assertEqual(
                _decrypt(message, len(data), secretKey=self.keys["alice"]), data
            )
            self.assertRaises(
                DecryptionFailed,
                _decrypt,
                message,
                len(data) - 1,
                secretKey=self.keys["alice"],
            )

    def test_refused(self):
        """No MDC (--rfc2440), BZip2, signed, armoured or symmetric messages fail."""
        variants = [
            ["--rfc2440"],
            ["--compress-algo", "bzip2"],
            ["--sign"],
            ["--armor"],
        ]
        for args in variants:
            message = self.gpgEncrypt(b"data " * 100, *args)
            self.assertRaises(
                DecryptionFailed, _decrypt, message, secretKey=self.keys["alice"]
            )
        symmetric = _gpg(
            self.homes["alice"], "--pinentry-mode", "loopback", "--passphrase", "pw",
            "--symmetric", input=b"data",
        ).stdout  # fmt: skip
        self.assertTrue(symmetric)
        self.assertRaises(
            DecryptionFailed, _decrypt, symmetric, secretKey=self.keys["alice"]
        )


class SignatureTests(_GPGTestCase):
    """L{sign} and L{verify}, both ways with gpg."""

    def gpgSign(self, data: bytes, *args, name="alice") -> bytes:
        result = _gpg(self.homes[name], "--detach-sign", *args, input=data)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_verifiesGPG(self):
        """gpg's detached signatures, binary or armoured, verify."""
        data = os.urandom(5000)
        for args in (
            [],
            ["--armor"],
            ["--digest-algo", "SHA256"],
            ["--digest-algo", "SHA512"],
        ):
            signature = self.gpgSign(data, *args)
            self.assertEqual(
                verify(data, signature, self.pubs["alice"]),
                self.pubs["alice"].fingerprint,
            )

    def test_gpgVerifies(self):
        """gpg finds our signatures good, by the right key."""
        data = os.urandom(5000)
        home = self.homes["alice"]
        path = os.path.join(home, "data")
        with open(path, "wb") as f:
            f.write(data)
        result = _gpg(home, "--verify", "-", path, input=sign(data, self.keys["alice"]))
        self.assertEqual(result.returncode, 0, result.stderr)
        status = {line.split()[0]: line.split()[1:] for line in _status(result)}
        fingerprint = self.pubs["alice"].fingerprint
        self.assertEqual(status["GOODSIG"][0], fingerprint[-16:])
        self.assertEqual(status["VALIDSIG"][0], fingerprint)
        self.assertEqual(status["VALIDSIG"][-1], fingerprint)
        signature = sign(data, self.keys["alice"])
        self.assertEqual(verify(data, signature, self.pubs["alice"]), fingerprint)

    def test_rejects(self):
        """Altered data, another key, text mode, truncation and garbage fail."""
        data = b"the message"
        signature = self.gpgSign(data)
        bad = [
            (data + b"!", signature, self.pubs["alice"]),
            (data, signature, self.pubs["bob"]),
            (data, sign(data, self.keys["bob"]), self.pubs["alice"]),
            (data, self.gpgSign(data, "--textmode"), self.pubs["alice"]),
            (data, signature[:-1], self.pubs["alice"]),
            (data, signature + signature, self.pubs["alice"]),
            (data, b"", self.pubs["alice"]),
            (data, b"-----BEGIN PGP SIGNATURE-----\n\n", self.pubs["alice"]),
            (data, bytes(1 << 17), self.pubs["alice"]),
            (data, self.public["alice"], self.pubs["alice"]),
        ]
        for args in bad:
            self.assertRaises(BadSignature, verify, *args)


class HostileTests(_GPGTestCase):
    """Every kind of bad message gives DecryptionFailed and nothing else."""

    def assertFails(self, message: bytes, maxOutput: int = 1 << 20, **keys):
        keys = keys or {"secretKey": self.keys["alice"]}
        self.assertRaises(DecryptionFailed, _decrypt, message, maxOutput, **keys)

    def test_flippedByte(self):
        """Flipping any bit of any byte of a message makes it fail."""
        for compress in (0, 6):
            message = _encrypt(b"hello " * 30, [self.pubs["alice"]], compress=compress)
            for i in range(len(message)):
                for bit in (0x01, 0x80):
                    flipped = bytearray(message)
                    flipped[i] ^= bit
                    self.assertFails(bytes(flipped))

    def test_truncated(self):
        """Every prefix of a message fails, with definite or partial lengths."""
        message = _encrypt(b"hello " * 30, [self.pubs["alice"]], compress=6)
        for n in range(len(message)):
            self.assertFails(message[:n])
        message = _encrypt(os.urandom(150_000), [self.pubs["alice"]])
        for n in [0, 200, 1 << 16, (1 << 16) + 1, len(message) - 1] + list(
            range(100, len(message), 9973)
        ):
            self.assertFails(message[:n])
        self.assertFails(self.gpgEncrypt(os.urandom(150_000))[:-1])

    def test_noMDC(self):
        """Encrypted data without MDC (tag 9), a bad or absent MDC, fail."""
        key = os.urandom(32)
        inner = _literal(b"data")
        self.assertEqual(_decrypt(_seipd(key, inner), sessionKey=key), b"data")
        for message in [
            _seipd(key, inner, tag=9),
            _seipd(key, inner, mdc=b""),
            _seipd(key, inner, mdc=b"\xd3\x14" + bytes(20)),
            _seipd(key, inner, mdc=b"\xd3\x13" + hashlib.sha1(inner).digest()),
            _seipd(key, b"", mdc=b""),
            packetBytes(18, b"\x01"),
            packetBytes(18, b"\x02" + _seipd(key, inner)[3:]),
        ]:
            self.assertFails(message, sessionKey=key)

    def test_authenticated(self):
        """
        A message known to be its sender's (C{authenticated}, as a pulled
        ciphertext whose SHA-256 its sender signed) decrypts without its
        MDC's hash being computed, so a wrong hash goes unseen; an MDC packet
        missing or out of form still fails.  Not so authenticated, the wrong
        hash fails.  Whether the packet is read whole or streamed.
        """
        key = os.urandom(32)
        for data in (b"data", os.urandom(300_000)):
            inner = _literal(data)
            self.assertEqual(_decrypt(_seipd(key, inner), sessionKey=key, authenticated=True), data)
            wrongHash = _seipd(key, inner, mdc=b"\xd3\x14" + bytes(20))
            self.assertFails(wrongHash, sessionKey=key)
            self.assertEqual(_decrypt(wrongHash, sessionKey=key, authenticated=True), data)
            for message in [
                _seipd(key, inner, mdc=b""),
                _seipd(key, inner, mdc=b"\xd3\x13" + bytes(20)),
                _seipd(key, inner, tag=9),
                _seipd(key, inner + b"x", mdc=b"\xd3\x14" + bytes(20))[:-1],
            ]:
                self.assertFails(message, sessionKey=key, authenticated=True)

    def test_compressionBomb(self):
        """256 MB of compressed zeros stop at maxOutput, fast, in little memory."""
        bomb = io.BytesIO()
        key = encrypt(_Zeros(256 << 20), bomb, [self.pubs["alice"]], compress=9)
        self.assertLess(len(bomb.getvalue()), 1 << 20)
        for keys in ({"secretKey": self.keys["alice"]}, {"sessionKey": key}):
            tracemalloc.start()
            try:
                started = time.monotonic()
                self.assertRaises(
                    DecryptionFailed,
                    decrypt,
                    io.BytesIO(bomb.getvalue()),
                    _Digest(),
                    maxOutput=1 << 20,
                    **keys,
                )
                seconds = time.monotonic() - started
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertLess(seconds, 2)
            self.assertLess(peak, 4 << 20)

    def test_compressionLayers(self):
        """One compressed layer (ZIP or ZLIB) is fine; two, or BZip2, fail."""
        key = os.urandom(16)
        once = _seipd(key, _compressed(_literal(b"data")))
        self.assertEqual(_decrypt(once, sessionKey=key), b"data")
        raw = zlib.compressobj(wbits=-15)
        zipped = b"\x01" + raw.compress(_literal(b"zip")) + raw.flush()
        zipped = _seipd(key, packetBytes(8, zipped))
        self.assertEqual(_decrypt(zipped, sessionKey=key), b"zip")
        for inner in [
            _compressed(_compressed(_literal(b"data"))),
            _compressed(_literal(b"data"), algorithm=3),
            _compressed(_literal(b"data"), algorithm=0),
            _compressed(b""),
            packetBytes(8, b"\x02" + zlib.compress(_literal(b"data"))[:-1]),
            packetBytes(8, b"\x02" + zlib.compress(_literal(b"data")) + b"\0"),
            _compressed(_literal(b"data") + b"\0"),
        ]:
            self.assertFails(_seipd(key, inner), sessionKey=key)

    def test_unexpectedPackets(self):
        """Packets other than PKESKs, one SEIPD, one literal, fail."""
        key = os.urandom(32)
        good = _encrypt(b"data", [self.pubs["alice"]], sessionKey=key)
        self.assertEqual(_decrypt(good, sessionKey=key), b"data")
        pkesk = packetBytes(*readPackets(good)[0])
        marker = packetBytes(10, b"PGP")
        signature = sign(b"data", self.keys["alice"])
        for inner in [
            marker + _literal(b"data"),
            _literal(b"data") + _literal(b"data"),
            _literal(b"data") + signature,
            signature + _literal(b"data"),
            packetBytes(4, b"\x03\x00\x0a\x16" + bytes(9)) + _literal(b"data"),
            _literal(b"data") + b"\0",
            packetBytes(11, b"x\x00\x00\x00\x00\x00data"),
            packetBytes(11, b"b\x05\x00"),
            b"",
            _seipd(key, _literal(b"data")),
        ]:
            self.assertFails(_seipd(key, inner), sessionKey=key)
        for message in [
            marker + good,
            good + b"\0",
            good + good,
            packetBytes(13, b"alice@demo") + good,
            _literal(b"data"),
            pkesk,
            b"",
        ]:
            self.assertFails(message)
            self.assertFails(message, sessionKey=key)

    def test_lengths(self):
        """Absurd lengths and abused partial lengths fail."""
        key = os.urandom(32)
        good = _encrypt(os.urandom(2000), [self.pubs["alice"]], sessionKey=key)
        pkesk, seipd = readPackets(good)
        body = seipd[1]
        for message in [
            b"\xc1\xff\xff\xff\xff\xff" + pkesk[1],  # PKESK of 4 GB
            packetBytes(1, pkesk[1] + bytes(1 << 16)) + packetBytes(18, body),
            b"\xc1\xe9"
            + pkesk[1]
            + bytes(512 - len(pkesk[1]))
            + b"\x00",  # partial PKESK
            b"\x87" + pkesk[1],  # indeterminate PKESK
            b"\xd2\xff\xff\xff\xff\xff" + body,  # SEIPD of 4 GB
            b"\xd2\xe8"
            + body[:256]
            + lengthBytes(len(body) - 256)
            + body[256:],
            b"\xd2\xfe" + body,  # a 1 GB chunk, cut short
            b"\xd2\xe9" + body[:512],  # a partial chunk, then nothing
            b"\xd2\xdf\xff" + body,
        ]:
            self.assertFails(message, sessionKey=key)
        self.assertFails(packetBytes(1, pkesk[1]) * 1001 + packetBytes(*seipd))
        self.assertEqual(
            _decrypt(packetBytes(*seipd), sessionKey=key),
            _decrypt(good, sessionKey=key),
        )
        huge = b"\xcb\xff\xff\xff\xff\xf0b\x00\x00\x00\x00\x00data"
        self.assertFails(_seipd(key, huge), sessionKey=key)
        partialLiteral = b"\xcb\xe0" + b"b\x00\x00\x00\x00\x00data"
        self.assertFails(_seipd(key, partialLiteral), sessionKey=key)

    def test_badPKESK(self):
        """A PKESK with another key id, algorithm or padding gives no session key."""
        good = _encrypt(b"data", [self.pubs["alice"]])
        pkesk, seipd = readPackets(good)
        wildcard = pkesk[1][:1] + bytes(8) + pkesk[1][9:]
        message = packetBytes(1, wildcard) + packetBytes(18, seipd[1])
        self.assertEqual(_decrypt(message, secretKey=self.keys["alice"]), b"data")
        for body in [
            b"\x02" + pkesk[1][1:],
            pkesk[1][:9] + b"\x01" + pkesk[1][10:],
            pkesk[1] + b"\0",
            pkesk[1][:-8],
            pkesk[1][:10],
            b"",
        ]:
            self.assertFails(packetBytes(1, body) + packetBytes(18, seipd[1]))


class FuzzTests(_GPGTestCase):
    """Arbitrary and mutated input gives only the documented exceptions."""

    def setUp(self):
        super().setUp()
        self.plain = b"fuzz me " * 50
        alice = [self.pubs["alice"]]
        self.messages = [
            _encrypt(self.plain, alice),
            _encrypt(self.plain, alice + [self.pubs["bob"]], compress=6),
        ]
        self.signature = sign(self.plain, self.keys["alice"])

    @staticmethod
    def mutate(data: bytes, draw) -> bytes:
        """@return: C{data} with a few bytes replaced, inserted or deleted."""
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(0, len(data) - 1)))
            kind = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
            if kind == "set" and data:
                data[i] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[i : i + draw(st.integers(1, 8))]
            else:
                del data[i:]
        return bytes(data)

    @_FUZZ
    @given(st.binary(max_size=3000), st.booleans())
    def test_arbitraryMessages(self, data, withSessionKey):
        """Arbitrary bytes fail to decrypt with DecryptionFailed."""
        keys = {"secretKey": self.keys["alice"]}
        if withSessionKey:
            keys = {"sessionKey": os.urandom(32)}
        self.assertRaises(DecryptionFailed, _decrypt, data, 1 << 20, **keys)

    @_FUZZ
    @given(st.data())
    def test_mutatedMessages(self, data):
        """A mutated message fails, or still decrypts to the plaintext."""
        message = self.mutate(data.draw(st.sampled_from(self.messages)), data.draw)
        try:
            plain = _decrypt(message, 1 << 20, secretKey=self.keys["alice"])
        except DecryptionFailed:
            return
        self.assertEqual(plain, self.plain)

    @_FUZZ
    @given(st.data())
    def test_wholeAgreesWithStreaming(self, data):
        """
        A small message's encrypted packet, read whole, gives what reading
        it in a stream gives: the same plaintext, or DecryptionFailed.  The
        packets inside are mutated before sealing, so that they pass the
        MDC and reach the parser.
        """
        key = os.urandom(32)
        plain = data.draw(st.binary(max_size=2000))
        inner = data.draw(
            st.sampled_from([_literal(plain), _compressed(_literal(plain)), _compressed(_literal(plain), 1)])
        )
        if data.draw(st.booleans()):
            inner = self.mutate(inner, data.draw)
        message = _seipd(key, inner)
        if data.draw(st.booleans()):
            message = self.mutate(message, data.draw)
        maxOutput = data.draw(st.sampled_from([1 << 20, len(plain), max(0, len(plain) - 1)]))

        def outcome(wholeBody: int):
            self.patch(encryption, "_WHOLE_BODY", wholeBody)
            try:
                return _decrypt(message, maxOutput, sessionKey=key)
            except DecryptionFailed:
                return DecryptionFailed

        # Not encryption._WHOLE_BODY: the example before this one patched it.
        self.assertEqual(outcome(_WHOLE_BODY), outcome(-1))

    def test_wholeOrStreamed(self):
        """
        A definite-length encrypted packet of up to C{_WHOLE_BODY} bytes is
        read whole; a longer one, or one in partial lengths, is streamed.
        """
        opened = []
        whole = encryption._openWhole
        self.patch(encryption, "_openWhole", lambda *a: opened.append(len(a[0])) or whole(*a))
        key = os.urandom(32)
        small = os.urandom(1000)
        self.assertEqual(_decrypt(_seipd(key, _literal(small)), sessionKey=key), small)
        self.assertEqual(len(opened), 1)
        large = os.urandom(encryption._WHOLE_BODY)
        self.assertEqual(_decrypt(_seipd(key, _literal(large)), sessionKey=key), large)
        partial = _encrypt(os.urandom(100_000), [self.pubs["alice"]], sessionKey=key)
        self.assertEqual(len(_decrypt(partial, sessionKey=key)), 100_000)
        self.assertEqual(len(opened), 1)

    @_FUZZ
    @given(st.data())
    def test_mutatedSignatures(self, data):
        """A mutated or arbitrary signature gives the fingerprint or BadSignature."""
        signature = data.draw(
            st.one_of(
                st.just(self.signature).map(lambda s: self.mutate(s, data.draw)),
                st.binary(max_size=300),
            )
        )
        try:
            fingerprint = verify(self.plain, signature, self.pubs["alice"])
        except BadSignature:
            return
        self.assertEqual(fingerprint, self.pubs["alice"].fingerprint)

    @_FUZZ
    @given(st.data())
    def test_mutatedKeys(self, data):
        """A mutated or arbitrary key export gives a key or BadKey."""
        export = data.draw(
            st.one_of(
                st.sampled_from([self.public["alice"], self.armored["alice"]]).map(
                    lambda k: self.mutate(k, data.draw)
                ),
                st.binary(max_size=600),
            )
        )
        for reader in (PublicKey.fromExport, SecretKey.fromExport):
            try:
                reader(export)
            except BadKey:
                pass
        try:
            SecretKey.fromExport(self.mutate(self.secret["alice"], data.draw))
        except BadKey:
            pass
