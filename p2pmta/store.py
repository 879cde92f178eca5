# -*- test-case-name: tests.test_store -*-
"""
The peer's on-disk stores.

For now this holds the public outbox (the paper's section 4.3, steps 4, 9 and
11): ciphertexts kept as files named by the lowercase hex SHA-256 of their
bytes, served to receivers and group members by L{p2pmta.web}.
"""

import hashlib
import os
import re
import stat

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from p2pmta.fileutil import (
    AtomicFile,
    SpareFiles,
    ensureDir,
    fsyncDir,
    removeTempFiles,
    storeByDigest,
)
from p2pmta.interfaces import IOutbox

_DIGEST = re.compile(r"[0-9a-f]{64}")


def isDigest(s: object) -> bool:
    """
    @return: whether C{s} is a L{str} holding exactly a lowercase hex SHA-256
        digest (64 characters of C{0-9a-f}, nothing before or after).
    """
    # fullmatch, not "^...$": "$" also matches before a trailing newline.
    return isinstance(s, str) and _DIGEST.fullmatch(s) is not None


def sha256Hex(data: bytes) -> str:
    """
    @return: the lowercase hex SHA-256 digest of C{data}.
    """
    return hashlib.sha256(data).hexdigest()


@implementer(IOutbox)
class Outbox:
    """
    The public outbox: ciphertexts in one folder, each file named by the
    lowercase hex SHA-256 of its bytes.

    Writes are atomic (temporary file C{.tmp-*}, fsync, rename, fsync of the
    folder) and run in a threadpool; reads of the listing and of sizes are
    quick and run where they are called.  Only one L{Outbox} may use a folder
    at a time: constructing one removes the temporary files of earlier,
    crashed runs.  A removed ciphertext's file, emptied, holds a later one
    if nobody had it open (see L{SpareFiles}).

    @ivar directory: The outbox folder (L{str}).
    @ivar spares: The L{SpareFiles} removed ciphertexts are kept in.
    """

    log = Logger()

    dirMode = 0o700
    fileMode = 0o600

    #: Removed ciphertexts kept, emptied, beside the outbox (in the folder
    #: of its name and C{.spare}) to hold new ones (see L{SpareFiles}): at
    #: most this many.
    spareFiles = 2048

    def __init__(self, reactor, directory: str, threadpool) -> None:
        """
        Open, creating if need be, the outbox in C{directory}.

        @param reactor: The reactor threadpool results are delivered on.
        @param directory: The outbox folder; created with mode 0700.
        @param threadpool: The L{twisted.python.threadpool.ThreadPool} (or
            anything with its C{callInThreadWithCallback}) that runs the
            hashing and the writes.
        """
        self._reactor = reactor
        self._threadpool = threadpool
        self.directory = os.path.abspath(directory)
        ensureDir(self.directory, self.dirMode)
        self.spares = SpareFiles(self.directory + ".spare", self.spareFiles)
        for name in removeTempFiles(self.directory):
            self.log.info(
                "removed {name} left in the outbox {directory} by a crash",
                name=name,
                directory=self.directory,
            )

    def _inThread(self, f, *args) -> Deferred:
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def _pathOf(self, digest: str) -> str:
        return os.path.join(self.directory, digest)

    # -- writing --------------------------------------------------------

    def add(self, data: bytes) -> Deferred:
        """
        Store C{data} atomically, unless it is already held.

        @return: a Deferred firing with its digest (L{str}).
        """
        return self._inThread(self._add, bytes(data))

    def _add(self, data: bytes) -> str:
        digest = sha256Hex(data)
        target = self._pathOf(digest)
        if not self._isRegularFile(target):
            with AtomicFile(self.directory, self.fileMode, self.spares) as f:
                f.write(data)
                f.commit(target)
        return digest

    def storeWith(self, produce, syncFolder: bool = True) -> tuple:
        """
        Store what C{produce} writes, hashing it as it goes by: blocking,
        for a caller already in a thread (one that encrypts straight into
        the outbox, with no file of its own to move in).

        @param produce: called with a binary file-like object that has
            C{write} and C{writelines} only; what it returns is returned
            too.
        @param syncFolder: whether to flush the outbox folder now (pass
            L{False} when calling L{syncFolder} once for several files).
        @return: the digest, the size and what C{produce} returned.
        """
        return storeByDigest(self.directory, self.fileMode, self.spares, produce, syncFolder)

    def syncFolder(self) -> None:
        """Flush the outbox folder (blocking): see L{storeWith}."""
        fsyncDir(self.directory)

    def remove(self, digest: str) -> Deferred:
        """
        Remove a stored ciphertext.  Removing one not held, or naming it by
        a malformed digest, is not an error (and a malformed digest never
        reaches the file system).

        @return: a Deferred firing with L{None}.
        """
        return self.removeMany([digest])

    def removeMany(self, digests) -> Deferred:
        """
        L{remove} several ciphertexts, in one thread call and one flush of
        the folder.

        @return: a Deferred firing with L{None}.
        """
        digests = [d for d in digests if isDigest(d)]
        if not digests:
            return succeed(None)
        return self._inThread(self._removeMany, digests)

    def _removeMany(self, digests) -> None:
        self.spares.retire(self._pathOf(digest) for digest in digests)

    # -- reading --------------------------------------------------------

    @staticmethod
    def _isRegularFile(path: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def path(self, digest: str) -> FilePath | None:
        """
        @return: the L{FilePath} of a stored ciphertext, or L{None} if
            C{digest} is malformed (checked before any file-system access)
            or not held as a regular file.
        """
        if not isDigest(digest):
            return None
        path = self._pathOf(digest)
        if not self._isRegularFile(path):
            return None
        return FilePath(path)

    def sizeOf(self, digest: str) -> int | None:
        """
        @return: the size in bytes of a stored ciphertext, or L{None} if
            C{digest} is malformed or not held.
        """
        if not isDigest(digest):
            return None
        try:
            st = os.lstat(self._pathOf(digest))
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def digests(self) -> list[str]:
        """
        @return: a sorted L{list} of the digests held (temporary files and
            anything else not named by a digest are left out).
        """
        return sorted(name for name, _ in self._entries())

    def totalBytes(self) -> int:
        """
        @return: the number of bytes the stored ciphertexts take, for
            disk-use reporting.  This reads the whole folder.
        """
        return sum(size for _, size in self._entries())

    def _entries(self):
        """
        The name and size of every regular file named by a digest.
        """
        with os.scandir(self.directory) as it:
            for entry in it:
                if not isDigest(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield entry.name, st.st_size
