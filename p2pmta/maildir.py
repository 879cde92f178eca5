# -*- test-case-name: tests.test_mailstore,tests.test_mailbodies -*-
"""
The mail store's message files: a Maildir whose files are written to
C{tmp/}, fsynced and renamed into C{cur/}, each under a new unique name.

Flags live in SQLite, not in the names; a small pulled body is not given a
file at all but left to the database (L{IN_DATABASE}).  Everything here
blocks: L{p2pmta.mailstore.MailStore} runs it in its threadpool.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Iterable

from p2pmta.errors import HeaderMismatch
from p2pmta.fileutil import (
    CHUNK_SIZE,
    AtomicFile,
    ensureDir,
    fsyncDir,
    removeFromFolder,
    removeTempFiles,
)

#: The suffix of our Maildir file names (Maildir "info" with no flags: flags
#: live in SQLite).  A crash between writing a file and committing its row
#: may leave a file no row names; it is kept, never deleted at start.
_MAILDIR_SUFFIX = ".p2pmta:2,"

#: Pulled bodies up to this size are kept in the database (the table
#: C{mail_bodies}), not each in a file of its own: a group of them is one
#: transaction and one flush, where a file each costs an inode, a flush and
#: two renames (about 1 ms each on a file system that deleted many files
#: lately).  Dovecot's dbox keeps many messages per file for the same reason.
DATABASE_BODY = 256 * 1024

#: The C{filename} of a message whose body is in C{mail_bodies}: no Maildir
#: file is ever named so (see L{Maildir.newName}).
IN_DATABASE = "(database)"


class Maildir:
    """
    The folders C{tmp/}, C{new/} and C{cur/} of a mail store, and the
    message files in C{cur/}, known by their names there.

    @ivar tmp: The path of C{tmp/}.
    @ivar cur: The path of C{cur/}.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The Maildir; C{tmp/}, C{new/} and C{cur/} are created
            in it (mode 0700) by L{create}.
        """
        self._path = path
        self.tmp = os.path.join(path, "tmp")
        self.cur = os.path.join(path, "cur")

    def create(self) -> None:
        """
        Create the folders that are missing, and remove what a crash left
        in C{tmp/}.
        """
        for sub in ("tmp", "new", "cur"):
            ensureDir(os.path.join(self._path, sub), 0o700)
        removeTempFiles(self.tmp)

    def filePath(self, name: str) -> str:
        """@return: the path of the file C{name} in C{cur/}."""
        return os.path.join(self.cur, name)

    def holds(self, name: str) -> bool:
        """@return: whether C{cur/} has a file C{name}."""
        return os.path.isfile(os.path.join(self.cur, name))

    def sync(self) -> None:
        """Flush C{cur/}, for the callers that leave it to later."""
        fsyncDir(self.cur)

    def newName(self) -> str:
        return f"{int(time.time())}.{uuid.uuid4().hex}{_MAILDIR_SUFFIX}"

    def _intoMaildir(self, name: str, tempPath: str, syncDir: bool = True) -> None:
        """
        Rename the fsynced C{tempPath} (in C{tmp/}) to C{cur/name}.
        """
        os.replace(tempPath, os.path.join(self.cur, name))
        if syncDir:
            fsyncDir(self.cur)

    def writeMessage(self, data: bytes, sync: bool = True, cached: bool = True) -> str:
        """
        Write C{data} into the Maildir, through C{tmp/} (the file flushed).

        @param sync: flush the folders too (pass L{False} when the caller
            flushes C{cur/}, once for several files).
        @param cached: L{False} to write it past the page cache (see
            L{p2pmta.fileutil.writeUncached}), for a message its reader has
            in memory already.
        @return: its name in C{cur/}.
        """
        name = self.newName()
        with AtomicFile(self.tmp, 0o600) as f:
            if cached:
                f.write(data)
            else:
                f.writeUncached(data)
            f.commit(os.path.join(self.tmp, name), sync)
        self._intoMaildir(name, os.path.join(self.tmp, name), sync)
        return name

    def takeFile(
        self, path: str, headers: bytes, syncDir: bool = True, syncFile: bool = True
    ) -> tuple[str, int]:
        """
        Move the file at C{path} into the Maildir if it starts with exactly
        C{headers}.  On failure it is left at C{path}.

        @param syncDir: fsync C{cur/} (pass L{False} when the caller does,
            once for several files).
        @param syncFile: fsync the file (pass L{False} for one the caller
            has flushed to disk already).
        @return: its name in C{cur/} and its size.
        """
        with open(path, "rb") as f:
            if f.read(len(headers)) != headers:
                raise HeaderMismatch(path)
            st = os.fstat(f.fileno())
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(f.fileno(), 0o600)
            if syncFile:
                os.fsync(f.fileno())
        name = self.newName()
        # The file is whole already: straight into cur/, not through tmp/.
        try:
            os.rename(path, os.path.join(self.cur, name))
        except OSError:
            temp = os.path.join(self.tmp, name)
            with open(path, "rb") as source, AtomicFile(self.tmp, 0o600) as f:
                while chunk := source.read(CHUNK_SIZE):
                    f.write(chunk)
                f.commit(temp)
            size = os.stat(temp).st_size
            try:
                self._intoMaildir(name, temp, syncDir)
            except BaseException:
                os.unlink(temp)
                raise
            os.unlink(path)
            return name, size
        if syncDir:
            fsyncDir(self.cur)
        return name, st.st_size

    def takeBytes(self, data: bytes, headers: bytes) -> tuple[str, int]:
        """
        Write the message C{data} into the Maildir (through C{tmp/}, flushed,
        past the page cache) if it starts with exactly C{headers}; C{cur/}
        is not flushed.  One of at most L{DATABASE_BODY} bytes is left to
        the caller to put in the database.

        @return: its name in C{cur/} (or L{IN_DATABASE}) and its size.
        """
        if not data.startswith(headers):
            raise HeaderMismatch("the pulled message")
        if len(data) <= DATABASE_BODY:
            return IN_DATABASE, len(data)
        # Its reader was served from memory (see MailBodies._pull); filling
        # fresh pages of the page cache with it costs more than the disk.
        return self.writeMessage(data, sync=False, cached=False), len(data)

    def copyFile(self, filename: str) -> str:
        """
        Give the file C{filename} of C{cur/} a second name there: a hard
        link, or a copy where linking fails (the caller flushes C{cur/}).

        @return: the new name.
        """
        name = self.newName()
        old = os.path.join(self.cur, filename)
        try:
            os.link(old, os.path.join(self.cur, name))
        except OSError:
            with open(old, "rb") as f:
                self._writeMessageFrom(f, name)
        return name

    def _writeMessageFrom(self, source, name: str) -> None:
        with AtomicFile(self.tmp, 0o600) as f:
            while chunk := source.read(CHUNK_SIZE):
                f.write(chunk)
            f.commit(os.path.join(self.tmp, name))
        self._intoMaildir(name, os.path.join(self.tmp, name))

    def removeFiles(self, names: Iterable[str]) -> None:
        removeFromFolder(self.cur, [name for name in names if name != IN_DATABASE])
