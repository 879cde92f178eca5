# -*- test-case-name: tests.test_smtp -*-
"""
The spool files the SMTP server writes messages into.

Each message arrives in a file of its own in the spool, named with
L{TEMP_PREFIX}: made when its DATA command comes, or ahead of time in a
thread (L{SpoolAhead}).  Before the message is accepted the file is put
on disk with L{flushAndClose}; a refused one is closed with
L{closeQuietly} and removed.
"""

from __future__ import annotations

import errno
import os
import tempfile

from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pmta.fileutil import fsyncDir, removeIfThere

#: The name prefix of a message file the SMTP server writes in the spool.
#: Once accepted, the file stays there under its name: the ledger tells
#: the accepted ones from those a crash cut short.
TEMP_PREFIX = ".smtp-"

#: The errors of a write that mean the spool's file system is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def openSpoolFile(directory: str):
    """
    Create the file a message arrives in.

    @return: the file, open for writing, and its path.
    """
    fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    return os.fdopen(fd, "wb"), path


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
            return os.fdopen(fd, "wb"), path, True
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


def flushAndClose(f, directory: str | None) -> None:
    """Put the message file, and its name in C{directory} if given, on disk."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
    if directory is not None:
        fsyncDir(directory)


def closeQuietly(f) -> None:
    """
    Close a file whose content is thrown away: a buffered write that fails
    again (a full disk) does not matter.
    """
    try:
        f.close()
    except OSError:
        pass
