# -*- test-case-name: tests.test_gpg,tests.test_crypto -*-
"""
Running GnuPG: the options and environment of every gpg run, the parameters
of the keys p2pmta has gpg make, and reading what gpg says: its status
lines, its user ids, a decryption's verdict (L{judgeDecryption}).  Keys from
elsewhere are read in a throwaway home (L{scanKeys}, L{fingerprintOf}), so
nothing reaches a real keyring before it is checked; L{stopAgent} stops a
home's gpg-agent.  Everything else goes through python-gnupg, in
L{p2pmta.crypto.Keyring}.

What runs gpg blocks: L{p2pmta.crypto.Keyring} calls it from its threads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from p2pmta.errors import BadSignature, DecryptionFailed

KEY_PARAMETERS = """\
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
GPG_OPTIONS = ["--trust-model", "always", "--no-auto-key-retrieve", "--no-greeting"]
_SIGNATURE_PROBLEMS = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}


def environment() -> dict:
    """The environment for gpg: English messages, whatever the locale."""
    return dict(os.environ, LC_ALL="C", LANGUAGE="C")


def statusLines(stderr: str | None) -> list[tuple[str, str]]:
    """The C{[GNUPG:]} status lines of a gpg run, as (keyword, value)."""
    lines = [
        line[9:] for line in (stderr or "").splitlines() if line[:9] == "[GNUPG:] "
    ]
    return [(line.partition(" ")[0], line.partition(" ")[2].strip()) for line in lines]


def uidEmail(uid: str) -> str | None:
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


def signedBy(status, fingerprint: str) -> bool:
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


def scanKeys(gpgBinary: str, data: bytes, parent=None, export: bool = False):
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
    run = {"capture_output": True, "env": environment(), "timeout": 120, "check": False}
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
        for keyword, value in statusLines(imported.stderr.decode("latin-1")):
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
    return [(fpr, uids) for fpr, uids, _, _ in scanKeys(gpgBinary, armoredKey)[0]]


def stopAgent(gpgBinary: str, home: str) -> str | None:
    """
    Stop the gpg-agent of the GnuPG home C{home} with the C{gpgconf} beside
    C{gpgBinary}, or else the one on the C{PATH}.  Blocking.

    @return: L{None}, or why C{gpgconf} could not be run.
    """
    gpg = shutil.which(gpgBinary)
    gpgconf = os.path.join(os.path.dirname(gpg), "gpgconf") if gpg else ""
    args = ["--homedir", home, "--kill", "gpg-agent"]
    error = None
    try:
        gpgconf = gpgconf if os.path.exists(gpgconf) else "gpgconf"
        subprocess.run([gpgconf, *args], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        error = str(e)
    return error


def judgeDecryption(result, expected: str | None, size: int, maxOutput: int):
    """
    The acceptance rules of L{p2pmta.crypto.Keyring.decrypt}.  gpg prints
    plaintext before it knows the message is bad, and python-gnupg reports a
    message without MDC as failed, but one cut short by C{--max-output} as
    C{ok}.

    @return: L{None} if C{result} is acceptable, else C{(error, transient)}.
    """
    stderr = result.stderr or ""
    status = statusLines(stderr)
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
    if expected is not None and not signedBy(status, expected):
        return BadSignature(f"no good signature by {expected}"), False
    if result.returncode != 0 or not result.ok:
        return DecryptionFailed(f"gpg exited with {result.returncode}"), False
    return None
