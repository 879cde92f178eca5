"""
Tests for L{p2pmta.fileutil}.
"""

import collections
import concurrent.futures
import ctypes
import errno
import fcntl
import io
import mmap
import os
import stat
import tempfile
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from p2pmta import fileutil
from p2pmta.fileutil import (
    DIRECT_ALIGNMENT,
    DIRECT_BUFFER,
    STAGING_SIZE,
    TEMP_PREFIX,
    AtomicFile,
    SpareFiles,
    UncachedAppender,
    atomicWrite,
    atomicWriteFrom,
    createSecretFile,
    ensureDir,
    fsyncDir,
    isTempName,
    readUncached,
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


def requireDirect(folder: str) -> None:
    """Skip unless the file system of C{folder} takes C{O_DIRECT}."""
    fd, probe = tempfile.mkstemp(dir=folder)
    try:
        if not fileutil._direct(fd, True):
            raise SkipTest("no O_DIRECT on this file system")
    finally:
        os.close(fd)
        os.unlink(probe)


def cachedPages(path: str) -> list[int]:
    """
    The pages of the file at C{path} that are in the page cache, by number
    (C{mincore} over a mapping of it, which reads nothing).
    """
    size = os.path.getsize(path)
    if not size:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        address = ctypes.c_char.from_buffer(mapping)
        try:
            if libc.mincore(ctypes.addressof(address), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del address
    return [i for i in range(pages) if vector[i] & 1]


def evict(path: str) -> None:
    """Put the file at C{path} on disk and drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class _WritesRecorded:
    """
    A folder for a file C{path}, and every write of L{fileutil} (C{write}
    and C{pwrite}) recorded in C{writes}: its size and whether C{O_DIRECT}
    was on.  C{hook(fd, data)}, if set, sees each first: it may raise, or
    return a size to write only that much.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "f")
        self.writes: list[tuple[int, bool]] = []
        self.hook = None
        realWrite, realPwrite = os.write, os.pwrite

        def hooked(fd, data) -> memoryview:
            size = self.hook(fd, data) if self.hook is not None else None
            data = memoryview(data)[:size] if size is not None else data
            self.writes.append((len(data), _isDirect(fd)))
            return data

        self.realWrite = realWrite
        self.patch(fileutil.os, "write", lambda fd, data: realWrite(fd, hooked(fd, data)))
        self.patch(fileutil.os, "pwrite", lambda fd, data, offset: realPwrite(fd, hooked(fd, data), offset))

    def requireDirect(self) -> None:
        """Skip unless this file system takes C{O_DIRECT}."""
        requireDirect(self.dir)

    def refuseDirect(self) -> None:
        """Make switching C{O_DIRECT} on fail (C{EINVAL}), as some file systems do."""
        realFcntl = fcntl.fcntl

        def refusing(fd, command, *args):
            if command == fcntl.F_SETFL and args[0] & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "no O_DIRECT here")
            return realFcntl(fd, command, *args)

        self.patch(fileutil.fcntl, "fcntl", refusing)

    def refuseSecondDirectWrite(self) -> list:
        """
        Make the second write with C{O_DIRECT} fail (C{EINVAL}).

        @return: the sizes of the writes with C{O_DIRECT}, as they come.
        """
        calls = []

        def refusingTheSecond(fd, data):
            if _isDirect(fd):
                calls.append(len(data))
                if len(calls) == 2:
                    raise OSError(errno.EINVAL, "misaligned")

        self.hook = refusingTheSecond
        return calls

    def shortDirectWrites(self) -> None:
        """Make each write with C{O_DIRECT} of more than a page write one page."""
        self.hook = lambda fd, data: DIRECT_ALIGNMENT if _isDirect(fd) and len(data) > DIRECT_ALIGNMENT else None

    def diskFull(self) -> None:
        """Make every write fail with C{ENOSPC}."""

        def full(fd, data):
            raise OSError(errno.ENOSPC, "disk full")

        self.hook = full


class UncachedWriteTests(_WritesRecorded, SynchronousTestCase):
    """
    Tests for L{writeUncached} and L{AtomicFile.writeUncached}.
    """

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
        self.refuseDirect()
        data = os.urandom(DIRECT_BUFFER + 5)
        self.assertEqual(self.written(data), data)
        self.assertEqual(self.writes, [(len(data), False)])

    def test_writeRefused(self) -> None:
        """
        A write the file system refuses with C{O_DIRECT} (C{EINVAL}: it
        wants a larger alignment) is made again the plain way, from there.
        """
        self.requireDirect()
        calls = self.refuseSecondDirectWrite()
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
        self.shortDirectWrites()
        data = os.urandom(3 * DIRECT_ALIGNMENT + 1)
        self.assertEqual(self.written(data), data)
        self.assertEqual(self.writes, [(DIRECT_ALIGNMENT, True), (2 * DIRECT_ALIGNMENT + 1, False)])

    def test_errorsRaised(self) -> None:
        """
        Any other error (a full disk) is raised, with C{O_DIRECT} switched
        off again; an L{AtomicFile} then leaves nothing behind.
        """
        self.requireDirect()
        self.diskFull()
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


class UncachedAppenderTests(_WritesRecorded, SynchronousTestCase):
    """
    Tests for L{UncachedAppender}: a new file written in aligned blocks
    past the page cache, its tail the plain way.
    """

    def setUp(self) -> None:
        super().setUp()
        self.buffers = fileutil._StagingBuffers(keep=2)

    def appender(self, writer=None, ahead: int = 2) -> UncachedAppender:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return UncachedAppender(fd, self.buffers, writer, ahead)

    def writer(self) -> concurrent.futures.ThreadPoolExecutor:
        """An executor of one thread, shut down after the test."""
        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-writer")
        self.addCleanup(writer.shutdown)
        return writer

    def test_writer(self) -> None:
        """
        Given a writer, full blocks are written by it, each at its place,
        with C{O_DIRECT}; the flush writes the rest itself.  The file holds
        the data whole, in order.
        """
        self.requireDirect()
        threads = []
        self.hook = lambda fd, data: threads.append(threading.current_thread().name)
        data = os.urandom(5 * STAGING_SIZE + DIRECT_ALIGNMENT + 123)
        f = self.appender(self.writer())
        for i in range(0, len(data), 70_000):
            f.write(data[i : i + 70_000])
        f.close()
        with open(self.path, "rb") as g:
            self.assertEqual(g.read(), data)
        self.assertEqual(self.writes, [(STAGING_SIZE, True)] * 5 + [(DIRECT_ALIGNMENT, True), (123, False)])
        self.assertTrue(all(name.startswith("test-writer") for name in threads[:5]), threads)
        self.assertEqual(threads[5:], [threading.current_thread().name] * 2)
        self.assertEqual(len(self.buffers._free), 2)

    def test_writerAhead(self) -> None:
        """
        At most C{ahead} blocks are in the writer's hands: the next full
        one waits until the oldest is written.
        """
        self.requireDirect()
        writer, release = self.writer(), threading.Event()
        writer.submit(release.wait)  # the writer is busy until released
        f = self.appender(writer, ahead=2)
        f.write(b"a" * (2 * STAGING_SIZE))
        self.assertEqual((len(f._pending), self.writes), (2, []))
        threading.Timer(0.2, release.set).start()
        f.write(b"b" * STAGING_SIZE)  # waits for the first block
        self.assertTrue(release.is_set())
        self.assertLessEqual(len(f._pending), 2)
        self.assertGreaterEqual(len(self.writes), 1)
        f.close()
        with open(self.path, "rb") as g:
            self.assertEqual(g.read(), b"a" * (2 * STAGING_SIZE) + b"b" * STAGING_SIZE)

    def test_writerFailure(self) -> None:
        """
        A block the writer fails to write fails the next C{write}, or else
        the flush; the close still waits for the writer before closing the
        file, and gives every buffer back.
        """
        self.requireDirect()
        for failAt in ("write", "flush"):
            self.diskFull()
            writer = self.writer()
            f = self.appender(writer)
            f.write(b"x" * STAGING_SIZE)
            writer.submit(lambda: None).result()  # the block's write is done
            with self.assertRaises(OSError) as caught:
                if failAt == "write":
                    f.write(b"y")
                else:
                    f.flush()
            self.assertEqual(caught.exception.errno, errno.ENOSPC)
            self.hook = None
            fd = f.fileno()
            f.close()
            self.assertRaises(OSError, os.fstat, fd)
            self.assertEqual(f._pending, collections.deque())

    def written(self, data: bytes, piece: int) -> bytes:
        """Write C{data} in pieces of C{piece} bytes, close: the file."""
        f = self.appender()
        for i in range(0, len(data), piece):
            self.assertEqual(f.write(data[i : i + piece]), len(data[i : i + piece]))
        f.close()
        self.assertTrue(f.closed)
        with open(self.path, "rb") as g:
            return g.read()

    def test_sizes(self) -> None:
        """
        Whatever its size, and however it is cut into writes, the data is
        in the file whole, in order.
        """
        for size in (0, 1, DIRECT_ALIGNMENT - 1, DIRECT_ALIGNMENT, DIRECT_ALIGNMENT + 1,
                     STAGING_SIZE - 1, STAGING_SIZE, STAGING_SIZE + 1, 3 * STAGING_SIZE + DIRECT_ALIGNMENT + 17):
            data = os.urandom(size)
            for piece in (1000, 65536, STAGING_SIZE, 2 * STAGING_SIZE + 1):
                if size > 100_000 and piece == 1000:
                    continue
                self.assertEqual(self.written(data, piece), data, (size, piece))
            self.assertEqual(self.written(bytearray(data), 4096), data)

    def test_blocks(self) -> None:
        """
        Full blocks go with C{O_DIRECT} as they fill; the flush writes the
        aligned part of the rest the same way and its last partial page the
        plain way, with C{O_DIRECT} switched off.
        """
        self.requireDirect()
        data = os.urandom(2 * STAGING_SIZE + DIRECT_ALIGNMENT + 17)
        f = self.appender()
        for i in range(0, len(data), 10_000):
            f.write(data[i : i + 10_000])
        self.assertEqual(self.writes, [(STAGING_SIZE, True), (STAGING_SIZE, True)])
        f.flush()
        self.assertEqual(self.writes[2:], [(DIRECT_ALIGNMENT, True), (17, False)])
        self.assertFalse(_isDirect(f.fileno()))
        # Written after the flush, past an unaligned end: the plain way.
        f.write(b"more" * 5000)
        f.close()
        self.assertEqual(self.writes[4:], [(20000, False)])
        with open(self.path, "rb") as g:
            self.assertEqual(g.read(), data + b"more" * 5000)

    def test_smallFileCached(self) -> None:
        """
        A file smaller than a block is written the plain way, through the
        page cache, at the flush: C{O_DIRECT} is never switched on.
        """
        self.requireDirect()
        data = os.urandom(STAGING_SIZE - 1)
        f = self.appender()
        f.write(data)
        self.assertEqual(self.writes, [])
        f.flush()
        self.assertEqual(self.writes, [(len(data), False)])
        f.close()
        self.assertEqual(len(cachedPages(self.path)), -(-len(data) // mmap.PAGESIZE))

    def test_pastThePageCache(self) -> None:
        """
        The file's pages are not in the page cache once it is written and
        flushed, but for its last partial one; written the plain way, all
        of them are.
        """
        self.requireDirect()
        data = os.urandom(STAGING_SIZE + 5 * DIRECT_ALIGNMENT + 100)
        f = self.appender()
        for i in range(0, len(data), 8000):
            f.write(data[i : i + 8000])
        f.close()
        self.assertEqual(cachedPages(self.path), [len(data) // mmap.PAGESIZE])
        with open(self.path, "rb") as g:
            self.assertEqual(g.read(), data)
        with open(self.path, "wb") as g:
            g.write(data)
        self.assertEqual(len(cachedPages(self.path)), -(-len(data) // mmap.PAGESIZE))

    def test_noDirectOnThisFileSystem(self) -> None:
        """
        Where C{O_DIRECT} cannot be switched on (C{EINVAL}), the first block
        is written the plain way, and then what is staged and every write
        as it comes.
        """
        self.refuseDirect()
        data = os.urandom(STAGING_SIZE + 300_000)
        self.assertEqual(self.written(data, 100_000), data)
        rest = 3 * 100_000 - STAGING_SIZE
        self.assertEqual(
            self.writes,
            [(STAGING_SIZE, False), (rest, False), (100_000, False), (100_000, False), (len(data) - 500_000, False)],
        )
        self.assertEqual(sum(size for size, _ in self.writes), len(data))

    def test_writeRefused(self) -> None:
        """
        A block the file system refuses with C{O_DIRECT} (C{EINVAL}) is
        written again the plain way, and so is the rest of the file.
        """
        self.requireDirect()
        calls = self.refuseSecondDirectWrite()
        data = os.urandom(3 * STAGING_SIZE + 3)
        self.assertEqual(self.written(data, 50_000), data)
        self.assertEqual(calls, [STAGING_SIZE, STAGING_SIZE])
        self.assertEqual(self.writes[0], (STAGING_SIZE, True))
        self.assertTrue(all(not direct for _, direct in self.writes[1:]))

    def test_shortWrite(self) -> None:
        """
        After a short write with C{O_DIRECT}, the rest of the block and of
        the file goes the plain way, from where it stopped.
        """
        self.requireDirect()
        self.shortDirectWrites()
        data = os.urandom(2 * STAGING_SIZE + 1)
        self.assertEqual(self.written(data, STAGING_SIZE), data)
        self.assertEqual(self.writes[:2], [(DIRECT_ALIGNMENT, True), (STAGING_SIZE - DIRECT_ALIGNMENT, False)])
        self.assertTrue(all(not direct for _, direct in self.writes[1:]))

    def test_errorsRaised(self) -> None:
        """
        A full disk is raised by the write that fills a block, or by the
        flush (or the close) for what was staged; the file is closed all
        the same and its buffer goes back.
        """
        self.diskFull()
        f = self.appender()
        f.write(b"x" * (STAGING_SIZE - 1))
        with self.assertRaises(OSError) as caught:
            f.write(b"yy")
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        fd = f.fileno()
        self.assertRaises(OSError, f.close)
        self.assertTrue(f.closed)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(len(self.buffers._free), 1)
        g = self.appender()
        g.write(b"short")
        self.assertRaises(OSError, g.flush)
        self.assertRaises(OSError, g.close)
        self.assertTrue(g.closed)

    def test_closed(self) -> None:
        """
        A closed appender refuses writes; closing it again does nothing.
        """
        f = self.appender()
        f.write(b"abc")
        f.close()
        f.close()
        self.assertRaises(ValueError, f.write, b"d")
        with open(self.path, "rb") as g:
            self.assertEqual(g.read(), b"abc")

    def test_buffersKept(self) -> None:
        """
        A staging buffer is taken at the first write and given back at the
        close, to be taken again; no more than C{keep} are kept.
        """
        first = self.appender()
        self.assertEqual(self.buffers._free, [])
        first.write(b"a")
        buffer = first._buffer
        first.close()
        self.assertEqual(self.buffers._free, [buffer])
        appenders = [self.appender() for _ in range(3)]
        for f in appenders:
            f.write(b"b")
        self.assertIs(appenders[0]._buffer, buffer)  # the one given back
        for f in appenders:
            f.close()
        self.assertEqual(len(self.buffers._free), 2)
        self.assertIn(buffer, self.buffers._free)
        self.assertTrue(appenders[0]._buffer is None)


class ReadUncachedTests(_WritesRecorded, SynchronousTestCase):
    """
    Tests for L{readUncached}.
    """

    def read(self, size: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = readUncached(fd, size)
            self.assertFalse(_isDirect(fd), "O_DIRECT is switched off again")
            return data
        finally:
            os.close(fd)

    def test_sizes(self) -> None:
        """
        The first C{size} bytes of the file, whatever the size; fewer when
        the file is shorter.
        """
        for length in (0, 1, DIRECT_ALIGNMENT - 1, DIRECT_ALIGNMENT, DIRECT_ALIGNMENT + 1,
                       DIRECT_BUFFER + 3, 2 * DIRECT_BUFFER + DIRECT_ALIGNMENT):
            data = os.urandom(length)
            with open(self.path, "wb") as f:
                f.write(data)
            for cached in (True, False):
                if not cached:
                    evict(self.path)
                self.assertEqual(self.read(length), data, length)
                self.assertEqual(self.read(length + 10), data, length)
                self.assertEqual(self.read(length // 2), data[: length // 2], length)

    def test_pastThePageCache(self) -> None:
        """
        Reading a file that is not in the page cache does not put it there.
        """
        self.requireDirect()
        data = os.urandom(DIRECT_BUFFER + 3 * DIRECT_ALIGNMENT)
        with open(self.path, "wb") as f:
            f.write(data)
        evict(self.path)
        self.assertEqual(self.read(len(data)), data)
        self.assertEqual(cachedPages(self.path), [])

    def test_smallFilePlain(self) -> None:
        """
        A file smaller than a block (L{STAGING_SIZE}) is read the plain way,
        as an L{UncachedAppender} writes it.
        """
        data = os.urandom(STAGING_SIZE - 1)
        with open(self.path, "wb") as f:
            f.write(data)
        self.patch(fileutil.os, "preadv", lambda *args: self.fail("read past the cache"))
        self.assertEqual(self.read(len(data)), data)

    def test_noDirect(self) -> None:
        """
        Where C{O_DIRECT} cannot be switched on, the file is read the plain
        way.
        """
        data = os.urandom(STAGING_SIZE + 3 * DIRECT_ALIGNMENT + 5)
        with open(self.path, "wb") as f:
            f.write(data)
        self.refuseDirect()
        self.assertEqual(self.read(len(data)), data)

    def test_readRefused(self) -> None:
        """
        Where a read with C{O_DIRECT} is refused (C{EINVAL}), the rest of
        the file is read the plain way.
        """
        self.requireDirect()
        data = os.urandom(STAGING_SIZE + 3 * DIRECT_ALIGNMENT + 5)
        with open(self.path, "wb") as f:
            f.write(data)
        realPreadv, calls = os.preadv, []

        def preadv(fd, buffers, offset):
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.EINVAL, "misaligned")
            return realPreadv(fd, [memoryview(buffers[0])[:DIRECT_ALIGNMENT]], offset)

        self.patch(fileutil.os, "preadv", preadv)
        self.assertEqual(self.read(len(data)), data)
        self.assertEqual(calls, [0, DIRECT_ALIGNMENT])

    def test_otherErrorsRaised(self) -> None:
        """
        Any other error of the read is raised, with C{O_DIRECT} off again.
        """
        with open(self.path, "wb") as f:
            f.write(b"x" * (STAGING_SIZE + 10_000))

        def failing(fd, buffers, offset):
            raise OSError(errno.EIO, "I/O error")

        self.patch(fileutil.os, "preadv", failing)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if fileutil._direct(fd, False):
                with self.assertRaises(OSError) as caught:
                    readUncached(fd, STAGING_SIZE + 10_000)
                self.assertEqual(caught.exception.errno, errno.EIO)
                self.assertFalse(_isDirect(fd))
        finally:
            os.close(fd)


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
