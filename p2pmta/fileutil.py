# -*- test-case-name: tests.test_fileutil -*-
"""
Small, blocking file-system helpers: atomic writes, secret files, folders.

Everything here blocks; callers on the reactor thread run it through a
threadpool.  An atomic write goes to a temporary file in the destination's
own folder, is flushed to disk, renamed over the destination and the folder is
flushed too, so after a crash a reader sees either the old file or the whole
new one, never a torn one.  Temporary files are named C{.tmp-*} (see
L{TEMP_PREFIX}) so that a folder can be swept of a crash's leftovers with
L{removeTempFiles}.
"""

import collections
import concurrent.futures
import errno
import fcntl
import hashlib
import mmap
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
"""
The prefix of every temporary file made here.  It starts with a dot, so no
hex digest (nor any other name our stores use for real files) can carry it.
"""

CHUNK_SIZE = 64 * 1024
"""How many bytes to read at a time when copying from a file."""

DIRECT_ALIGNMENT = 4096
"""
What L{writeUncached} aligns its uncached writes to: their memory, length
and offset in the file.  Linux asks for the file system's logical block
size (512 or 4096 bytes); a page is both.
"""

DIRECT_BUFFER = 1024 * 1024
"""
The size of the page-aligned buffer each thread that calls L{writeUncached}
keeps, and so of its largest uncached write.
"""

_directBuffers = threading.local()


def fsyncDir(path: str) -> None:
    """
    Flush a folder's entries (new, renamed and removed names) to disk.

    @param path: The folder.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensureDir(path: str, mode: int = 0o700) -> None:
    """
    Make sure C{path} is a folder with exactly the permissions C{mode},
    creating it (and missing parents, with default permissions) if need be.

    @param path: The folder.
    @param mode: Its permission bits, applied even if it already exists.

    @raise NotADirectoryError: if C{path} exists and is not a folder.
    """
    os.makedirs(path, mode=mode, exist_ok=True)
    if not os.path.isdir(path):
        raise NotADirectoryError(path)
    # makedirs' mode is subject to the umask and not applied to an existing
    # folder; chmod is neither.
    os.chmod(path, mode)


class AtomicFile:
    """
    A temporary file in a given folder that is either committed, atomically,
    under its final name or removed.

    Use as a context manager: leaving the block without L{commit} (normally or
    through an exception) removes the temporary file.

        with AtomicFile(folder) as f:
            f.write(data)
            f.commit(os.path.join(folder, name))

    @ivar tempPath: The temporary file's path, named C{.tmp-*}.
    """

    def __init__(self, directory: str, mode: int = 0o644, spares: "SpareFiles | None" = None) -> None:
        """
        @param directory: The folder the final file will be in.
        @param mode: The permission bits of the final file.
        @param spares: Empty files to take the temporary file from, if
            there is one (see L{SpareFiles}).
        """
        self._directory = directory
        taken = spares.take(directory) if spares is not None else None
        fd, self.tempPath = taken or tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        try:
            os.fchmod(fd, mode)
            self._file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.unlink(self.tempPath)
            raise
        self._done = False

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the temporary file.
        """
        self._file.write(data)

    def writeUncached(self, data) -> None:
        """
        Append C{data} to the temporary file, as much of it as can be past
        the page cache (see L{writeUncached}); C{commit} flushes it all the
        same.  For data nobody is expected to read back soon.
        """
        self._file.flush()
        writeUncached(self._file.fileno(), data)

    def commit(self, path: str, syncFolder: bool = True) -> None:
        """
        Flush the temporary file to disk and rename it to C{path} (which must
        be in the same folder), replacing any file there, then flush the
        folder.

        @param syncFolder: whether to flush the folder (pass L{False} when
            the caller does, once for several files).
        """
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(self._directory):
            raise ValueError(f"{path!r} is not in {self._directory!r}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tempPath, path)
        self._done = True
        if syncFolder:
            fsyncDir(self._directory)

    def abort(self) -> None:
        """
        Remove the temporary file, unless it was committed.  This never
        fails for want of space: on a full disk, closing the file cannot
        flush what is still buffered, and that goes with the file, whose
        space is given back.
        """
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        except OSError:
            # The flush failed (ENOSPC, EDQUOT, EIO); the file is closed
            # all the same.
            pass
        try:
            os.unlink(self.tempPath)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "AtomicFile":  # noqa: PYI034 (typing.Self is 3.11+)
        return self

    def __exit__(self, *excInfo: object) -> None:
        self.abort()


def writeUncached(fd: int, data) -> None:
    """
    Write all of C{data} to the file C{fd} at its position, the aligned
    part of it past the page cache (C{O_DIRECT}) where the file system
    allows it, the rest as a plain C{write} (blocking).

    A file written this way takes no pages of the page cache, and its
    writer does not fill fresh ones.  On a virtual machine that gives freed
    memory back to its host, a fresh page costs a fault in the host: on
    the benchmark's machine, writing 1.4 MB into a new file took 0.64-0.70
    ms of kernel time, against 0.16 ms over pages already cached, and it
    was a quarter of the CPU of a peer receiving 1 MB messages
    (benchmarks/README.md, "Where the rest goes").  The price is that a
    later read comes from the disk, so this is for data written to be kept
    rather than read back at once.  The file is not flushed: C{fsync} it as
    usual.

    Where C{O_DIRECT} cannot be had (another system, a file system without
    it such as older tmpfs, a position in the file that is not aligned),
    or is refused on a write, everything left is written the plain way.
    """
    view = memoryview(data).cast("B")
    done = 0
    if len(view) >= DIRECT_ALIGNMENT and os.lseek(fd, 0, os.SEEK_CUR) % DIRECT_ALIGNMENT == 0 and _direct(fd, True):
        try:
            done = _writeAligned(fd, view)
        finally:
            _direct(fd, False)
    while done < len(view):
        done += os.write(fd, view[done:])


def _writeAligned(fd: int, view: memoryview) -> int:
    """
    Write the longest aligned beginning of C{view} to C{fd}, which is in
    C{O_DIRECT} mode, through this thread's aligned buffer.

    @return: how many bytes were written: fewer than asked if a write
        was refused or short.
    """
    buffer = getattr(_directBuffers, "buffer", None)
    if buffer is None:
        # An anonymous mapping is page-aligned; kept for the thread's life,
        # its pages are touched once.
        buffer = _directBuffers.buffer = mmap.mmap(-1, DIRECT_BUFFER)
    done = 0
    aligned = len(view) - len(view) % DIRECT_ALIGNMENT
    while done < aligned:
        size = min(DIRECT_BUFFER, aligned - done)
        buffer[:size] = view[done : done + size]
        with memoryview(buffer) as whole, whole[:size] as chunk:
            try:
                written = os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                return done
        done += written
        if written != size:
            # A short write (a full disk says so on the next one): the
            # rest goes the plain way, from wherever this one stopped.
            return done
    return done


def _direct(fd: int, on: bool) -> bool:
    """
    Switch C{O_DIRECT} on or off for C{fd}.

    @return: whether that was done (L{False} where the system or the file
        system has no C{O_DIRECT}).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return True


STAGING_SIZE = 256 * 1024
"""
The block an L{UncachedAppender} writes past the page cache: its staging
buffer's size.  Each such write waits for the disk (about a quarter of a
millisecond here), so the blocks are kept small enough not to hold up
its caller's other work for long.
"""


class _StagingBuffers:
    """
    Page-aligned buffers of L{STAGING_SIZE} bytes, kept once used (up to
    C{keep} of them), so that their pages are fresh only once: see
    L{writeUncached} on what a fresh page costs.  Taken and given back
    from any thread.
    """

    def __init__(self, keep: int = 8) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, STAGING_SIZE)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)
                return
        buffer.close()


_stagingBuffers = _StagingBuffers()


class UncachedAppender:
    """
    A new file, written from its start, the way L{writeUncached} writes:
    past the page cache, in aligned blocks of L{STAGING_SIZE} bytes gathered
    in a staging buffer (taken at the first write from a few kept for
    reuse), with C{O_DIRECT}.  L{flush} writes what is gathered: its aligned
    part the same way, its last partial block the plain way; the file's end
    is then no longer aligned, so whatever is written after goes the plain
    way too.  A file smaller than a block is written the plain way at the
    flush, through the page cache.  Where C{O_DIRECT} cannot be had or is
    refused, blocks are written the plain way.

    Given a C{writer} (an executor of one thread, say), each full block is
    written by it while the caller goes on gathering the next in another
    buffer: a write past the cache waits for the disk, and the caller, a
    reactor, need not.  At most C{ahead} blocks are in its hands at once;
    the next full one waits for the oldest.  L{flush} waits for all.

    For a file written once and flushed to disk, such as a message in the
    spool: its writer fills no fresh page of the page cache, and a reader
    that wants to skip the page cache too can (L{readUncached}).  It has the
    binary file methods the spool uses: C{write}, C{flush}, C{fileno},
    C{close} and C{closed}.  A failed block write raises L{OSError} from the
    next C{write}, or from C{flush}, like a buffered file's.  Every write is
    made at its place in the file (C{pwrite}): the file's position does not
    move.
    """

    def __init__(
        self, fd: int, buffers: _StagingBuffers = _stagingBuffers, writer=None, ahead: int = 2
    ) -> None:
        self._fd = fd
        self._buffers = buffers
        self._writer = writer
        self._ahead = ahead
        self._buffer: mmap.mmap | None = None
        self._used = 0  # bytes gathered in the buffer
        self._offset = 0  # where in the file they go
        self._direct: bool | None = None  # unknown until the first block
        self._pending: collections.deque = collections.deque()  # (future, buffer) given to the writer
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed file")
        self._collect(wait=False)
        view = memoryview(data).cast("B")
        if self._direct is False:
            # Nothing more goes past the cache: nothing more is staged.
            if self._used:
                self._writeStaged(self._used)
            _pwriteAll(self._fd, view, self._offset)
            self._offset += len(view)
            return len(view)
        done = 0
        while done < len(view):
            if self._buffer is None:
                self._buffer = self._buffers.take()
            take = min(STAGING_SIZE - self._used, len(view) - done)
            self._buffer[self._used : self._used + take] = view[done : done + take]
            self._used += take
            done += take
            if self._used == STAGING_SIZE:
                self._blockFull()
        return len(view)

    def _blockFull(self) -> None:
        if self._direct is None:
            self._direct = _direct(self._fd, True)
        if self._writer is None or not self._direct:
            self._writeStaged(STAGING_SIZE)
            return
        buffer, offset = self._buffer, self._offset
        self._pending.append((self._writer.submit(self._writeBlock, buffer, STAGING_SIZE, offset), buffer))
        self._buffer, self._used = None, 0
        self._offset += STAGING_SIZE
        if len(self._pending) > self._ahead:
            self._collect(wait=True, count=len(self._pending) - self._ahead)

    def _writeBlock(self, buffer, size: int, offset: int) -> None:
        """
        Write the first C{size} bytes of C{buffer} at C{offset}, with
        C{O_DIRECT} if it is on (in any thread).
        """
        with memoryview(buffer) as whole, whole[:size] as block:
            done = 0
            if self._direct:
                try:
                    done = os.pwrite(self._fd, block, offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                if done != size:
                    # Refused, or short: the rest of the file the plain way,
                    # from wherever this write stopped.
                    self._plain()
            _pwriteAll(self._fd, block[done:], offset + done)

    def _writeStaged(self, size: int) -> None:
        """
        Write the first C{size} staged bytes (a multiple of
        L{DIRECT_ALIGNMENT}, unless C{O_DIRECT} is off) here and now, then
        keep the rest.
        """
        if self._direct is None:
            self._direct = _direct(self._fd, True)
        self._writeBlock(self._buffer, size, self._offset)
        self._offset += size
        rest = self._used - size
        if rest:
            self._buffer.move(0, size, rest)
        self._used = rest

    def _collect(self, wait: bool, count: int | None = None) -> None:
        """
        Take back the buffers of the blocks the writer is done with, first
        waiting for the oldest C{count} (all, if not given) if C{wait}.

        @raise OSError: the first failure of those blocks' writes.
        """
        error = None
        while self._pending:
            future, buffer = self._pending[0]
            if not future.done():
                if not wait or count == 0:
                    break
                concurrent.futures.wait([future])
            self._pending.popleft()
            self._buffers.give(buffer)
            if count:
                count -= 1
            if error is None:
                error = future.exception()
        if error is not None:
            raise error

    def _plain(self) -> None:
        if self._direct:
            _direct(self._fd, False)
        self._direct = False

    def flush(self) -> None:
        if self.closed:
            return
        self._collect(wait=True)
        if not self._used:
            return
        aligned = self._used - self._used % DIRECT_ALIGNMENT
        if aligned and self._direct:
            self._writeStaged(aligned)
        if self._used:
            # The last partial page; or all of a file smaller than a block,
            # for which the fresh pages cost less than one more wait for
            # the disk before the flush's own.
            self._plain()
            self._writeStaged(self._used)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            while self._pending:
                # Only if the flush was cut short before it collected them:
                # nothing may write to the file once it is closed.
                future, buffer = self._pending.popleft()
                concurrent.futures.wait([future])
                self._buffers.give(buffer)
            if self._buffer is not None:
                self._buffers.give(self._buffer)
                self._buffer = None
            os.close(self._fd)


def _pwriteAll(fd: int, view, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def readUncached(fd: int, size: int) -> bytes:
    """
    Read the first C{size} bytes of the file C{fd} past the page cache
    (C{O_DIRECT}, into this thread's page-aligned buffer, kept for the
    next read) where the file system allows it, else the plain way
    (blocking).  For a file written past the cache (L{UncachedAppender}):
    reading it the plain way would fill as many fresh pages of the page
    cache as writing it would have.  Less than a block (L{STAGING_SIZE})
    is read the plain way: an L{UncachedAppender} writes so small a file
    through the page cache.

    @return: the bytes read: fewer than C{size} if the file is shorter.
    """
    rounded = -(-size // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    if size >= STAGING_SIZE and _direct(fd, True):
        try:
            buffer = getattr(_directBuffers, "reading", None)
            if buffer is None or len(buffer) < rounded:
                # The old one is unmapped once nothing refers to it.
                buffer = _directBuffers.reading = mmap.mmap(-1, max(rounded, DIRECT_BUFFER))
            done = 0
            with memoryview(buffer) as whole:
                while done < size:
                    try:
                        n = os.preadv(fd, [whole[done:rounded]], done)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        break  # refused: the rest the plain way
                    if n <= 0:
                        break  # the end of the file, at a block's end
                    done += n
                    if done % DIRECT_ALIGNMENT:
                        break  # the end of the file, or a short read
                if done >= size:
                    return bytes(whole[:size])
                head = bytes(whole[:done])
        finally:
            _direct(fd, False)
        return head + os.pread(fd, size - done, done)
    return os.pread(fd, size, 0)


class HashingSink:
    """
    A file's C{write}, counting and hashing what goes through.

    @ivar hash: the SHA-256 of what was written so far.
    @ivar size: how many bytes were written so far.
    """

    def __init__(self, f) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self.hash.update(data)
        self.size += len(data)
        self._f.write(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)


def writeByDigest(directory: str, mode: int, spares, produce) -> tuple:
    """
    Write into a new temporary file of C{directory} what C{produce} writes,
    hashing it as it goes by (blocking); the caller then commits the file
    under its digest, or aborts it.

    @param spares: Empty files to take the new one from, if any (see
        L{AtomicFile}).
    @param produce: called with a binary file-like object that has
        C{write} and C{writelines} only.
    @return: the L{AtomicFile}, the digest, the size and what C{produce}
        returned.
    """
    f = AtomicFile(directory, mode, spares)
    try:
        sink = HashingSink(f)
        result = produce(sink)
    except BaseException:
        f.abort()
        raise
    return f, sink.hash.hexdigest(), sink.size, result


def storeByDigest(directory: str, mode: int, spares, produce, syncFolder: bool = True) -> tuple:
    """
    Store in C{directory}, under the SHA-256 of its bytes, what C{produce}
    writes (see L{writeByDigest}).

    @param syncFolder: whether to flush C{directory} now (pass L{False}
        when flushing it once for several files).
    @return: the digest, the size and what C{produce} returned.
    """
    f, digest, size, result = writeByDigest(directory, mode, spares, produce)
    with f:
        f.commit(os.path.join(directory, digest), syncFolder)
    return digest, size, result


def atomicWriteFrom(
    path: str, source: BinaryIO | Iterable[bytes], mode: int = 0o644
) -> int:
    """
    Atomically replace C{path} with the bytes of C{source}.

    @param path: The destination file.
    @param source: A binary file open for reading (read from its current
        position to its end, in chunks) or an iterable of L{bytes} chunks.
    @param mode: The permission bits of the new file.

    @return: The number of bytes written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    written = 0
    with AtomicFile(directory, mode) as f:
        for chunk in _chunksOf(source):
            f.write(chunk)
            written += len(chunk)
        f.commit(path)
    return written


def atomicWrite(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Atomically replace C{path} with C{data}.

    @param path: The destination file.
    @param data: Its new content.
    @param mode: The permission bits of the new file.
    """
    atomicWriteFrom(path, [data], mode)


def createSecretFile(path: str, data: bytes) -> None:
    """
    Create C{path}, readable by its owner only (0600), holding C{data}.

    The file must not exist (nor be a symbolic link): this never overwrites
    or follows anything.  A partly written file is removed.

    @raise FileExistsError: if C{path} exists.
    """
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        os.unlink(path)
        raise
    os.close(fd)
    fsyncDir(os.path.dirname(os.path.abspath(path)))


def isTempName(name: str) -> bool:
    """
    @return: whether C{name} (a bare file name) is one of our temporary files.
    """
    return name.startswith(TEMP_PREFIX)


def removeIfThere(path: str) -> None:
    """Remove the file at C{path}; one already gone is not an error."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def removeFromFolder(folder: str, names: Iterable[str]) -> None:
    """
    Remove the files C{names} from C{folder} (those already gone are not an
    error), then flush the folder once if any went.
    """
    removed = False
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed = True
    if removed:
        fsyncDir(folder)


class SpareFiles:
    """
    Files removed from a folder, kept empty to hold the next files written
    there (blocking; safe to call from several threads).

    A folder whose files come and go by the thousand (the outbox: one
    ciphertext per message, removed once its recipients have it) would
    otherwise free one inode and allocate another per file.  On ext4
    without a journal, every allocation then steps over each inode freed
    in the last minute or so (C{recently_deleted}): with a thousand freed,
    an allocation costs about a millisecond of kernel time.  An inode
    kept and reused costs neither.

    A removed file joins the spares only if it has no other name and nobody
    has it open (a Linux write lease is granted only then, see
    C{fcntl(2)}): a reader still on it, such as a download, keeps its
    bytes, and the file is unlinked as it would have been.  Nobody can
    open a spare afterwards: its name is in a private folder.  Where leases
    are not to be had, files are unlinked as usual.

    @ivar folder: The private folder the spares are kept in.
    """

    def __init__(self, folder: str, limit: int) -> None:
        """
        Take over C{folder} (created if need be): spares left there by an
        earlier run are emptied (nobody can have them open any more), and
        those over C{limit} removed.

        @param limit: How many spares to keep at most.
        """
        self.folder = folder
        self.limit = limit
        self._lock = threading.Lock()
        ensureDir(folder, 0o700)
        self._spares: list[str] = []
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue  # not ours: left alone
            if len(self._spares) < limit and _emptied(path):
                self._spares.append(path)
            else:
                _unlinkQuietly(path)

    def __len__(self) -> int:
        return len(self._spares)

    def retire(self, paths: Iterable[str]) -> None:
        """
        Remove the files C{paths} from their folder (those already gone are
        not an error), keeping as spares those nobody has open, while there
        is room.  Their folder is flushed before any is emptied: a crash
        cannot bring back an empty file under its old name.

        @param paths: Files of one folder, on this folder's file system.
        """
        moved, folders = [], set()
        for path in paths:
            with self._lock:
                room = len(self._spares) + len(moved) < self.limit
            spare = os.path.join(self.folder, secrets.token_hex(8))
            try:
                if room:
                    os.rename(path, spare)
                    moved.append(spare)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                continue
            folders.add(os.path.dirname(path))
        for folder in folders:
            fsyncDir(folder)
        kept = [spare for spare in moved if _emptiedIfUnused(spare) or _unlinkQuietly(spare)]
        with self._lock:
            self._spares.extend(kept)

    def take(self, directory: str) -> tuple[int, str] | None:
        """
        Move a spare into C{directory} under a fresh temporary name.

        @return: its file descriptor (open for writing, the file empty) and
            path, or L{None} if there is no spare.
        """
        while spare := self.claim(1):
            taken = moveSpareInto(spare[0], directory)
            if taken is not None:
                return taken
        return None

    def claim(self, count: int) -> list[str]:
        """
        Take up to C{count} spares off the list, for another process to
        move in with L{moveSpareInto} (not blocking: no file is touched).
        Those it does not use come back with L{giveBack}; should it die
        first, they stay in the spares' folder until the next start takes
        them back.

        @return: their paths.
        """
        with self._lock:
            count = min(count, len(self._spares))
            claimed = self._spares[len(self._spares) - count :]
            del self._spares[len(self._spares) - count :]
        return claimed

    def giveBack(self, paths: Iterable[str]) -> None:
        """Put back spares that L{claim} took and nobody used."""
        with self._lock:
            self._spares.extend(paths)


def moveSpareInto(spare: str, directory: str) -> tuple[int, str] | None:
    """
    Move the spare file C{spare} (see L{SpareFiles}) into C{directory} under
    a fresh temporary name.

    @return: its file descriptor (open for writing, the file empty) and
        path, or L{None} if it is gone.
    """
    temp = os.path.join(directory, TEMP_PREFIX + "spare-" + secrets.token_hex(8))
    try:
        os.rename(spare, temp)
    except FileNotFoundError:
        return None
    try:
        return os.open(temp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), temp
    except BaseException:
        _unlinkQuietly(temp)
        raise


def _emptied(path: str) -> bool:
    """Empty the regular file C{path}: whether it is one, and now empty."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _emptiedIfUnused(path: str) -> bool:
    """
    Empty the file C{path} if it has no other name and nobody else has it
    open (a write lease tells; it is given back before emptying, which does
    not wait on it).

    @return: whether it was emptied.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_nlink != 1:
            return False  # the same bytes under another name
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.ftruncate(fd, 0)
        return True
    except (OSError, AttributeError):
        # EAGAIN: open elsewhere; EINVAL, EACCES, no F_SETLEASE: no lease
        # to be had here.
        return False
    finally:
        os.close(fd)


def _unlinkQuietly(path: str) -> bool:
    """Unlink C{path} if it is there: L{False}, for use in expressions."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return False


def removeTempFiles(directory: str) -> list[str]:
    """
    Remove the temporary files a crash may have left in C{directory}.

    Only call this while nothing else writes to C{directory}.

    @return: The names removed.
    """
    removed = []
    for name in os.listdir(directory):
        if isTempName(name):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def _chunksOf(source: BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    """
    The chunks of a file open for reading, or those of an iterable.
    """
    read = getattr(source, "read", None)
    if read is None:
        yield from source  # type: ignore[misc]
        return
    while True:
        chunk = read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk
