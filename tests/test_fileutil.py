"""
Tests for L{p2pmta.fileutil}.
"""

import errno
import fcntl
import io
import os
import stat

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from p2pmta import fileutil
from p2pmta.fileutil import (
    DIRECT_ALIGNMENT,
    DIRECT_BUFFER,
    TEMP_PREFIX,
    AtomicFile,
    SpareFiles,
    atomicWrite,
    atomicWriteFrom,
    createSecretFile,
    ensureDir,
    fsyncDir,
    isTempName,
    removeTempFiles,
    writeUncached,
)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class AtomicWriteTests(SynchronousTestCase):
    """
    Tests for L{atomicWrite}, L{atomicWriteFrom} and L{AtomicFile}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "f")

    def test_writes(self) -> None:
        """
        The file holds the data, with the given mode, and no temporary file
        is left.
        """
        atomicWrite(self.path, b"hello", mode=0o640)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"hello")
        self.assertEqual(_mode(self.path), 0o640)
        self.assertEqual(os.listdir(self.dir), ["f"])

    def test_replaces(self) -> None:
        """
        An existing file is replaced.
        """
        atomicWrite(self.path, b"old")
        atomicWrite(self.path, b"new")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_fromChunksAndFiles(self) -> None:
        """
        L{atomicWriteFrom} takes an iterable of chunks or a readable file and
        returns the byte count.
        """
        self.assertEqual(atomicWriteFrom(self.path, [b"a", b"", b"bc"]), 3)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"abc")
        big = os.urandom(200_000)
        self.assertEqual(atomicWriteFrom(self.path, io.BytesIO(big)), len(big))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), big)

    def test_failureLeavesOldFile(self) -> None:
        """
        When the source fails half-way, the old file is untouched and the
        temporary file is gone.
        """
        atomicWrite(self.path, b"old")

        def chunks():
            yield b"partial"
            raise OSError("source broke")

        self.assertRaises(OSError, atomicWriteFrom, self.path, chunks())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(self.dir), ["f"])

    def test_tempName(self) -> None:
        """
        The temporary file lives in the destination folder under a name
        starting with L{TEMP_PREFIX} until it is committed.
        """
        with AtomicFile(self.dir) as f:
            name = os.path.basename(f.tempPath)
            self.assertTrue(name.startswith(TEMP_PREFIX))
            self.assertTrue(isTempName(name))
            self.assertEqual(os.listdir(self.dir), [name])
            f.write(b"x")
            f.commit(self.path)
        self.assertEqual(os.listdir(self.dir), ["f"])

    def test_commitElsewhereRefused(self) -> None:
        """
        Committing to another folder (where rename would not be atomic, or
        would not work) is refused.
        """
        other = self.mktemp()
        os.mkdir(other)
        with AtomicFile(self.dir) as f:
            self.assertRaises(ValueError, f.commit, os.path.join(other, "f"))
        self.assertEqual(os.listdir(self.dir), [])


def _isDirect(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


class UncachedWriteTests(SynchronousTestCase):
    """
    Tests for L{writeUncached} and L{AtomicFile.writeUncached}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "f")
        self.writes: list[tuple[int, bool]] = []
        realWrite = os.write

        def write(fd, data):
            self.writes.append((len(data), _isDirect(fd)))
            return realWrite(fd, data)

        self.realWrite = realWrite
        self.patch(fileutil.os, "write", write)

    def requireDirect(self) -> None:
        """Skip unless this file system takes C{O_DIRECT}."""
        fd = os.open(os.path.join(self.dir, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if not fileutil._direct(fd, True):
                raise SkipTest("no O_DIRECT on this file system")
        finally:
            os.close(fd)
            os.unlink(os.path.join(self.dir, "probe"))

    def written(self, data: bytes, prefix: bytes = b"") -> bytes:
        """Write C{prefix} the plain way, then C{data} uncached: the file."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.realWrite(fd, prefix)
            writeUncached(fd, data)
            self.assertFalse(_isDirect(fd), "O_DIRECT is switched off again")
        finally:
            os.close(fd)
        with open(self.path, "rb") as f:
            return f.read()

    def test_sizes(self) -> None:
        """
        Whatever its size, the data is written whole, in order.
        """
        for size in (0, 1, DIRECT_ALIGNMENT - 1, DIRECT_ALIGNMENT, DIRECT_ALIGNMENT + 1,
                     DIRECT_BUFFER - 1, DIRECT_BUFFER, 2 * DIRECT_BUFFER + DIRECT_ALIGNMENT + 17):
            data = os.urandom(size)
            self.assertEqual(self.written(data), data, size)
            self.assertEqual(self.written(bytearray(data)), data, size)

    def test_alignedPartPastTheCache(self) -> None:
        """
        The aligned part goes in writes of at most L{DIRECT_BUFFER} bytes
        with C{O_DIRECT}; the rest in one plain write.
        """
        self.requireDirect()
        data = os.urandom(2 * DIRECT_BUFFER + DIRECT_ALIGNMENT + 17)
        self.assertEqual(self.written(data), data)
        self.assertEqual(
            self.writes,
            [(DIRECT_BUFFER, True), (DIRECT_BUFFER, True), (DIRECT_ALIGNMENT, True), (17, False)],
        )

    def test_unalignedPosition(self) -> None:
        """
        At a position in the file that is not aligned, everything is
        written the plain way.
        """
        data = os.urandom(3 * DIRECT_ALIGNMENT)
        self.assertEqual(self.written(data, prefix=b"0123456789"), b"0123456789" + data)
        self.assertEqual(self.writes, [(len(data), False)])

    def test_noDirectOnThisFileSystem(self) -> None:
        """
        Where C{O_DIRECT} cannot be switched on (C{EINVAL}), the data is
        written the plain way.
        """
        realFcntl = fcntl.fcntl

        def refusing(fd, command, *args):
            if command == fcntl.F_SETFL and args[0] & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "no O_DIRECT here")
            return realFcntl(fd, command, *args)

        self.patch(fileutil.fcntl, "fcntl", refusing)
        data = os.urandom(DIRECT_BUFFER + 5)
        self.assertEqual(self.written(data), data)
        self.assertEqual(self.writes, [(len(data), False)])

    def test_writeRefused(self) -> None:
        """
        A write the file system refuses with C{O_DIRECT} (C{EINVAL}: it
        wants a larger alignment) is made again the plain way, from there.
        """
        self.requireDirect()
        calls = []
        write = fileutil.os.write

        def refusingTheSecond(fd, data):
            if _isDirect(fd):
                calls.append(len(data))
                if len(calls) == 2:
                    raise OSError(errno.EINVAL, "misaligned")
            return write(fd, data)

        self.patch(fileutil.os, "write", refusingTheSecond)
        data = os.urandom(2 * DIRECT_BUFFER + 3)
        self.assertEqual(self.written(data), data)
        self.assertEqual(calls, [DIRECT_BUFFER, DIRECT_BUFFER])
        self.assertEqual(self.writes[-1], (DIRECT_BUFFER + 3, False))

    def test_shortWrite(self) -> None:
        """
        After a short write with C{O_DIRECT}, the rest is written the plain
        way from where it stopped.
        """
        self.requireDirect()
        write = fileutil.os.write

        def short(fd, data):
            if _isDirect(fd) and len(data) > DIRECT_ALIGNMENT:
                return write(fd, memoryview(data)[:DIRECT_ALIGNMENT])
            return write(fd, data)

        self.patch(fileutil.os, "write", short)
        data = os.urandom(3 * DIRECT_ALIGNMENT + 1)
        self.assertEqual(self.written(data), data)
        self.assertEqual(self.writes, [(DIRECT_ALIGNMENT, True), (2 * DIRECT_ALIGNMENT + 1, False)])

    def test_errorsRaised(self) -> None:
        """
        Any other error (a full disk) is raised, with C{O_DIRECT} switched
        off again; an L{AtomicFile} then leaves nothing behind.
        """
        self.requireDirect()
        seen = []

        def full(fd, data):
            seen.append(fd)
            raise OSError(errno.ENOSPC, "disk full")

        self.patch(fileutil.os, "write", full)
        with self.assertRaises(OSError) as caught:
            with AtomicFile(self.dir) as f:
                f.writeUncached(os.urandom(DIRECT_BUFFER))
                self.fail("not reached")
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(os.listdir(self.dir), [])

    def test_atomicFile(self) -> None:
        """
        L{AtomicFile.writeUncached} appends after what was written before,
        and the committed file holds it all.
        """
        head, data = b"Subject: x\r\n\r\n", os.urandom(DIRECT_BUFFER + 99)
        for uncachedFirst in (True, False):
            with AtomicFile(self.dir, 0o600) as f:
                if uncachedFirst:
                    f.writeUncached(data)
                f.write(head)
                if not uncachedFirst:
                    f.writeUncached(data)
                f.commit(self.path)
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), data + head if uncachedFirst else head + data)


class SecretFileTests(SynchronousTestCase):
    """
    Tests for L{createSecretFile}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "secret")

    def test_mode(self) -> None:
        """
        The file is created with mode 0600 and holds the data.
        """
        createSecretFile(self.path, b"s3cret")
        self.assertEqual(_mode(self.path), 0o600)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"s3cret")

    def test_neverOverwrites(self) -> None:
        """
        An existing file is not overwritten.
        """
        createSecretFile(self.path, b"first")
        self.assertRaises(FileExistsError, createSecretFile, self.path, b"second")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"first")

    def test_neverFollowsLinks(self) -> None:
        """
        A symbolic link at the path (even a dangling one) is not followed.
        """
        target = os.path.join(self.dir, "target")
        os.symlink(target, self.path)
        self.assertRaises(FileExistsError, createSecretFile, self.path, b"x")
        self.assertFalse(os.path.exists(target))


class DirTests(SynchronousTestCase):
    """
    Tests for L{ensureDir}, L{fsyncDir} and L{removeTempFiles}.
    """

    def test_ensureDirCreates(self) -> None:
        """
        A missing folder (and its parents) is created with the mode.
        """
        path = os.path.join(self.mktemp(), "a", "b")
        ensureDir(path, 0o700)
        self.assertTrue(os.path.isdir(path))
        self.assertEqual(_mode(path), 0o700)

    def test_ensureDirFixesMode(self) -> None:
        """
        An existing folder gets the mode.
        """
        path = self.mktemp()
        os.mkdir(path, 0o755)
        ensureDir(path, 0o700)
        self.assertEqual(_mode(path), 0o700)

    def test_ensureDirRefusesFile(self) -> None:
        """
        A file where the folder should be is an error.
        """
        path = self.mktemp()
        with open(path, "wb"):
            pass
        self.assertRaises(OSError, ensureDir, path, 0o700)

    def test_fsyncDir(self) -> None:
        """
        L{fsyncDir} works on a folder.
        """
        path = self.mktemp()
        os.mkdir(path)
        fsyncDir(path)

    def test_removeTempFiles(self) -> None:
        """
        Only files named like temporary files are removed.
        """
        path = self.mktemp()
        os.mkdir(path)
        for name in [TEMP_PREFIX + "abc", TEMP_PREFIX + "def", "keep", ".other"]:
            with open(os.path.join(path, name), "wb"):
                pass
        removed = removeTempFiles(path)
        self.assertEqual(sorted(removed), [TEMP_PREFIX + "abc", TEMP_PREFIX + "def"])
        self.assertEqual(sorted(os.listdir(path)), [".other", "keep"])


class SpareFilesTests(SynchronousTestCase):
    """
    Tests for L{SpareFiles}: removed files kept, emptied, to hold new ones.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)
        self.spareDir = self.dir + ".spare"
        self.spares = SpareFiles(self.spareDir, 2)

    def _file(self, name: str, data: bytes = b"ciphertext") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_retiredFileHoldsTheNextOne(self) -> None:
        """
        A retired file leaves its folder; the next L{AtomicFile} written
        with the spares is that file (its inode), emptied, then holds only
        the new bytes.
        """
        old = self._file("a", b"x" * 5000)
        inode = os.stat(old).st_ino
        self.spares.retire([old])
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(len(self.spares), 1)
        (spare,) = os.listdir(self.spareDir)
        self.assertEqual(os.path.getsize(os.path.join(self.spareDir, spare)), 0)
        target = os.path.join(self.dir, "b")
        with AtomicFile(self.dir, 0o600, self.spares) as f:
            f.write(b"new")
            f.commit(target)
        self.assertEqual(os.stat(target).st_ino, inode)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(_mode(target), 0o600)
        self.assertEqual(os.listdir(self.dir), ["b"])
        self.assertEqual(os.listdir(self.spareDir), [])
        self.assertEqual(len(self.spares), 0)

    def test_noSpareMakesAFile(self) -> None:
        """
        With no spare, L{AtomicFile} makes a file as without spares.
        """
        target = os.path.join(self.dir, "b")
        with AtomicFile(self.dir, 0o600, self.spares) as f:
            f.write(b"new")
            f.commit(target)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_abortedWriteGoes(self) -> None:
        """
        A spare taken for a write that is not committed is removed with it.
        """
        self.spares.retire([self._file("a")])
        with AtomicFile(self.dir, 0o600, self.spares) as f:
            f.write(b"half")
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(os.listdir(self.spareDir), [])

    def test_openFileNotKept(self) -> None:
        """
        A file somebody still has open is unlinked, not kept: the reader
        goes on reading all its bytes, and no later file reuses it.
        """
        path = self._file("a", b"y" * 100000)
        with open(path, "rb") as reader:
            reader.read(10)
            self.spares.retire([path])
            self.assertEqual(len(self.spares), 0)
            self.assertEqual(os.listdir(self.dir), [])
            self.assertEqual(os.listdir(self.spareDir), [])
            self.assertEqual(reader.read(), b"y" * 99990)

    def test_linkedFileNotKept(self) -> None:
        """
        A file with another name is unlinked, not emptied: the other name
        keeps its bytes.
        """
        path = self._file("a", b"kept")
        other = os.path.join(self.mktemp())
        os.link(path, other)
        self.spares.retire([path])
        self.assertEqual(len(self.spares), 0)
        self.assertEqual(os.listdir(self.spareDir), [])
        with open(other, "rb") as f:
            self.assertEqual(f.read(), b"kept")

    def test_limit(self) -> None:
        """
        No more than C{limit} spares are kept: the rest are unlinked.
        """
        self.spares.retire([self._file(n) for n in "abc"])
        self.assertEqual(len(self.spares), 2)
        self.assertEqual(len(os.listdir(self.spareDir)), 2)
        self.assertEqual(os.listdir(self.dir), [])

    def test_goneAlready(self) -> None:
        """
        Retiring a file that is not there is not an error.
        """
        self.spares.retire([os.path.join(self.dir, "nothing")])
        self.assertEqual(len(self.spares), 0)

    def test_leftByAnEarlierRun(self) -> None:
        """
        Spares left by an earlier run (one not yet emptied, as after a
        crash) are emptied and kept, up to the limit; what is not a file
        is left alone.
        """
        os.mkdir(os.path.join(self.spareDir, "folder"))
        for name in ("1", "2", "3"):
            with open(os.path.join(self.spareDir, name), "wb") as f:
                f.write(b"left")
        spares = SpareFiles(self.spareDir, 2)
        self.assertEqual(len(spares), 2)
        names = sorted(os.listdir(self.spareDir))
        self.assertEqual(len(names), 3)
        self.assertIn("folder", names)
        for name in names:
            if name != "folder":
                self.assertEqual(os.path.getsize(os.path.join(self.spareDir, name)), 0)
