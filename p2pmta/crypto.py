# -*- test-case-name: tests.test_crypto -*-
"""
The peer's OpenPGP identity and its key cache, over GnuPG 2.2 and python-gnupg.

Every gpg run happens in a caller-owned L{ThreadPool}, never in the reactor
thread.  GnuPG fails when keyring writes (import, key generation) run beside
other operations on one home, so a L{_ReadWriteLock} lets encrypt, decrypt,
sign and verify run in parallel while each write runs alone.

Trust comes only from our pins (the paper's key cache area): a key that is in
the GnuPG keyring but not pinned for an address is never used for it.

gpg keeps the keys (generation, import, export, pins), but the operations on
the mail path (sign, verify, encrypt, decrypt) run in-process through
L{p2pmta.openpgp} for the key types p2pmta generates: a gpg process costs
8-18 ms of start-up and agent round trips, the operation itself microseconds.
The messages stay standard OpenPGP, readable by gpg; a key of another type
(an old home, a peer's RSA key) takes the gpg path.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections import deque
from contextlib import closing, contextmanager, suppress

import gnupg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta import openpgp
from p2pmta.address import Address
from p2pmta.errors import (
    BadKey,
    BadSignature,
    CryptoError,
    DecryptionFailed,
    GPGUnavailable,
    KeyMismatch,
    UnknownKey,
)
from p2pmta.interfaces import IKeyring

# python-gnupg logs the first bytes of data it verifies (and key material) at
# DEBUG; none of that may reach a log, whatever the root logger's level.
logging.getLogger("gnupg").setLevel(logging.WARNING)

# gpg-agent's longest socket name is S.gpg-agent.browser and a Unix socket
# path holds 107 characters: the agent fails in a home longer than 87.
MAX_HOME_LENGTH = 80

_KEY_PARAMETERS = """\
%no-protection
Key-Type: eddsa
Key-Curve: ed25519
Key-Usage: sign
Subkey-Type: ecdh
Subkey-Curve: cv25519
Subkey-Usage: encrypt
Name-Email: {address}
Expire-Date: 0
%commit
"""

# For every gpg run: trust comes from our pins, keys never from the network.
_OPTIONS = ["--trust-model", "always", "--no-auto-key-retrieve", "--no-greeting"]
_SIGNATURE_PROBLEMS = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}
_MAX_KEY_SIZE = 1 << 20

#: How often at most the last use of a peer's key is written down.
_SEEN_INTERVAL = 3600.0
_UPSERT = (
    "INSERT INTO pins VALUES (?, ?, ?, ?) ON CONFLICT(address) DO UPDATE "
    "SET fingerprint = excluded.fingerprint, last_seen = excluded.last_seen"
)


def _env() -> dict:
    """The environment for gpg: English messages, whatever the locale."""
    return dict(os.environ, LC_ALL="C", LANGUAGE="C")


def _status(stderr: str | None) -> list[tuple[str, str]]:
    """The C{[GNUPG:]} status lines of a gpg run, as (keyword, value)."""
    lines = [
        line[9:] for line in (stderr or "").splitlines() if line[:9] == "[GNUPG:] "
    ]
    return [(line.partition(" ")[0], line.partition(" ")[2].strip()) for line in lines]


def _uidEmail(uid: str) -> str | None:
    """
    @return: the lower-cased e-mail address of a user id (C{"Name <a@b>"},
        C{"<a@b>"} or C{"a@b"}, colons escaped as gpg lists them), or L{None}.
    """
    uid = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), uid)
    match = re.search(r"<([^<>\s]+@[^<>\s]+)>\s*$", uid)
    if match is not None:
        return match.group(1).lower()
    uid = uid.strip()
    return uid.lower() if "@" in uid and not re.search(r"[\s<>]", uid) else None


def _address(address) -> Address:
    return address if isinstance(address, Address) else Address.parse(str(address))


def _signedBy(status, fingerprint: str) -> bool:
    """
    @return: whether the status lines show a good signature (VALIDSIG) whose
        primary key is C{fingerprint}, and no bad or unchecked one.
    """
    if {keyword for keyword, _ in status} & _SIGNATURE_PROBLEMS:
        return False
    for keyword, value in status:
        parts = value.split() or [""]
        primary = parts[9] if len(parts) > 9 else parts[0]
        if keyword == "VALIDSIG" and primary.upper() == fingerprint:
            return True
    return False


def _scanKeys(gpgBinary: str, data: bytes, parent=None, export: bool = False):
    """
    Import C{data} into a throwaway GnuPG home (so nothing reaches a real
    keyring) and list what a real import keeps: self-signatures are checked
    and user ids without one are dropped.  Blocking.

    @return: C{(keys, secretKeys, exported)}: a list of C{(fingerprint,
        uids, capabilities, validity)}, the number of secret keys read, and
        when C{export} is set and exactly one public key was read, that key
        re-exported (public packets only, binary), else L{None}.
    """
    home = tempfile.mkdtemp(prefix="k", dir=parent)
    base = [gpgBinary, "--homedir", home, "--batch", "--no-tty", "--no-autostart"]
    base += ["--no-permission-warning", "--with-colons", "--fixed-list-mode"]
    run = {"capture_output": True, "env": _env(), "timeout": 120, "check": False}
    try:
        imported = subprocess.run(
            base + ["--status-fd", "2", "--import-options", "import-show", "--import"],
            input=data,
            **run,
        )
        keys: list[list] = []
        for line in imported.stdout.decode("utf-8", "replace").splitlines():
            f = line.split(":") + [""] * 12
            if f[0] in ("pub", "sec"):
                keys.append([None, [], f[11], f[1], f[0] == "sec"])
            elif keys and f[0] == "fpr" and keys[-1][0] is None:
                keys[-1][0] = f[9].upper()
            elif keys and f[0] == "uid" and f[1] not in ("r", "e"):
                keys[-1][1].append(f[9])
        secret = sum(key.pop() for key in keys)
        for keyword, value in _status(imported.stderr.decode("latin-1")):
            if keyword == "IMPORT_RES" and len(value.split()) > 9:
                secret += int(value.split()[9])
        exported = None
        if export and len(keys) == 1 and not secret and imported.returncode == 0:
            args = ["--export", "--export-options", "export-minimal", keys[0][0]]
            out = subprocess.run(base + args, **run)
            exported = out.stdout if out.returncode == 0 and out.stdout else None
        return [tuple(key) for key in keys], secret, exported
    finally:
        shutil.rmtree(home, ignore_errors=True)


def fingerprintOf(armoredKey: bytes, gpgBinary: str = "gpg") -> list:
    """
    Read OpenPGP keys without importing them anywhere.  Blocking: call it
    from a thread.

    @return: a L{list} of C{(fingerprint, uids)}, one per key in
        C{armoredKey}, with the fingerprint in upper-case hex.
    """
    return [(fpr, uids) for fpr, uids, _, _ in _scanKeys(gpgBinary, armoredKey)[0]]


class _ReadWriteLock:
    """
    Many shared holders or one exclusive holder, used from the reactor
    thread only.  Waiters are served first come first served, so a waiting
    writer holds back later readers and is not starved.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._waiting: deque = deque()

    def _take(self, exclusive: bool) -> bool:
        if self._writing or (exclusive and self._readers):
            return False
        self._writing = exclusive
        self._readers += not exclusive
        return True

    def acquire(self, exclusive: bool) -> Deferred:
        """
        @return: a Deferred firing with L{None} once the lock is held.
            Cancelling it gives up the place in the queue.
        """
        if not self._waiting and self._take(exclusive):
            return succeed(None)

        def cancel(d):
            self._waiting.remove((exclusive, d))
            self._wake()

        d: Deferred = Deferred(cancel)
        self._waiting.append((exclusive, d))
        return d

    def release(self, exclusive: bool) -> None:
        if exclusive:
            self._writing = False
        else:
            self._readers -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._take(self._waiting[0][0]):
            self._waiting.popleft()[1].callback(None)


@implementer(IKeyring)
class Keyring:
    """
    The peer's key pair and its pins, in one GnuPG home.  Use L{Keyring.open}.

    Pins live in C{pins.sqlite} in the home, touched only from the pool.

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
        self._address = _address(address)
        self.address = str(self._address)
        self._pool = threadpool
        self._gpgBinary = gpgBinary
        self._lock = _ReadWriteLock()
        self._gpg = None
        self._gpgHome = self._home
        self._linkDir = None
        self._publicKey = b""
        self._closed = False
        self._pinsPath = os.path.join(self._home, "pins.sqlite")
        self.fingerprint = None
        self._secret = None  # our openpgp.SecretKey, for the in-process path
        self._pins: dict[str, str] = {}  # address -> fingerprint, a cache
        self._keys: dict[str, object] = {}  # fingerprint -> openpgp.PublicKey or None
        self._lastSeen: dict[str, float] = {}  # last use written down
        self._seenAt: dict[str, float] = {}  # last use

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

    def _db(self):
        return closing(sqlite3.connect(self._pinsPath, timeout=60))

    def _lookupPin(self, address) -> str | None:
        address = str(_address(address))
        cached = self._pins.get(address)
        if cached is not None:
            return cached
        with self._db() as db:
            query = "SELECT fingerprint FROM pins WHERE address = ?"
            row = db.execute(query, (address,)).fetchone()
        if row:
            self._pins[address] = row[0]
        return row[0] if row else None

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
            fpr = self._lookupPin(recipient)
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
            options = list(_OPTIONS)
            self._gpg = gnupg.GPG(
                self._gpgBinary, self._gpgHome, options=options, env=_env()
            )
        except (OSError, ValueError) as e:
            raise GPGUnavailable(f"{self._gpgBinary}: {e}") from None
        if not self._gpg.version or self._gpg.version < (2, 1, 17):
            raise GPGUnavailable(f"{self._gpgBinary} is {self._gpg.version}, need 2.2")
        with self._db() as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS pins (address TEXT PRIMARY KEY, fingerprint"
                " TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL)"
            )
        secret = {k["fingerprint"].upper(): k for k in self._gpg.list_keys(secret=True)}
        fpr, generated, seconds = self._lookupPin(self._address), False, 0.0
        if fpr not in secret:
            mine = [
                k for k in secret.values() if self.address in map(_uidEmail, k["uids"])
            ]
            if mine:  # the oldest: the most likely to have been announced
                fpr = min(mine, key=lambda k: (int(k["date"]), k["fingerprint"]))
                fpr = fpr["fingerprint"].upper()
            else:
                started = time.monotonic()
                result = self._gpg.gen_key(_KEY_PARAMETERS.format(address=self.address))
                seconds = time.monotonic() - started
                if result.returncode != 0 or not result.fingerprint:
                    raise CryptoError(f"key generation failed: {result.status}")
                fpr, generated = result.fingerprint.upper(), True
        exported = self._gpg.export_keys(fpr, armor=True, minimal=True)
        if not exported:
            raise CryptoError(f"cannot export our key {fpr}")
        self._publicKey = exported.encode("ascii")
        with self._db() as db, db:
            db.execute(_UPSERT, (self.address, fpr, now, now))
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
        gpg = shutil.which(self._gpgBinary)
        gpgconf = os.path.join(os.path.dirname(gpg), "gpgconf") if gpg else ""
        args = ["--homedir", self._gpgHome, "--kill", "gpg-agent"]
        error = None
        try:
            gpgconf = gpgconf if os.path.exists(gpgconf) else "gpgconf"
            subprocess.run(
                [gpgconf, *args], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError) as e:
            error = str(e)
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
        fpr = self._lookupPin(address)
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
        self._writeSeen(list(self._seenAt))
        with self._db() as db:
            rows = db.execute(
                "SELECT address, fingerprint FROM pins WHERE last_seen < ? AND address != ? ORDER BY address",
                (unseenSince, self.address),
            ).fetchall()
        forgotten = []
        for address, fpr in rows:
            self._gpg.delete_keys(fpr)
            with self._db() as db, db:
                db.execute("DELETE FROM pins WHERE address = ? AND fingerprint = ?", (address, fpr))
            self._pins.pop(address, None)
            self._keys.pop(fpr, None)
            forgotten.append(address)
        return forgotten

    def _seen(self, addresses) -> None:
        """
        Note that C{addresses} were just used (blocking).  Written down at
        most hourly, and before a prune.
        """
        now = time.time()
        due = []
        for address in addresses:
            address = str(_address(address))
            self._seenAt[address] = now
            if now - self._lastSeen.get(address, float("-inf")) >= _SEEN_INTERVAL:
                due.append(address)
        self._writeSeen(due)

    def _writeSeen(self, addresses) -> None:
        rows = [(self._seenAt[a], a) for a in addresses if a in self._seenAt]
        if not rows:
            return
        with self._db() as db, db:
            db.executemany("UPDATE pins SET last_seen = ? WHERE address = ?", rows)
        for when, address in rows:
            self._lastSeen[address] = when

    def pinned(self, address) -> Deferred:
        """
        @return: a Deferred firing with the fingerprint pinned for
            C{address}, or L{None}.
        """
        return self._shared(self._lookupPin, address)

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
        address = _address(address)
        announced = (fingerprint or "").replace(" ", "").upper()
        if not isinstance(armoredKey, bytes) or len(armoredKey) > _MAX_KEY_SIZE:
            raise BadKey("not bytes, or too large")
        if self._closed:
            raise CryptoError("the keyring is closed")
        scan = (_scanKeys, self._gpgBinary, armoredKey, self._gpgHome, True)
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
        if str(address) not in map(_uidEmail, uids):
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
        existing = self._lookupPin(address)
        if existing is not None and existing != fpr:
            return KeyMismatch(existing)
        result = self._gpg.import_keys(exported)
        if result.returncode != 0 or fpr not in map(str.upper, result.fingerprints):
            raise BadKey(f"gpg did not import {fpr}")
        with self._db() as db, db:
            db.execute(_UPSERT, (str(address), fpr, now, now))
        self._pins[str(address)] = fpr
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
            return _armor(openpgp.sign(data, self._secret), "PGP SIGNATURE")
        result = self._gpg.sign(
            data, keyid=self.fingerprint, detach=True, clearsign=False
        )
        if result.returncode != 0 or "SIG_CREATED" not in dict(_status(result.stderr)):
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
        expected = self._lookupPin(address)
        if expected is None:
            raise BadSignature(f"no key is pinned for {address}")
        key = self._publicKeyOf(expected)
        if key is not None:
            if openpgp.verify(data, signature, key).upper() != expected:
                raise BadSignature(f"not a good signature by {address}")
            self._seen([address])
            return expected
        fd, sigPath = tempfile.mkstemp(prefix=".sig-", dir=self._home)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(signature)
            result = self._gpg.verify_data(sigPath, data)
        finally:
            os.remove(sigPath)
        if result.returncode != 0 or not _signedBy(_status(result.stderr), expected):
            raise BadSignature(f"not a good signature by {address}")
        self._seen([address])
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
        return self._shared(
            self._encryptBlocking, data, None, recipients, sign, compress, toSelf
        )

    def encryptFile(self, inPath, outPath, recipients, sign=False, compress=True, toSelf=True):
        """
        Like L{encrypt}, streaming from C{inPath} to C{outPath}, which
        appears whole or not at all.

        @return: a Deferred firing with the message's session key (which
            decrypts it without a secret key), or L{None} when gpg made it.
        """
        args = (inPath, outPath, recipients, sign, compress, toSelf)
        return self._shared(self._encryptBlocking, *args)

    def whileShared(self, f, *args) -> Deferred:
        """
        Run C{f(*args)} in the keyring's threads while no keyring write
        runs: for work that calls L{encryptInto} several times in one
        thread call.

        @return: a Deferred firing with what C{f} returns.
        """
        return self._shared(f, *args)

    def encryptInto(self, source, out, recipients, compress=True, toSelf=True):
        """
        Like L{encryptFile}, blocking, into C{out}: only inside
        L{whileShared}.

        @param source: L{bytes}, a file's path or a binary stream, read to
            its end.
        @param out: anything with C{write} and C{writelines}.
        @return: the message's session key, or L{None} when gpg made it.
        @raise UnknownKey: when a recipient is not pinned.
        """
        if isinstance(recipients, (str, Address)):
            recipients = [recipients]
        level = 6 if compress is True else int(compress or 0)
        keys = self._recipientKeys(self._recipientFingerprints(recipients, toSelf))
        with _source(source) as stream:
            if keys is None:
                out.write(self._encryptBlocking(stream, None, recipients, False, level, toSelf))
                return None
            self._seen(recipients)
            return openpgp.encrypt(stream, out, keys, compress=level)

    def _encryptBlocking(self, source, outPath, recipients, sign, compress, toSelf=True):
        if isinstance(recipients, (str, Address)):
            recipients = [recipients]
        level = 6 if compress is True else int(compress or 0)
        fingerprints = self._recipientFingerprints(recipients, toSelf)
        keys = None if sign else self._recipientKeys(fingerprints)
        if keys is not None:
            self._seen(recipients)
            with _source(source) as stream:
                if outPath is None:
                    out = io.BytesIO()
                    openpgp.encrypt(stream, out, keys, compress=level)
                    return out.getvalue()
                with _output(outPath) as tmp, open(tmp, "wb") as out:
                    sessionKey = openpgp.encrypt(stream, out, keys, compress=level)
                return sessionKey
        self._seen(recipients)
        extra = [] if level else ["--compress-algo", "none"]
        signer = self.fingerprint if sign else None
        with _source(source) as stream, _output(outPath) as tmp:
            options = {
                "sign": signer,
                "armor": False,
                "output": tmp,
                "extra_args": extra,
            }
            result = self._gpg.encrypt_file(stream, fingerprints, **options)
            done = {"END_ENCRYPTION", "SIG_CREATED"} if sign else {"END_ENCRYPTION"}
            if (
                result.returncode != 0
                or not done <= dict(_status(result.stderr)).keys()
            ):
                raise CryptoError(f"encryption failed: {result.status}")
        return result.data if outPath is None else None

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
        return Deferred.fromCoroutine(self._decrypt(data, None, maxOutput, sender))

    def decryptFile(self, inPath: str, outPath: str, maxOutput: int, sender=None, sessionKey=None):
        """
        Like L{decrypt}, streaming from C{inPath} to a temporary file beside
        C{outPath}, renamed to C{outPath} once accepted; after a failure
        there is no C{outPath}.

        @param sessionKey: the message's session key, if known: then no
            secret key is needed.
        @return: a Deferred firing with L{None}.
        """
        return Deferred.fromCoroutine(self._decrypt(inPath, outPath, maxOutput, sender, sessionKey))

    async def _decrypt(self, source, outPath, maxOutput, sender, sessionKey=None):
        if sender is None and (sessionKey or self._secret is not None):
            try:
                return await self._shared(self._decryptInProcess, source, outPath, maxOutput, sessionKey)
            except DecryptionFailed as e:
                self.log.info("refused a message: {reason}", reason=str(e))
                raise
        args = (source, outPath, maxOutput, sender)
        try:
            data, retried = await self._call(False, self._decryptBlocking, *args)
        except (DecryptionFailed, BadSignature) as e:
            self.log.info("refused a message: {reason}", reason=str(e))
            raise
        if retried is not None:
            self.log.info(
                "decrypted on the second try, after: {reason}", reason=retried
            )
        return data

    def decryptInto(self, source, out, maxOutput: int, sessionKey=None) -> None:
        """
        Like L{decryptFile} without C{sender}, blocking, into C{out}: only
        inside L{whileShared}.  Plaintext is written before the message is
        known to be good: after a failure, discard what C{out} got.

        @param source: L{bytes}, a file's path or a binary stream.
        @param out: anything with C{write}.
        @raise DecryptionFailed: as L{decrypt} does.
        """
        maxOutput = max(0, int(maxOutput))
        if not (sessionKey or self._secret is not None):
            data, _ = self._decryptBlocking(source, None, maxOutput, None)
            out.write(data)
            return
        keys = {"sessionKey": sessionKey} if sessionKey else {"secretKey": self._secret}
        with _source(source) as stream:
            openpgp.decrypt(stream, out, maxOutput=maxOutput, **keys)

    def _decryptInProcess(self, source, outPath, maxOutput, sessionKey):
        if outPath is None:
            out = io.BytesIO()
            self.decryptInto(source, out, maxOutput, sessionKey)
            return out.getvalue()
        with _output(outPath) as tmp, open(tmp, "wb") as out:
            self.decryptInto(source, out, maxOutput, sessionKey)
        return None

    def _decryptBlocking(self, source, outPath, maxOutput, sender):
        expected = None
        if sender is not None:
            expected = self._lookupPin(sender)
            if expected is None:
                raise BadSignature(f"no key is pinned for {sender}")
        maxOutput = max(0, int(maxOutput))
        # gpg takes --max-output 0 as no limit; _judge counts the bytes too.
        args = ["--max-output", str(max(1, maxOutput))]
        args += ["--skip-verify"] if sender is None else []
        retried = None
        with _output(outPath) as tmp:
            for attempt in (1, 2):
                with _source(source) as stream:
                    try:
                        result = self._gpg.decrypt_file(
                            stream, output=tmp, extra_args=args
                        )
                    except Exception as e:  # noqa: BLE001 (a broken pipe, ...)
                        raise DecryptionFailed(type(e).__name__) from None
                size = len(result.data) if tmp is None else os.path.getsize(tmp)
                problem = _judge(result, expected, size, maxOutput)
                if problem is None:
                    return (result.data if tmp is None else None), retried
                error, transient = problem
                if not transient or attempt == 2:
                    raise error
                retried = str(error)

    def __repr__(self) -> str:
        return f"<Keyring {self.address} {self.fingerprint} in {self._home}>"


def _judge(result, expected: str | None, size: int, maxOutput: int):
    """
    The acceptance rules of L{Keyring.decrypt}.  gpg prints plaintext before
    it knows the message is bad, and python-gnupg reports a message without
    MDC as failed, but one cut short by C{--max-output} as C{ok}.

    @return: L{None} if C{result} is acceptable, else C{(error, transient)}.
    """
    stderr = result.stderr or ""
    status = _status(stderr)
    keywords = {keyword for keyword, _ in status}
    # DECRYPTION_INFO <mdc_method> <sym_algo> [<aead_algo>]: 0, 0 is no MDC.
    info = [v.split() + ["0"] * 3 for k, v in status if k == "DECRYPTION_INFO"]
    protected = bool(info) and all(i[0] != "0" or i[2] != "0" for i in info)
    failed = keywords & {"DECRYPTION_FAILED", "BADMDC"} or not protected
    if failed or "DECRYPTION_OKAY" not in keywords or "not integrity" in stderr:
        transient = "BEGIN_DECRYPTION" not in keywords and bool(
            keywords & {"NO_SECKEY", "DECRYPTION_FAILED"}
        )
        return DecryptionFailed("no integrity-protected message for us"), transient
    if "exceeded --max-output" in stderr or size > maxOutput:
        return DecryptionFailed(f"plaintext larger than {maxOutput} bytes"), False
    if expected is not None and not _signedBy(status, expected):
        return BadSignature(f"no good signature by {expected}"), False
    if result.returncode != 0 or not result.ok:
        return DecryptionFailed(f"gpg exited with {result.returncode}"), False
    return None


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _armor(data: bytes, kind: str) -> bytes:
    """ASCII armour (RFC 4880, section 6), as gpg writes it."""
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    checksum = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode("ascii")
    text = "\n".join([f"-----BEGIN {kind}-----", "", *lines, "=" + checksum, f"-----END {kind}-----", ""])
    return text.encode("ascii")


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


@contextmanager
def _output(outPath):
    """
    Yield a temporary path (0600) beside C{outPath}, renamed to C{outPath}
    if the block succeeds; on failure both are removed.  Without
    C{outPath}, yield L{None}: the output stays in memory.
    """
    if outPath is None:
        yield None
        return
    folder = os.path.dirname(os.path.abspath(outPath))
    fd, tmp = tempfile.mkstemp(prefix=".p2pmta-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, outPath)
    except BaseException:
        for path in (tmp, outPath):
            with suppress(FileNotFoundError):
                os.remove(path)
        raise
