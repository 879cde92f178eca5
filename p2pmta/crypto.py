# -*- test-case-name: tests.test_crypto -*-
"""
The peer's OpenPGP identity and its key cache, over GnuPG 2.2 and python-gnupg.

Every gpg run happens in a caller-owned L{ThreadPool}, never in the reactor
thread.  GnuPG fails when keyring writes (import, key generation) run beside
other operations on one home, so a L{p2pmta.locks.ReadWriteLock} lets encrypt, decrypt,
sign and verify run in parallel while each write runs alone.

Trust comes only from our pins (the paper's key cache area,
L{p2pmta.pins.Pins}): a key that is in the GnuPG keyring but not pinned for
an address is never used for it.

gpg keeps the keys (generation, import, export, pins), but the operations on
the mail path (sign, verify, encrypt, decrypt) run in-process through
L{p2pmta.openpgp} for the key types p2pmta generates: a gpg process costs
8-18 ms of start-up and agent round trips, the operation itself microseconds.
The messages stay standard OpenPGP, readable by gpg; a key of another type
(an old home, a peer's RSA key) takes the gpg path.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import zlib
from contextlib import contextmanager

import gnupg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta import openpgp
from p2pmta.address import Address, asAddress
from p2pmta.errors import (
    BadKey,
    BadSignature,
    CryptoError,
    DecryptionFailed,
    GPGUnavailable,
    KeyMismatch,
    UnknownKey,
)
from p2pmta.gpg import (
    GPG_OPTIONS,
    KEY_PARAMETERS,
    environment,
    judgeDecryption,
    scanKeys,
    signedBy,
    statusLines,
    stopAgent,
    uidEmail,
)
from p2pmta.interfaces import IKeyring
from p2pmta.locks import ReadWriteLock
from p2pmta.pins import Pins

# python-gnupg logs the first bytes of data it verifies (and key material) at
# DEBUG; none of that may reach a log, whatever the root logger's level.
logging.getLogger("gnupg").setLevel(logging.WARNING)

# gpg-agent's longest socket name is S.gpg-agent.browser and a Unix socket
# path holds 107 characters: the agent fails in a home longer than 87.
MAX_HOME_LENGTH = 80

_MAX_KEY_SIZE = 1 << 20


@implementer(IKeyring)
class Keyring:
    """
    The peer's key pair and its pins, in one GnuPG home.  Use L{Keyring.open}.

    Pins live in C{pins.sqlite} in the home (a L{p2pmta.pins.Pins}), touched
    only from the pool.

    A home whose path is longer than L{MAX_HOME_LENGTH} characters leaves no
    room for gpg-agent's socket names, so gpg reaches it through a short
    symbolic link in a fresh 0700 directory under C{tempfile.gettempdir()},
    removed again by L{close}.

    @ivar fingerprint: our key's fingerprint, upper-case hex.
    @ivar address: our address (L{str}), the user id of our key.
    """

    log = Logger()

    def __init__(self, reactor, home: str, address, threadpool, gpgBinary="gpg"):
        self._reactor = reactor
        self._home = os.path.abspath(home)
        self._address = asAddress(address)
        self.address = str(self._address)
        self._pool = threadpool
        self._gpgBinary = gpgBinary
        self._lock = ReadWriteLock()
        self._gpg = None
        self._gpgHome = self._home
        self._linkDir = None
        self._publicKey = b""
        self._closed = False
        self._pins = Pins(os.path.join(self._home, "pins.sqlite"))
        self.fingerprint = None
        self._secret = None  # our openpgp.SecretKey, for the in-process path
        self._keys: dict[str, object] = {}  # fingerprint -> openpgp.PublicKey or None

    @classmethod
    def open(cls, reactor, home: str, address, threadpool, gpgBinary="gpg"):
        """
        Open the keyring in C{home} (created 0700 if missing), generating
        our key pair on first use; later, reuse the secret key pinned for, or
        else named after, C{address}.

        @return: a Deferred firing with the ready L{Keyring}, or failing with
            L{GPGUnavailable}.
        """

        async def opened():
            return await cls(reactor, home, address, threadpool, gpgBinary)._open()

        return Deferred.fromCoroutine(opened())

    async def _open(self) -> Keyring:
        now = self._reactor.seconds()
        fpr, generated, seconds = await self._call(True, self._openBlocking, now)
        self.fingerprint = fpr
        if self._linkDir is not None:
            self.log.info(
                "home {home} is used as {link}", home=self._home, link=self._gpgHome
            )
        template = "using OpenPGP key {fingerprint} for {address}"
        if generated:
            template = (
                "generated OpenPGP key {fingerprint} for {address} in {seconds:.3f}s"
            )
        self.log.info(template, fingerprint=fpr, address=self.address, seconds=seconds)
        return self

    async def _call(self, exclusive: bool, f, *args):
        """Run C{f(*args)} in the pool, holding the lock shared or C{exclusive}."""
        if self._closed:
            raise CryptoError("the keyring is closed")
        await self._lock.acquire(exclusive)
        try:
            return await deferToThreadPool(self._reactor, self._pool, f, *args)
        finally:
            self._lock.release(exclusive)

    def _shared(self, f, *args) -> Deferred:
        return Deferred.fromCoroutine(self._call(False, f, *args))

    def _publicKeyOf(self, fpr: str):
        """
        The parsed key C{fpr} for the in-process path, or L{None} if it is
        of a type only gpg handles (blocking; cached).
        """
        if fpr in self._keys:
            return self._keys[fpr]
        key = None
        exported = self._gpg.export_keys(fpr, armor=False, minimal=True)
        if exported:
            try:
                key = openpgp.PublicKey.fromExport(_asBytes(exported))
            except BadKey as e:
                self.log.info("key {fpr} goes through gpg: {e}", fpr=fpr, e=e)
            else:
                if key.fingerprint.upper() != fpr:
                    key = None
        self._keys[fpr] = key
        return key

    def _recipientFingerprints(self, recipients, toSelf: bool) -> list[str]:
        """
        The fingerprints pinned for C{recipients}, once each, after ours if
        C{toSelf} (ours alone if there is no other).

        @raise UnknownKey: if a recipient has no pinned key.
        """
        fingerprints = [self.fingerprint] if toSelf else []
        for recipient in recipients:
            fpr = self._pins.lookup(recipient)
            if fpr is None:
                raise UnknownKey(str(recipient))
            if fpr not in fingerprints:
                fingerprints.append(fpr)
        return fingerprints or [self.fingerprint]

    def _recipientKeys(self, fingerprints):
        """
        The parsed keys of C{fingerprints}, or L{None} if one of them (or
        ours) is for gpg only.
        """
        keys = [self._publicKeyOf(fpr) for fpr in fingerprints]
        return None if self._secret is None or None in keys else keys

    def _openBlocking(self, now: float):
        os.makedirs(self._home, mode=0o700, exist_ok=True)
        if len(self._home) > MAX_HOME_LENGTH:
            self._linkDir = tempfile.mkdtemp(prefix="p2pmta-gpg-")
            self._gpgHome = os.path.join(self._linkDir, "h")
            os.symlink(self._home, self._gpgHome)
        try:
            return self._setUpBlocking(now)
        except BaseException:
            if self._linkDir is not None:
                shutil.rmtree(self._linkDir, ignore_errors=True)
            raise

    def _setUpBlocking(self, now: float):
        if shutil.which(self._gpgBinary) is None:
            raise GPGUnavailable(f"{self._gpgBinary} not found")
        try:
            options = list(GPG_OPTIONS)
            self._gpg = gnupg.GPG(
                self._gpgBinary, self._gpgHome, options=options, env=environment()
            )
        except (OSError, ValueError) as e:
            raise GPGUnavailable(f"{self._gpgBinary}: {e}") from None
        if not self._gpg.version or self._gpg.version < (2, 1, 17):
            raise GPGUnavailable(f"{self._gpgBinary} is {self._gpg.version}, need 2.2")
        self._pins.create()
        secret = {k["fingerprint"].upper(): k for k in self._gpg.list_keys(secret=True)}
        fpr, generated, seconds = self._pins.lookup(self._address), False, 0.0
        if fpr not in secret:
            mine = [
                k for k in secret.values() if self.address in map(uidEmail, k["uids"])
            ]
            if mine:  # the oldest: the most likely to have been announced
                fpr = min(mine, key=lambda k: (int(k["date"]), k["fingerprint"]))
                fpr = fpr["fingerprint"].upper()
            else:
                started = time.monotonic()
                result = self._gpg.gen_key(KEY_PARAMETERS.format(address=self.address))
                seconds = time.monotonic() - started
                if result.returncode != 0 or not result.fingerprint:
                    raise CryptoError(f"key generation failed: {result.status}")
                fpr, generated = result.fingerprint.upper(), True
        exported = self._gpg.export_keys(fpr, armor=True, minimal=True)
        if not exported:
            raise CryptoError(f"cannot export our key {fpr}")
        self._publicKey = exported.encode("ascii")
        self._pins.pin(self.address, fpr, now)
        self._secret = self._loadSecret(fpr)
        return fpr, generated, seconds

    def _loadSecret(self, fpr: str):
        """Our secret key for the in-process path, or L{None} (blocking)."""
        try:
            exported = self._gpg.export_keys(fpr, secret=True, armor=False, expect_passphrase=False)
            secret = openpgp.SecretKey.fromExport(_asBytes(exported))
        except (BadKey, ValueError, TypeError) as e:
            self.log.info("our key {fpr} goes through gpg: {e}", fpr=fpr, e=e)
            return None
        if secret.publicKey.fingerprint.upper() != fpr:
            return None
        self._keys[fpr] = secret.publicKey
        return secret

    def close(self) -> Deferred:
        """
        Stop this home's gpg-agent once the operations in flight are done,
        and remove the short link to the home, if one was made.

        @return: a Deferred firing with L{None}.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if not self._closed:
            error = await self._call(True, self._closeBlocking)
            self._closed = True
            if error:
                self.log.warn("could not stop gpg-agent: {e}", e=error)

    def _closeBlocking(self) -> str | None:
        error = stopAgent(self._gpgBinary, self._gpgHome)
        if self._linkDir is not None:
            shutil.rmtree(self._linkDir, ignore_errors=True)
        return error

    def publicKey(self) -> Deferred:
        """
        @return: a Deferred firing with our ASCII-armoured public key.
        """
        return succeed(self._publicKey)

    def exportKey(self, address) -> Deferred:
        """
        @return: a Deferred firing with the ASCII-armoured public key pinned
            for C{address}, or failing with L{UnknownKey}.
        """
        return self._shared(self._exportPinned, address)

    def _exportPinned(self, address) -> bytes:
        fpr = self._pins.lookup(address)
        if fpr is None:
            raise UnknownKey(str(address))
        exported = self._gpg.export_keys(fpr, armor=True, minimal=True)
        if not exported:
            raise UnknownKey(f"{address}: key {fpr} is not in the key cache")
        return exported.encode("ascii")

    def prune(self, unseenSince: float) -> Deferred:
        """
        Forget the keys of peers not seen (pinned, verified or encrypted
        to) since POSIX time C{unseenSince}, pins included; our own key
        stays.  A forgotten peer is pinned afresh on its next contact.

        @return: a Deferred firing with the addresses forgotten.
        """
        return Deferred.fromCoroutine(self._call(True, self._pruneBlocking, unseenSince))

    def _pruneBlocking(self, unseenSince: float) -> list[str]:
        forgotten = []
        for address, fpr in self._pins.unseenSince(unseenSince, self.address):
            self._gpg.delete_keys(fpr)
            self._pins.forget(address, fpr)
            self._keys.pop(fpr, None)
            forgotten.append(address)
        return forgotten

    def pinned(self, address) -> Deferred:
        """
        @return: a Deferred firing with the fingerprint pinned for
            C{address}, or L{None}.
        """
        return self._shared(self._pins.lookup, address)

    def pin(self, address, armoredKey: bytes, fingerprint: str) -> Deferred:
        """
        Import C{armoredKey} for C{address} and pin it, if it holds exactly
        one public key and no secret key, whose fingerprint is C{fingerprint}
        (in any case) and one of whose user ids is the e-mail address
        C{address}, and which can sign and encrypt.  The key is inspected in
        a throwaway home; only its public packets are imported.  The first
        key pinned for an address stays; pinning it again refreshes it.

        @return: a Deferred firing with the fingerprint, or failing with
            L{KeyMismatch} (not the announced fingerprint, or the address is
            pinned to another key) or L{BadKey} (anything else).
        """
        return Deferred.fromCoroutine(self._pin(address, armoredKey, fingerprint))

    async def _pin(self, address, armoredKey: bytes, fingerprint: str) -> str:
        address = asAddress(address)
        announced = (fingerprint or "").replace(" ", "").upper()
        if not isinstance(armoredKey, bytes) or len(armoredKey) > _MAX_KEY_SIZE:
            raise BadKey("not bytes, or too large")
        if self._closed:
            raise CryptoError("the keyring is closed")
        scan = (scanKeys, self._gpgBinary, armoredKey, self._gpgHome, True)
        keys, secret, exported = await deferToThreadPool(
            self._reactor, self._pool, *scan
        )
        if secret:
            raise BadKey("the data holds a secret key")
        if len(keys) != 1 or exported is None:
            raise BadKey(f"{len(keys)} keys instead of one")
        fpr, uids, capabilities, validity = keys[0]
        if fpr != announced:
            raise KeyMismatch(f"key {fpr} is not the announced {announced}")
        if validity in ("r", "e", "i", "d") or not {"E", "S"} <= set(capabilities):
            raise BadKey(f"key {fpr} cannot both sign and encrypt")
        if str(address) not in map(uidEmail, uids):
            raise BadKey(f"no user id of key {fpr} is {address}")
        now = self._reactor.seconds()
        result = await self._call(True, self._pinBlocking, address, fpr, exported, now)
        template = "pinned key {fingerprint} for {address}"
        if isinstance(result, KeyMismatch):
            template = "refused key {fingerprint} for {address}: pinned to {pinned}"
            self.log.warn(
                template, fingerprint=fpr, address=address, pinned=str(result)
            )
            raise KeyMismatch(f"{address} is pinned to {result}, not {fpr}")
        if result:
            self.log.info(template, fingerprint=fpr, address=address)
        return fpr

    def _pinBlocking(self, address: Address, fpr: str, exported: bytes, now: float):
        existing = self._pins.lookup(address)
        if existing is not None and existing != fpr:
            return KeyMismatch(existing)
        result = self._gpg.import_keys(exported)
        if result.returncode != 0 or fpr not in map(str.upper, result.fingerprints):
            raise BadKey(f"gpg did not import {fpr}")
        self._pins.pin(str(address), fpr, now)
        self._keys.pop(fpr, None)
        return existing is None

    def sign(self, data: bytes) -> Deferred:
        """
        @return: a Deferred firing with a detached, ASCII-armoured signature
            of C{data} by our key.
        """
        return self._shared(self._signBlocking, data)

    def _signBlocking(self, data: bytes) -> bytes:
        if self._secret is not None:
            return openpgp.armor(openpgp.sign(data, self._secret), "PGP SIGNATURE")
        result = self._gpg.sign(
            data, keyid=self.fingerprint, detach=True, clearsign=False
        )
        if result.returncode != 0 or "SIG_CREATED" not in dict(statusLines(result.stderr)):
            raise CryptoError(f"signing failed: {result.status}")
        return result.data

    def verify(self, data: bytes, signature: bytes, address) -> Deferred:
        """
        Check a detached signature by the key pinned for C{address}: the
        signer's primary key fingerprint must be the pinned one.

        @return: a Deferred firing with that fingerprint, or failing with
            L{BadSignature}.
        """
        return self._shared(self._verifyBlocking, data, signature, address)

    def _verifyBlocking(self, data: bytes, signature: bytes, address) -> str:
        expected = self._pins.lookup(address)
        if expected is None:
            raise BadSignature(f"no key is pinned for {address}")
        key = self._publicKeyOf(expected)
        if key is not None:
            if openpgp.verify(data, signature, key).upper() != expected:
                raise BadSignature(f"not a good signature by {address}")
            self._pins.seen([address])
            return expected
        fd, sigPath = tempfile.mkstemp(prefix=".sig-", dir=self._home)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(signature)
            result = self._gpg.verify_data(sigPath, data)
        finally:
            os.remove(sigPath)
        if result.returncode != 0 or not signedBy(statusLines(result.stderr), expected):
            raise BadSignature(f"not a good signature by {address}")
        self._pins.seen([address])
        return expected

    def encrypt(self, data: bytes, recipients, sign=False, compress=True, toSelf=True) -> Deferred:
        """
        Encrypt C{data} once (one session key) to the pinned keys of
        C{recipients} and to our own key, so that our outbox copy stays
        readable to us.

        @param recipients: L{Address}es or strings.
        @param sign: sign with our key too.
        @param compress: compress first (L{True}, or a zlib level 1-9); pass
            L{False} or 0 for data that does not compress.
        @param toSelf: L{False} leaves our own key out (one public-key
            packet less, some 90 bytes, in a value only its recipients
            read).
        @return: a Deferred firing with the binary OpenPGP message, or
            failing with L{UnknownKey} when a recipient is not pinned.
        """
        return self._shared(self._encryptBlocking, data, recipients, sign, compress, toSelf)

    def whileShared(self, f, *args) -> Deferred:
        """
        Run C{f(*args)} in the keyring's threads while no keyring write
        runs: for work that calls L{encryptInto} several times in one
        thread call.

        @return: a Deferred firing with what C{f} returns.
        """
        return self._shared(f, *args)

    def encryptInto(self, source, out, recipients, compress=True, toSelf=True, strategy=zlib.Z_DEFAULT_STRATEGY):
        """
        Like L{encrypt}, blocking, streaming into C{out}: only inside
        L{whileShared}.

        @param source: L{bytes}, a file's path or a binary stream, read to
            its end.
        @param out: anything with C{write} and C{writelines}.
        @param strategy: zlib's strategy (see L{openpgp.encrypt}); gpg,
            when it encrypts instead, uses its own.
        @return: the message's session key, or L{None} when gpg made it.
        @raise UnknownKey: when a recipient is not pinned.
        """
        if isinstance(recipients, (str, Address)):
            recipients = [recipients]
        level = 6 if compress is True else int(compress or 0)
        keys = self.encryptionKeys(recipients, toSelf)
        with _source(source) as stream:
            if keys is None:
                out.write(self._encryptBlocking(stream, recipients, False, level, toSelf))
                return None
            return openpgp.encrypt(stream, out, list(keys.values()), compress=level, strategy=strategy)

    def encryptionKeys(self, recipients, toSelf=True) -> dict | None:
        """
        The keys to encrypt to C{recipients} (and to our own key, if
        C{toSelf}), by fingerprint, for L{openpgp.encrypt} in this process
        or in another; their pins are marked seen.  Blocking: only inside
        L{whileShared}.

        @return: L{openpgp.PublicKey}s, or L{None} if one of them (or ours)
            is for gpg only.
        @raise UnknownKey: when a recipient is not pinned.
        """
        fingerprints = self._recipientFingerprints(recipients, toSelf)
        keys = self._recipientKeys(fingerprints)
        if keys is None:
            return None
        self._pins.seen(recipients)
        return dict(zip(fingerprints, keys))

    def _encryptBlocking(self, source, recipients, sign, compress, toSelf=True):
        if isinstance(recipients, (str, Address)):
            recipients = [recipients]
        level = 6 if compress is True else int(compress or 0)
        fingerprints = self._recipientFingerprints(recipients, toSelf)
        keys = None if sign else self._recipientKeys(fingerprints)
        self._pins.seen(recipients)
        with _source(source) as stream:
            if keys is not None:
                out = io.BytesIO()
                openpgp.encrypt(stream, out, keys, compress=level)
                return out.getvalue()
            options = {
                "sign": self.fingerprint if sign else None,
                "armor": False,
                "extra_args": [] if level else ["--compress-algo", "none"],
            }
            result = self._gpg.encrypt_file(stream, fingerprints, **options)
        done = {"END_ENCRYPTION", "SIG_CREATED"} if sign else {"END_ENCRYPTION"}
        if result.returncode != 0 or not done <= dict(statusLines(result.stderr)).keys():
            raise CryptoError(f"encryption failed: {result.status}")
        return result.data

    def decrypt(self, data: bytes, maxOutput: int, sender=None) -> Deferred:
        """
        Decrypt C{data} with our key.  Only a whole, integrity-protected
        message of at most C{maxOutput} bytes of plaintext is accepted; with
        C{sender}, it must also carry a good signature by the key pinned for
        C{sender}.  Without C{sender}, the message is read in-process and
        must not be signed inside (as p2pmta's are not: their notifications
        carry detached signatures); a message made with C{sign=True} is read
        with C{sender} only.
        A failure that may come from gpg itself ("No secret key") is retried
        once.

        @return: a Deferred firing with the plaintext, or failing with
            L{DecryptionFailed} or L{BadSignature}.
        """
        return Deferred.fromCoroutine(self._decrypt(data, maxOutput, sender))

    async def _decrypt(self, data, maxOutput, sender):
        if sender is None and self._secret is not None:
            try:
                return await self._shared(self._decryptInProcess, data, maxOutput)
            except DecryptionFailed as e:
                self.log.info("refused a message: {reason}", reason=str(e))
                raise
        try:
            plaintext, retried = await self._call(False, self._decryptBlocking, data, maxOutput, sender)
        except (DecryptionFailed, BadSignature) as e:
            self.log.info("refused a message: {reason}", reason=str(e))
            raise
        if retried is not None:
            self.log.info(
                "decrypted on the second try, after: {reason}", reason=retried
            )
        return plaintext

    def decryptInto(self, source, out, maxOutput: int, sessionKey=None, authenticated: bool = False) -> None:
        """
        Like L{decrypt} without C{sender}, blocking, streaming into C{out}:
        only inside L{whileShared}.  Plaintext is written before the message is
        known to be good: after a failure, discard what C{out} got.

        @param source: L{bytes}, a file's path or a binary stream (read
            from where it is; gpg's failures are retried as L{decrypt}'s
            are only if it can seek back there).
        @param out: anything with C{write}.
        @param authenticated: C{source} is known to be what its sender made
            (see L{p2pmta.openpgp.decrypt}; gpg checks the MDC all the same).
        @raise DecryptionFailed: as L{decrypt} does.
        """
        maxOutput = max(0, int(maxOutput))
        if not (sessionKey or self._secret is not None):
            data, _ = self._decryptBlocking(source, maxOutput, None)
            out.write(data)
            return
        keys = {"sessionKey": sessionKey} if sessionKey else {"secretKey": self._secret}
        with _source(source) as stream:
            openpgp.decrypt(stream, out, maxOutput=maxOutput, authenticated=authenticated, **keys)

    def _decryptInProcess(self, data, maxOutput):
        out = io.BytesIO()
        self.decryptInto(data, out, maxOutput)
        return out.getvalue()

    def _decryptBlocking(self, source, maxOutput, sender):
        expected = None
        if sender is not None:
            expected = self._pins.lookup(sender)
            if expected is None:
                raise BadSignature(f"no key is pinned for {sender}")
        maxOutput = max(0, int(maxOutput))
        # gpg takes --max-output 0 as no limit; judgeDecryption counts the bytes too.
        args = ["--max-output", str(max(1, maxOutput))]
        args += ["--skip-verify"] if sender is None else []
        retried = None
        # A stream is read to its end by the first try: the second reads it
        # again from where it began, if it can.
        isStream = hasattr(source, "read")
        start = source.tell() if isStream and getattr(source, "seekable", lambda: False)() else None
        for attempt in (1, 2):
            if attempt == 2 and start is not None:
                source.seek(start)
            with _source(source) as stream:
                try:
                    result = self._gpg.decrypt_file(stream, extra_args=args)
                except Exception as e:  # noqa: BLE001 (a broken pipe, ...)
                    raise DecryptionFailed(type(e).__name__) from None
            problem = judgeDecryption(result, expected, len(result.data), maxOutput)
            if problem is None:
                return result.data, retried
            error, transient = problem
            if not transient or attempt == 2 or (isStream and start is None):
                raise error
            retried = str(error)

    def __repr__(self) -> str:
        return f"<Keyring {self.address} {self.fingerprint} in {self._home}>"


def _asBytes(data) -> bytes:
    """python-gnupg gives exports as L{str} or L{bytes}, depending on armour."""
    if isinstance(data, str):
        return data.encode("latin-1")
    return bytes(data or b"")


@contextmanager
def _source(source):
    """
    Yield a binary stream reading C{source}: L{bytes}, a file path or a
    binary stream (yielded as it is).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif hasattr(source, "read"):
        yield source
    else:
        with open(source, "rb") as f:
            yield f
