"""
Tests for L{p2pmta.fileutil}.
"""

import io
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.fileutil import (
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
