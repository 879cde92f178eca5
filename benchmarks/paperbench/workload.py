"""
The paper's workload (section 5): N messages from the sender to the
receiver, each with an empty body and one attachment (plain text or random
binary data), submitted over one SMTP connection and read over IMAP.

The IMAP client behaves like the paper's receiver: it polls the INBOX's
message count (C{NOOP}, reading the C{EXISTS} the server sends, as mail
clients do) until all N are listed, then
fetches the bodies it accepts with C{UID FETCH <set> (BODY[])} in chunks,
and deletes the rest unread (C{UID STORE <set> +FLAGS.SILENT (\\Deleted)},
C{EXPUNGE}).
"""

from __future__ import annotations

import base64
import email
import imaplib
import os
import random
import re
import smtplib
import threading
import time
from dataclasses import dataclass, field

SIZES = {"1k": 1024, "10k": 10 * 1024, "100k": 100 * 1024, "1m": 1024 * 1024}
KINDS = ("text", "binary")

_SUBJECT = re.compile(rb"^Subject: (p2b-\S+)\r?$", re.MULTILINE | re.IGNORECASE)


# The messages

_corpus: bytes | None = None


def _textCorpus() -> bytes:
    """
    Some 4 MB of English-like text: words of a fixed 2,000-word vocabulary
    drawn with Zipf-like frequencies, in lines of at most 72 characters.
    It compresses about as well as prose, which is what matters to gpg.
    """
    global _corpus
    if _corpus is None:
        rng = random.Random(5)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        weights = [26 - i for i in range(26)]
        vocabulary = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(2000)]
        zipf = [1 / (rank + 1) for rank in range(len(vocabulary))]
        lines, line = [], []
        for word in rng.choices(vocabulary, zipf, k=700_000):
            if sum(map(len, line)) + len(line) + len(word) > 72:
                lines.append(" ".join(line))
                line = []
            line.append(word)
        _corpus = ("\n".join(lines) + "\n").encode()
    return _corpus


def attachment(size: int, kind: str, rng: random.Random) -> bytes:
    """C{size} bytes of random binary data, or of text (lines, ending in a newline)."""
    if kind == "binary":
        return rng.randbytes(size)
    corpus = _textCorpus()
    start = corpus.index(b"\n", rng.randrange(len(corpus) - size - 200)) + 1
    return corpus[start : start + size - 1] + b"\n"


@dataclass
class Message:
    subject: str
    data: bytes  # as submitted, CRLF line ends
    payload: bytes  # the attachment's bytes
    encoded: bytes  # the attachment as it appears in C{data}
    kind: str


def makeMessage(sender: str, recipient: str, subject: str, payload: bytes, kind: str) -> Message:
    """
    A MIME message with an empty body and one attachment, built by hand
    (the email package takes ~50 ms to write out a 1 MB attachment).
    """
    boundary = "p2b-" + os.urandom(12).hex()
    if kind == "binary":
        encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        partHeaders = (b"Content-Type: application/octet-stream\r\n"
                       b"Content-Transfer-Encoding: base64\r\n"
                       b'Content-Disposition: attachment; filename="data.bin"\r\n')
    else:
        encoded = payload.replace(b"\n", b"\r\n")
        partHeaders = (b'Content-Type: text/plain; charset="us-ascii"\r\n'
                       b"Content-Transfer-Encoding: 7bit\r\n"
                       b'Content-Disposition: attachment; filename="data.txt"\r\n')
    headers = (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <{subject}@p2b.bench>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    ).encode()
    data = (headers + f"--{boundary}\r\n".encode() + partHeaders + b"\r\n" + encoded
            + f"\r\n--{boundary}--\r\n".encode())
    return Message(subject, data, payload, encoded, kind)


def makeMessages(sender, recipient, tag: str, n: int, size: int, kind: str, seed: int) -> list[Message]:
    rng = random.Random(seed)
    return [makeMessage(sender, recipient, f"p2b-{tag}-{i}", attachment(size, kind, rng), kind) for i in range(n)]


def matches(message: Message, fetched: bytes) -> bool:
    """
    Whether C{fetched} carries C{message}'s attachment unchanged: its
    encoded form as sent (the quick check), or else its decoded bytes after
    parsing (line ends normalised for text, which servers may store as LF).
    """
    if message.encoded in fetched:
        return True
    parsed = email.message_from_bytes(fetched)
    for part in parsed.walk():
        if part.get_filename():
            got = part.get_payload(decode=True) or b""
            if message.kind == "text":
                return got.replace(b"\r\n", b"\n").rstrip(b"\n") == message.payload.rstrip(b"\n")
            return got == message.payload
    return False


def subjectOf(fetched: bytes) -> str | None:
    head = fetched.split(b"\r\n\r\n", 1)[0]
    match = _SUBJECT.search(head)
    return match.group(1).decode() if match else None


# SMTP


class Sender(threading.Thread):
    """
    Submits messages over one SMTP connection (AUTH when C{auth}), in a
    thread.  The connection and login happen before L{go}, outside the
    timing; C{started} is the time of the first submission, C{replies}
    the time of each 250.
    """

    def __init__(self, host: str, port: int, auth, mailFrom: str, rcptTo: str, messages: list[Message]) -> None:
        super().__init__(name="smtp-sender", daemon=True)
        self.messages = messages
        self.mailFrom, self.rcptTo = mailFrom, rcptTo
        self.client = smtplib.SMTP(host, port, timeout=300)
        self.client.ehlo("p2b.bench")
        if auth is not None:
            self.client.login(*auth)
        self.started: float | None = None
        self.replies: list[float] = []
        self.error: BaseException | None = None

    def go(self) -> float:
        self.started = time.perf_counter()
        self.start()
        return self.started

    def run(self) -> None:
        try:
            for message in self.messages:
                self.client.sendmail(self.mailFrom, [self.rcptTo], message.data)
                self.replies.append(time.perf_counter())
            self.client.quit()
        except BaseException as e:  # reported by the main thread
            self.error = e
            try:
                self.client.close()
            except Exception:
                pass


# IMAP


def messageSet(uids: list[int]) -> str:
    """C{[1, 2, 3, 7]} -> C{"1:3,7"}."""
    parts, run = [], []
    for uid in sorted(uids):
        if run and uid == run[-1] + 1:
            run.append(uid)
        else:
            if run:
                parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [uid]
    if run:
        parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


class Reader:
    """A logged-in IMAP client on the receiver's INBOX."""

    def __init__(self, host: str, port: int, auth) -> None:
        self.client = imaplib.IMAP4(host, port, timeout=300)
        self.client.login(*auth)
        self._exists = 0
        self._select()

    @staticmethod
    def _ok(response):
        typ, data = response
        if typ != "OK":
            raise RuntimeError(f"IMAP: {typ} {data!r}")
        return data

    def _select(self) -> None:
        self._exists = int(self._ok(self.client.select("INBOX"))[0])

    def count(self) -> int:
        """
        The INBOX's message count, as a mail client keeps it: NOOP, and
        read the server's EXISTS.  (STATUS on the selected mailbox is not
        meant for this: Dovecot answers it from the session's old view.)
        """
        self._ok(self.client.noop())
        exists = self.client.untagged_responses.pop("EXISTS", None)
        expunged = self.client.untagged_responses.pop("EXPUNGE", None)
        if exists:
            self._exists = int(exists[-1])
        elif expunged:
            self._exists -= len(expunged)
        return self._exists

    def uids(self) -> list[int]:
        self._select()  # a fresh view of the mailbox
        data = self._ok(self.client.uid("SEARCH", None, "ALL"))
        return sorted(int(u) for u in (data[0] or b"").split())

    def fetch(self, uids: list[int], chunk: int) -> list[bytes]:
        """The full bodies of C{uids}, C{chunk} messages per command."""
        bodies = []
        for i in range(0, len(uids), chunk):
            data = self._ok(self.client.uid("FETCH", messageSet(uids[i : i + chunk]), "(BODY[])"))
            bodies.extend(item[1] for item in data if isinstance(item, tuple) and b"BODY[]" in item[0])
        return bodies

    def delete(self, uids: list[int]) -> None:
        if uids:
            self._ok(self.client.uid("STORE", messageSet(uids), "+FLAGS.SILENT", r"(\Deleted)"))
            self._ok(self.client.expunge())

    def waitForCount(self, want: int, timeout: float, poll: float, check=lambda: None):
        """
        Poll the message count until it reaches C{want}.

        @return: (time the first message was listed, time all were).
        """
        first = None
        deadline = time.perf_counter() + timeout
        while True:
            count = self.count()
            now = time.perf_counter()
            if count and first is None:
                first = now
            if count >= want:
                return first, now
            check()
            if now > deadline:
                raise RuntimeError(f"only {count} of {want} messages listed after {timeout:.0f}s")
            time.sleep(poll)

    def close(self) -> None:
        try:
            self.client.logout()
        except Exception:
            pass


# Quiet


def settle(snapshot, quiet: float, limit: float) -> float:
    """
    Wait until C{snapshot()} stops changing for C{quiet} seconds (at most
    C{limit} seconds).

    @return: the seconds waited.
    """
    start = last = time.perf_counter()
    seen = snapshot()
    while True:
        time.sleep(0.1)
        now = time.perf_counter()
        value = snapshot()
        if value != seen:
            seen, last = value, now
        if now - last >= quiet or now - start >= limit:
            return now - start


@dataclass
class Spec:
    """One run: C{n} messages of C{size} bytes of C{kind}; the client accepts a fraction C{accept}."""

    phase: str
    n: int
    size: str
    kind: str
    accept: float = 1.0
    run: int = 0
    extra: dict = field(default_factory=dict)
