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

import os
import tempfile
from collections.abc import Iterable
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
"""
The prefix of every temporary file made here.  It starts with a dot, so no
hex digest (nor any other name our stores use for real files) can carry it.
"""

CHUNK_SIZE = 64 * 1024
"""How many bytes to read at a time when copying from a file."""


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

    def __init__(self, directory: str, mode: int = 0o644) -> None:
        """
        @param directory: The folder the final file will be in.
        @param mode: The permission bits of the final file.
        """
        self._directory = directory
        fd, self.tempPath = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
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
