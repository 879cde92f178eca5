# -*- test-case-name: tests.test_piecesender,tests.test_imap,tests.test_hostile_imap -*-
"""
Streaming an answer to a slow client: a L{PieceSender} writes pieces, the
L{bytes} made for it and L{FileRange}s of message files read in chunks, to
a transport as fast as the client takes them.  FETCH answers through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure


@dataclass(frozen=True)
class FileRange:
    """
    C{length} bytes of the file at C{path} from C{offset}; read through
    C{handle} when given (a file opened before the message was expunged
    stays readable).
    """

    path: str
    offset: int
    length: int
    handle: object = field(default=None, compare=False)


class PieceSender:
    """
    Writes a stream of pieces (L{bytes} and L{FileRange}s) to a transport
    while C{canWrite()} says the transport keeps up, reading files in
    chunks; L{resume} goes on when it has drained.  A file that turns out
    shorter than announced is padded, so the client's literal count stays
    right.  A L{Deferred} in the stream is waited for (what it fires with
    is dropped): the pieces after it are made only then.
    """

    log = Logger()
    chunkSize = 64 * 1024

    def __init__(self, transport, pieces, canWrite=lambda: True, abort=None) -> None:
        """
        @param canWrite: Called before each write: whether the transport
            still takes data (the session's producer is not paused).
        @param abort: Called to drop the connection when writing fails
            (C{transport.loseConnection} by default).
        """
        self._transport = transport
        self._pieces = iter(pieces)
        self._canWrite = canWrite
        self._abort = abort or transport.loseConnection
        self._file = None
        self._ownFile = True
        self._left = 0
        self._done: Deferred = Deferred()
        self._finished = False
        self._waiting = False
        self._writing = False

    def start(self) -> Deferred:
        """
        @return: a Deferred firing when everything is written.
        """
        self.resume()
        return self._done

    def resume(self) -> None:
        """
        Write until done or until the transport has enough.  Pieces are
        gathered into writes of about L{chunkSize} bytes: a FETCH response
        is many small pieces, and each write costs about as much as a
        small piece's making.  Files are read L{chunkSize} bytes at a
        time, but a message held in memory (a body just pulled, its handle
        an L{io.BytesIO}) is written in one piece: its bytes are there
        already, and in chunks the session would pause and resume for
        every one the client takes.
        """
        if self._writing:
            return  # a Deferred waited for fired at once: the loop goes on
        self._writing = True
        out: list = []
        size = 0
        try:
            while not (self._finished or self._waiting) and self._canWrite():
                if self._left:
                    inMemory = isinstance(self._file, io.BytesIO)
                    data = (
                        self._file.read(self._left if inMemory else min(self._left, self.chunkSize))
                        if self._file
                        else b""
                    )
                    if not data:
                        data = b" " * min(self._left, self.chunkSize)
                    self._left -= len(data)
                    if not self._left:
                        self._closeFile()
                else:
                    piece = next(self._pieces, None)
                    if isinstance(piece, FileRange):
                        self._left = piece.length
                        self._openFile(piece)
                        continue
                    if piece is None or isinstance(piece, Deferred):
                        # The end, or a wait: what is gathered goes first.
                        self._write(out)
                        out, size = [], 0
                        if piece is None:
                            self._finish(None)
                        else:
                            self._waiting = True
                            piece.addBoth(self._waited)
                        continue
                    data = piece
                if len(data) > self.chunkSize and out:
                    # Not copied into a join with what was gathered.
                    self._write(out)
                    out, size = [], 0
                out.append(data)
                size += len(data)
                if size >= self.chunkSize:
                    self._write(out)
                    out, size = [], 0
            self._write(out)
        except Exception:
            self.log.failure("writing a FETCH response failed")
            self._abort()
            self._finish(Failure())
        finally:
            self._writing = False

    def _write(self, pieces: list) -> None:
        if pieces:
            self._transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _waited(self, result) -> None:
        self._waiting = False
        if isinstance(result, Failure):
            self.log.failure("a FETCH response waited for a failure", result)
        self.resume()

    def _openFile(self, piece: FileRange) -> None:
        self._ownFile = piece.handle is None
        try:
            if self._ownFile:
                self._file = open(piece.path, "rb")  # noqa: SIM115
            else:
                self._file = piece.handle
            self._file.seek(piece.offset)
        except OSError:
            self.log.warn("message file {path} vanished", path=piece.path)
            self._file = None

    def _closeFile(self) -> None:
        if self._file is not None:
            if self._ownFile:
                self._file.close()
            self._file = None

    def _closePieces(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def _finish(self, result) -> None:
        if self._finished:
            return
        self._finished = True
        self._closeFile()
        self._closePieces()
        if isinstance(result, Failure):
            self._done.errback(result)
        else:
            self._done.callback(result)

    def stop(self) -> None:
        """
        The connection is gone: give up.
        """
        self._finish(Failure(ConnectionError("connection lost")))
