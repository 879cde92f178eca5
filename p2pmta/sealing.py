# -*- test-case-name: tests.test_sealing -*-
"""
Sealing: encrypting spooled messages into the outbox (the sending
pipeline's step 2), in processes of their own.

In the peer's own process, that work shared Python's global lock with
the SMTP sessions: each of its many short file operations handed the
lock back and forth with the reactor, and 1000 messages of 10 KB took
about a second longer to submit than with no sealing running at all.
Done by a stand-in in a process of its own, the same work did not slow
the sessions down.  So the peer keeps L{p2pmta.sealers.Sealers}: a child
process (C{python -m p2pmta.sealing}), started when first needed, that
seals a batch of messages at a time.  Where none can run, the pipeline
seals in its threads, as before.

A child reads requests on its standard input and answers each in turn on
its standard output, each a 4-byte big-endian length and a JSON object.
It writes only into the outbox: the peer records what it made.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import io
import json
import os
import signal
import struct
import sys
import threading
import zlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from p2pmta import allocator, openpgp
from p2pmta.errors import SealingFailed
from p2pmta.fileutil import AtomicFile, fsyncDir, moveSpareInto, readUncached, removeIfThere, writeByDigest
from p2pmta.notification import attachmentsOf

# Compression, chosen by content.

#: Content types that are already compressed: looking for repeats in them
#: only costs time (their base64 is still coded byte by byte, see
#: L{HUFFMAN_ONLY}).
_COMPRESSED_TYPES = (b"image/jpeg", b"image/png", b"application/zip", b"application/gzip", b"video/", b"audio/")

#: Up to this size, a message that shrinks by its repeats is compressed
#: hard (level 6); a larger one at level 4 up to L{_SMALL_MESSAGE} (text of
#: 100 KB: 1.5 ms for 0.346 of its size, against 3.2 ms for 0.333 at level
#: 6, which the one sealing process could not keep up with), and fast
#: beyond it.  A message that does not shrink so is coded byte by byte up
#: to L{_SMALL_MESSAGE}, and not compressed at all beyond it.
_HARD_MESSAGE = 32 * 1024
_SMALL_MESSAGE = 256 * 1024

#: Messages up to this size are compressed hard without a look first (the
#: look would cost as much as it saves).
_TINY_MESSAGE = 4 * 1024

#: A larger one is compressed by its repeats only if a sample of it shrinks
#: below this at level 1: text shrinks to 0.4-0.55 even in a sample of
#: 1 KiB, base64 of random bytes only to 0.76-0.79.  The sample is a
#: quarter of the message, at most 16 KiB, which tells as well as 64 (0.764
#: against 0.771 for base64) at a twelfth of the cost (0.13 ms).  For a
#: 10 KB attachment in base64, the look and the byte-by-byte coding take
#: 0.13 ms, level 6 alone 0.22 ms.
_WORTH_COMPRESSING = 0.7
_SAMPLE = 16 * 1024

#: How content that does not shrink by its repeats (base64 of binary) is
#: compressed: each byte coded by its frequency, no repeats looked for.
#: Base64 shrinks to 0.76 as with level 6, at a fifth of the cost (0.76 ms
#: per 100 KB, against 3.8).
HUFFMAN_ONLY = (1, zlib.Z_HUFFMAN_ONLY)


def compression(f, headers: bytes, size: int) -> tuple[int, int]:
    """
    The zlib level and strategy for the message read from C{f} (blocking):
    level 0 for a large message that would hardly shrink.
    """
    lowered = headers.lower()
    if not any(kind in lowered for kind in _COMPRESSED_TYPES):
        if size <= _TINY_MESSAGE:
            return 6, zlib.Z_DEFAULT_STRATEGY
        sampleSize = min(_SAMPLE, size // 4)
        f.seek(max(0, size // 2 - sampleSize // 2))
        sample = f.read(sampleSize)
        if len(zlib.compress(sample, 1)) < _WORTH_COMPRESSING * len(sample):
            level = 6 if size <= _HARD_MESSAGE else 4 if size <= _SMALL_MESSAGE else 1
            return level, zlib.Z_DEFAULT_STRATEGY
    # Compressed already, or does not shrink by its repeats.
    return HUFFMAN_ONLY if size <= _SMALL_MESSAGE else (0, zlib.Z_DEFAULT_STRATEGY)


def _readHeaders(f, limit: int) -> bytes:
    """The header section of the message read from C{f}, blank line included."""
    data = b""
    while len(data) < limit:
        chunk = f.read(64 * 1024)
        if not chunk:
            break
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end != -1:
            return data[: end + 4]
    return data + (b"\r\n" if data.endswith(b"\r\n") else b"\r\n\r\n")


#: Spooled messages up to this size are read whole, once, and then scanned
#: and encrypted in memory: a 1 MB attachment took two passes over its
#: file, the first joining blocks of a megabyte as it went.
WHOLE_MESSAGE = 4 * 1024 * 1024


def _readMessageFacts(f, size: int, limit: int, whole: bytes | None) -> tuple[bytes, list, tuple[int, int]]:
    """
    Header section, attachments and compression (zlib level and strategy)
    of the spooled message of C{size} bytes read from C{f} (blocking): from
    C{whole}, the message itself, if given; else in one pass over C{f}
    without holding it in memory.
    """
    headers = _readHeaders(f, limit)
    f.seek(0)
    # Our SMTP server refuses a CR or LF outside a CRLF: see attachmentsOf.
    attachments = attachmentsOf(f if whole is None else whole, crlf=True)
    return headers, attachments, compression(f, headers, size)


def sealSpooled(spool: str, limit: int, store, encrypt) -> tuple:
    """
    Encrypt the spooled message C{spool} into the outbox (blocking): read
    whole if it is at most L{WHOLE_MESSAGE}, else twice, a block at a time.

    @param limit: the largest header section read.
    @param store: C{store(produce)} stores what C{produce(out)} writes
        into C{out}, and returns its digest, its size and what C{produce}
        returned (see L{p2pmta.store.Outbox.storeWith}).
    @param encrypt: C{encrypt(f, out, level, strategy)} encrypts what it
        reads from C{f} into C{out}, compressed as told, and returns the
        session key (or L{None}).
    @return: the facts the ledger records: digest, ciphertext size, size,
        header section, attachments (JSON) and session key (or C{b""}).
    """
    with open(spool, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # From a block up, written past the page cache
        # (p2pmta.spool.openedForMessage), and read past it too: nothing
        # else reads it soon.
        whole = readUncached(f.fileno(), size) if size <= WHOLE_MESSAGE else None
        source = f if whole is None else io.BytesIO(whole)
        headers, attachments, (level, strategy) = _readMessageFacts(source, size, limit, whole)
        source.seek(0)
        digest, ciphertextSize, sessionKey = store(lambda out: encrypt(source, out, level, strategy))
    return (digest, ciphertextSize, size, headers, json.dumps(attachments), sessionKey or b"")


# What crosses between the peer and a child.


def keyFields(key: openpgp.PublicKey) -> dict:
    """The fields of C{key} that encrypting to it needs, for JSON."""
    return {
        "fingerprint": key.fingerprint,
        "signing": _b64(key.signingKey.public_bytes_raw()),
        "encryption": _b64(key.encryptionKey.public_bytes_raw()),
        "encryptionFingerprint": _b64(key.encryptionFingerprint),
        "kdfHash": key.kdfHash,
        "kdfCipher": key.kdfCipher,
    }


def keyFromFields(fields: dict) -> openpgp.PublicKey:
    """The key that L{keyFields} gave C{fields} of."""
    return openpgp.PublicKey(
        fingerprint=fields["fingerprint"],
        signingKey=Ed25519PublicKey.from_public_bytes(_unb64(fields["signing"])),
        encryptionKey=X25519PublicKey.from_public_bytes(_unb64(fields["encryption"])),
        encryptionFingerprint=_unb64(fields["encryptionFingerprint"]),
        kdfHash=fields["kdfHash"],
        kdfCipher=fields["kdfCipher"],
    )


def answerOf(facts: tuple) -> dict:
    """The facts of a sealed message (see L{sealSpooled}), for JSON."""
    digest, ciphertextSize, size, headers, attachments, sessionKey = facts
    return {
        "digest": digest,
        "ciphertextSize": ciphertextSize,
        "size": size,
        "headers": _b64(headers),
        "attachments": attachments,
        "sessionKey": _b64(sessionKey),
    }


def factsOf(answer: dict) -> tuple:
    """
    The facts that L{answerOf} gave C{answer} of.

    @raise SealingFailed: if it tells why the message was not sealed.
    """
    if "error" in answer:
        raise SealingFailed(answer["error"])
    return (
        answer["digest"],
        answer["ciphertextSize"],
        answer["size"],
        _unb64(answer["headers"]),
        answer["attachments"],
        _unb64(answer["sessionKey"]),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def frame(message: dict) -> bytes:
    """C{message} as it crosses: its length, then its JSON."""
    data = json.dumps(message).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def _readFrame(f) -> dict | None:
    """The next message read from C{f}, or L{None} at its end."""
    head = f.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    data = f.read(size)
    if len(data) < size:
        return None
    return json.loads(data)


# The child.


class _Claimed:
    """
    Spare files the peer claimed for a batch (see
    L{p2pmta.fileutil.SpareFiles.claim}), taken as L{AtomicFile} takes
    spares, by one lane at a time.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self._lock = threading.Lock()

    def take(self, directory: str) -> tuple[int, str] | None:
        while True:
            with self._lock:
                if not self.paths:
                    return None
                path = self.paths.pop()
            taken = moveSpareInto(path, directory)
            if taken is not None:
                return taken


def sealBatch(request: dict, keys: dict) -> dict:
    """
    Seal the messages of C{request} (blocking): each into a file of the
    outbox named by its digest (flushed by one of L{FLUSHERS} threads while
    the next message is sealed), then the outbox folder flushed once.  The
    request's C{lanes} (1 if it has none) says how many messages are sealed
    at once, each in a thread (see L{LANES}).

    @param keys: the recipients' L{openpgp.PublicKey}s, by the names the
        jobs give them.
    @return: the answer: for each job, its facts (see L{sealSpooled}) or
        the error that stopped it, or else one error for the whole batch,
        when the folder could not be flushed (its files are removed); and
        the spares not used.
    """
    outbox, mode, limit = request["outbox"], request["mode"], request["limit"]
    jobs = request["jobs"]
    spares = _Claimed(request.get("spares", []))
    commits: list = []  # (index of the job, path, pending commit)

    def seal(index: int) -> dict:
        job = jobs[index]

        def store(produce):
            # Each file is flushed in a thread of its own while the next
            # message is sealed: the flushes wait on the disk side by side.
            f, digest, size, result = writeByDigest(outbox, mode, spares, produce)
            path = os.path.join(outbox, digest)
            try:
                commits.append((index, path, _flushers().submit(_commit, f, path)))
            except BaseException:
                f.abort()
                raise
            return digest, size, result

        def encrypt(f, out, level, strategy):
            recipients = [keys[name] for name in job["keys"]]
            return openpgp.encrypt(f, out, recipients, compress=level, strategy=strategy)

        try:
            return answerOf(sealSpooled(job["spool"], limit, store, encrypt))
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}

    lanes = max(1, min(int(request.get("lanes", 1)), LANES, len(jobs)))
    if lanes == 1:
        results = [seal(index) for index in range(len(jobs))]
    else:
        # The lanes take the jobs in turn; answers keep the jobs' order.
        results = list(_lanes().map(seal, range(len(jobs))))
    for index, path, pending in commits:
        try:
            pending.result()
        except Exception as e:
            results[index] = {"error": f"{type(e).__name__}: {e}"}
        else:
            if "error" in results[index]:
                removeIfThere(path)  # stored, but its job failed after
    try:
        fsyncDir(outbox)
    except OSError as e:
        for result in results:
            if "digest" in result:
                removeIfThere(os.path.join(outbox, result["digest"]))
        return {"error": f"cannot flush the outbox: {e}", "unusedSpares": spares.paths}
    return {"results": results, "unusedSpares": spares.paths}


#: How many messages a sealing process seals at once, at most, each in a
#: thread of its own: what takes the time (AES, SHA-1, SHA-256, zlib,
#: the file's writes) lets go of the GIL.  The peer asks for more than one
#: only once no SMTP session is open (L{p2pmta.sending.Sender}), for the
#: messages that came in while a burst's last batch was sealed: while a
#: session runs, one sealing lane leaves the other core to it.  Forty 1 MB
#: messages alone took 5.4-6.2 ms each with two lanes, 8.0-9.1 ms with
#: one; through two raw peers (1000 x 1 MB, alternated thrice), the last
#: was listed 0.63-0.76 s after its 250 against 0.84-0.91 s in a peer's
#: first round, and 0.25-0.35 s against 0.26-0.50 s in its second, for
#: some 6 MB more in the sealing process (41 against 35 MB).
LANES = 2

#: How many files a sealing process flushes at once.
FLUSHERS = 4

_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(name: str, size: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's C{size} threads named C{p2pmta-<name>}, started when first needed."""
    pool = _pools.get(name)
    if pool is None:
        pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=f"p2pmta-{name}")
    return pool


def _lanes() -> concurrent.futures.ThreadPoolExecutor:
    return _pool("seal", LANES)


def _flushers() -> concurrent.futures.ThreadPoolExecutor:
    return _pool("flush", FLUSHERS)


def _commit(f: AtomicFile, path: str) -> None:
    """Flush C{f} and name it C{path} (blocking), or else remove it."""
    with f:
        f.commit(path, syncFolder=False)


#: The environment variable that gives a sealing process its peer's pid.
PARENT_PID = "P2PMTA_SEALING_PARENT"

#: prctl(2)'s option for a signal on the parent's death (Linux).
_PR_SET_PDEATHSIG = 1


def _dieWithParent() -> None:
    """
    Be killed the moment the peer that started this process dies (Linux).

    A peer that stops closes our input, and we end once the batch in hand
    is sealed.  A peer that is killed must not have us seal on: it may
    already be running again and clearing its outbox of what no record
    names (see L{p2pmta.sending.Sender.dropUnrecorded}), and a ciphertext
    committed after that would stay there, unrecorded, for good.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(PARENT_PID)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(0)  # it died before prctl took


#: How much lower than its peer's a sealing process's CPU priority is (its
#: niceness above the peer's).  Sealing is work that can wait; the SMTP
#: sessions, whose 250s a mail client waits for, cannot.  On two cores,
#: the one process sealing at the peer's priority took the CPU from the
#: session in the moments when both wanted it: 1000 messages of 1 MB were
#: submitted in 14.15-14.83 s against 14.96-15.18 s (raw peers, N = 1000,
#: alternated twice), and listed as soon after the last 250.
NICENESS = 10


def _yieldToSessions() -> None:
    """Lower this process's CPU priority (see L{NICENESS})."""
    try:
        os.nice(NICENESS)
    except OSError:
        pass  # not allowed here: seal at the peer's priority


def main() -> None:
    """
    Serve requests on standard input until it ends (the peer stopped or
    went away).
    """
    # Ctrl-C in a terminal reaches the whole process group: the peer
    # decides when this process ends, by closing its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _dieWithParent()
    _yieldToSessions()
    # A 1 MB message passes through buffers of its size, as in the peer.
    allocator.keepFreedMemory()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    keys: dict = {}
    while (request := _readFrame(requests)) is not None:
        for fpr, fields in request.get("keys", {}).items():
            keys[fpr] = keyFromFields(fields)
        answers.write(frame(sealBatch(request, keys)))
        answers.flush()


if __name__ == "__main__":
    main()
