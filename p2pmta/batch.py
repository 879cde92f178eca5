# -*- test-case-name: tests.test_web -*-
"""
Several ciphertexts in one HTTP answer: what C{/outbox/batch} serves (see
L{p2pmta.web}) and a receiver pulls (see L{p2pmta.receiving}).

For each digest asked for, in the order asked, the answer holds the line
C{<digest> <size>\\r\\n} and then the C{size} bytes of that ciphertext, or,
for one the outbox does not hold, the line C{<digest> -\\r\\n}.  The writer
streams it one file after the other and never lets a shorter file pass as
whole; the reader holds it to what was asked.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

from p2pmta.errors import FetchError

MAX_PULL_BATCH = 64
"""The most ciphertexts one batch may ask for."""


class BatchProducer:
    """
    Writes a batch answer as the client reads it: a pull producer, like
    Twisted's L{static.NoRangeStaticProducer}, which writes about
    L{bufferSize} bytes each time the transport asks for more (several
    small ciphertexts at a time).
    """

    log = Logger()

    bufferSize = 64 * 1024

    def __init__(self, request, outbox, digests: list) -> None:
        self.request = request
        self._outbox = outbox
        self._digests = digests
        self._next = 0
        self._file = None
        self._left = 0

    def start(self) -> None:
        self.request.registerProducer(self, False)

    def _open(self, digest: str):
        """The open file of C{digest} and its size, or L{None}."""
        path = self._outbox.path(digest)
        if path is None:
            return None
        try:
            f = open(path.path, "rb")
        except OSError:
            return None
        try:
            size = os.fstat(f.fileno()).st_size
        except OSError:
            f.close()
            return None
        return f, size

    def resumeProducing(self) -> None:
        if self.request is None:
            return
        out: list = []
        room = self.bufferSize
        while room > 0:
            if self._file is None:
                if self._next == len(self._digests):
                    break
                digest = self._digests[self._next]
                self._next += 1
                opened = self._open(digest)
                if opened is None:
                    out.append(b"%s -\r\n" % (digest.encode("ascii"),))
                    continue
                self._file, self._left = opened
                out.append(b"%s %d\r\n" % (digest.encode("ascii"), self._left))
            data = self._file.read(min(room, self._left)) if self._left else b""
            if self._left and not data:
                # Shorter than its line said: never let that pass as whole.
                self.log.warn("a ciphertext shrank while it was served")
                request = self.request
                self.stopProducing()
                request.transport.abortConnection()
                return
            out.append(data)
            room -= len(data)
            self._left -= len(data)
            if not self._left:
                self._file.close()
                self._file = None
        if out:
            self.request.write(b"".join(out))
        if self._file is None and self._next == len(self._digests):
            request = self.request
            self.request = None
            request.unregisterProducer()
            request.finish()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.request = None


class BatchReader:
    """
    Splits a batch answer into its
    ciphertexts, as it arrives, holding the framing to what was asked.

    @ivar maxSize: the most bytes the answer may have.
    """

    _maxLine = 64 + 1 + 20 + 2

    def __init__(self, expected: dict, arrived) -> None:
        """
        @param expected: C{{digest: size}} of the ciphertexts asked for.
        @param arrived: called with (digest, ciphertext) for each one whole.
        """
        self._expected = dict(expected)
        self._arrived = arrived
        self._line = b""
        self._digest: str | None = None
        self._chunks: list = []
        self._left = 0
        self.maxSize = sum(expected.values()) + len(expected) * self._maxLine

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._digest is None:
                view = self._readLine(view)
                continue
            take = view[: self._left]
            self._chunks.append(bytes(take))
            self._left -= len(take)
            view = view[len(take) :]
            if not self._left:
                self._finishItem()

    def _readLine(self, view: memoryview) -> memoryview:
        end = bytes(view[: self._maxLine]).find(b"\n")
        if end < 0:
            self._line += bytes(view)
            if len(self._line) > self._maxLine:
                raise FetchError("a batch answer has a line too long")
            return view[len(view) :]
        line, view = self._line + bytes(view[:end + 1]), view[end + 1 :]
        self._line = b""
        if len(line) > self._maxLine or not line.endswith(b"\r\n"):
            raise FetchError("a batch answer has a malformed line")
        digest, _, size = line[:-2].decode("ascii", "replace").partition(" ")
        if digest not in self._expected:
            raise FetchError("a batch answer holds what was not asked for")
        expected = self._expected.pop(digest)
        if size == "-":
            return view
        if size != str(expected):
            raise FetchError("a batch answer's ciphertext has the wrong size")
        self._digest, self._left = digest, expected
        if not expected:
            self._finishItem()
        return view

    def _finishItem(self) -> None:
        digest, self._digest = self._digest, None
        data = b"".join(self._chunks)
        self._chunks = []
        self._arrived(digest, data)

    def end(self) -> None:
        """The answer ended: it must have ended between two ciphertexts."""
        if self._digest is not None or self._line:
            raise FetchError("a batch answer was cut short")
