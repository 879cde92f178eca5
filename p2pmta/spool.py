# -*- test-case-name: tests.test_smtp -*-
"""
The spool files the SMTP server writes messages into.

Each message arrives in a file of its own in the spool, named with
L{TEMP_PREFIX}: made when its DATA command comes, or ahead of time in a
thread (L{SpoolAhead}).  Before the message is accepted the file is put
on disk with L{flushAndClose}, its envelope with it (L{Envelope}, in an
extended attribute, where the file system keeps them); a refused one is
closed with L{closeQuietly} and removed.
"""

from __future__ import annotations

import concurrent.futures
import errno
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pmta.fileutil import CHUNK_SIZE, UncachedAppender, fsyncDir, removeIfThere

#: The name prefix of a message file the SMTP server writes in the spool.
#: Once accepted, the file stays there under its name: the ledger tells
#: the accepted ones from those a crash cut short.
TEMP_PREFIX = ".smtp-"

#: The errors of a write that mean the spool's file system is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def openSpoolFile(directory: str):
    """
    Create the file a message arrives in.

    @return: the file, open for writing (an L{UncachedAppender}: see
        L{openedForMessage}), and its path.
    """
    fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    return openedForMessage(fd), path


def openedForMessage(fd: int) -> UncachedAppender:
    """
    The spool file C{fd} (new, empty), as the SMTP server writes a message
    into it: past the page cache, each full block by the spool's writer
    thread (L{blockWriter}) while the server reads on; a message smaller
    than a block goes through the cache at the flush (see
    L{UncachedAppender}).  Nothing reads the file back soon but the sealing
    process, which reads it the same way (L{p2pmta.sealing.sealSpooled}).
    On a virtual machine that gives freed memory back to its host, filling
    fresh pages of the page cache with a 1 MB message cost the server's
    reactor thread 4-5 ms of kernel time, which its 250 waited for
    (benchmarks/README.md).
    """
    return UncachedAppender(fd, writer=blockWriter())


_blockWriter: concurrent.futures.ThreadPoolExecutor | None = None


def blockWriter() -> concurrent.futures.ThreadPoolExecutor:
    """
    The one thread that writes the blocks of spool files past the page
    cache: each write waits for the disk (a quarter of a millisecond for a
    block here), which the reactor need not.  One thread keeps a file's
    blocks in order, and the disk's writes one at a time.
    """
    global _blockWriter
    if _blockWriter is None:
        _blockWriter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="p2pmta-spool")
    return _blockWriter


def _makeSpoolFiles(directory: str, count: int) -> list[str]:
    """
    Create C{count} empty spool files and put their names on disk
    (blocking).

    @return: their paths.
    """
    paths = []
    try:
        for _ in range(count):
            f, path = openSpoolFile(directory)
            f.close()
            paths.append(path)
        fsyncDir(directory)
    except BaseException:
        for path in paths:
            removeIfThere(path)
        raise
    return paths


class SpoolAhead:
    """
    Empty spool files made ahead of time, in a thread, their names already
    on disk: a DATA command then does not wait while the file system finds
    an inode (on ext4 without a journal that takes longer the more files
    were deleted lately), and its 250 waits for no folder flush.  A file
    not taken is removed when the server stops, or at the next start after
    a crash (the ledger does not name it).
    """

    log = Logger()

    def __init__(self, directory: str, runBlocking, count: int) -> None:
        self._directory = directory
        self._runBlocking = runBlocking
        self._count = count
        self._ready: list[str] = []
        self._making = False
        self._stopped = False

    def take(self):
        """
        @return: a file open for writing, its path, and whether its name
            is on disk already.
        """
        self._refill()
        while self._ready:
            path = self._ready.pop()
            try:
                fd = os.open(path, os.O_WRONLY)  # not O_CREAT: its name is on disk
            except OSError:
                continue
            return openedForMessage(fd), path, True
        return (*openSpoolFile(self._directory), False)

    def _refill(self) -> None:
        if self._making or self._stopped or len(self._ready) > self._count // 2:
            return
        self._making = True

        def made(paths: list) -> None:
            self._ready.extend(paths)
            if self._stopped:
                self.discard()

        def failed(failure: Failure) -> None:
            # A full disk, say: files are made as messages come meanwhile.
            self.log.info("cannot make spool files ahead: {why}", why=failure.getErrorMessage())

        def done(_) -> None:
            self._making = False

        d = self._runBlocking(_makeSpoolFiles, self._directory, self._count - len(self._ready))
        d.addCallbacks(made, failed).addBoth(done)

    def discard(self) -> None:
        """
        Remove the files not taken, and make no more (blocking: when the
        server stops).
        """
        self._stopped = True
        ready, self._ready = self._ready, []
        for path in ready:
            removeIfThere(path)


#: The extended attribute of a spool file that holds its L{Envelope}.
ENVELOPE_ATTRIBUTE = "user.p2pmta"

#: The name of a message's own spool file (not one of the links to it the
#: sending pipeline makes in the spool: C{<name>.Sent}, C{<name>.Outbox}).
_MESSAGE_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[A-Za-z0-9_]+\Z")


@dataclass(frozen=True)
class Envelope:
    """
    Who a spooled message is from and for, kept with its file, so that the
    one flush of the file before the 250 keeps the whole message: should a
    power cut take the ledger's record (committed, not flushed), the next
    start makes it again from the file (L{findUnrecorded}).

    @ivar sender: The envelope sender (C{MAIL FROM}).
    @ivar recipients: The accepted recipients (C{RCPT TO}).
    @ivar created: When the message was taken (POSIX time).
    @ivar size: The file's size, to tell it whole.
    @ivar crc: The file's CRC-32, to tell it whole.
    """

    sender: str
    recipients: tuple
    created: float
    size: int
    crc: int

    def encode(self) -> bytes:
        """
        The envelope in a few bytes: a version byte, the time, size and
        CRC-32, then the addresses, one per line.  Short, so that the file
        system keeps it in the file's inode, not in a block of its own
        (each block more is one more to write in the flush).
        """
        return (
            _ENVELOPE_VERSION
            + _ENVELOPE_NUMBERS.pack(self.created, self.size, self.crc)
            + "\n".join((self.sender, *self.recipients)).encode("utf-8")
        )

    @classmethod
    def decode(cls, data: bytes) -> "Envelope | None":
        """@return: the envelope in C{data}, or L{None} if it is not one."""
        head = len(_ENVELOPE_VERSION) + _ENVELOPE_NUMBERS.size
        if not data.startswith(_ENVELOPE_VERSION) or len(data) < head:
            return None
        created, size, crc = _ENVELOPE_NUMBERS.unpack_from(data, len(_ENVELOPE_VERSION))
        try:
            sender, *recipients = data[head:].decode("utf-8").split("\n")
        except UnicodeDecodeError:
            return None
        if not recipients or not all(recipients) or not math.isfinite(created):
            return None
        return cls(sender, tuple(recipients), created, size, crc)


#: The first byte of an encoded L{Envelope}: its format's version.
_ENVELOPE_VERSION = b"\x01"

#: An L{Envelope}'s time, size and CRC-32, as encoded.
_ENVELOPE_NUMBERS = struct.Struct("<dQI")


def keepsEnvelopes(directory: str) -> bool:
    """
    Whether the file system of C{directory} keeps a spool file's
    L{Envelope} (user extended attributes; blocking).
    """
    try:
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=directory)
    except OSError:
        return False
    try:
        os.setxattr(fd, ENVELOPE_ATTRIBUTE, b"{}")
        return os.getxattr(fd, ENVELOPE_ATTRIBUTE) == b"{}"
    except (OSError, AttributeError):  # AttributeError: not Linux
        return False
    finally:
        os.close(fd)
        removeIfThere(path)


def flushAndClose(f, directory: str | None, envelope: Envelope | None = None) -> bool:
    """
    Put the message file, its C{envelope} if given, and its name in
    C{directory} if given, on disk.

    @return: whether the envelope is on disk with the file (not if the
        file system refuses it: a file system without extended attributes,
        or a very long list of recipients).
    """
    kept = False
    try:
        f.flush()
        if envelope is not None:
            try:
                os.setxattr(f.fileno(), ENVELOPE_ATTRIBUTE, envelope.encode())
                kept = True
            except (OSError, AttributeError):
                pass
        os.fsync(f.fileno())
    finally:
        f.close()
    if directory is not None:
        fsyncDir(directory)
    return kept


def sizeAndCrc(path: str) -> tuple[int, int]:
    """
    The size and CRC-32 of the spool file C{path}, to tell it whole after
    a crash (blocking).

    @raise OSError: if it cannot be read (L{FileNotFoundError}: it is gone).
    """
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _wholeEnvelope(path: str) -> Envelope | None:
    """The envelope of the message file C{path}, if the file is whole."""
    try:
        envelope = Envelope.decode(os.getxattr(path, ENVELOPE_ATTRIBUTE))
        if envelope is None or sizeAndCrc(path) != (envelope.size, envelope.crc):
            return None
    except (OSError, AttributeError):
        return None
    return envelope


def findUnrecorded(directory: str, recorded) -> list[tuple[str, Envelope]]:
    """
    The messages in the spool that no ledger record names but that were
    accepted: their files whole, with their envelopes (blocking; at start).

    @param recorded: the paths the ledger names, whatever their state.
    @return: C{(path, envelope)} pairs, oldest first.
    """
    recorded = {os.path.abspath(path) for path in recorded}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.abspath(os.path.join(directory, name))
        if _MESSAGE_NAME.match(name) and path not in recorded:
            envelope = _wholeEnvelope(path)
            if envelope is not None:
                found.append((path, envelope))
    found.sort(key=lambda item: item[1].created)
    return found


def closeQuietly(f) -> None:
    """
    Close a file whose content is thrown away: a buffered write that fails
    again (a full disk) does not matter.
    """
    try:
        f.close()
    except OSError:
        pass
