# -*- test-case-name: tests.test_smtpdata,tests.test_smtp -*-
"""
The data of one submitted message, read from an SMTP session's input into
its spool file.

Only C{CRLF . CRLF} ends the data.  Complete lines are checked, dot-unstuffed
and written to the file a block at a time, with splits and scans in C, never
a loop over the lines in Python.  A refused message (a line too long, a bare
CR or LF, a NUL, too large) is swallowed up to its end, so nothing of its
body runs as a command; its file is removed at once.
"""

from __future__ import annotations

import zlib

from twisted.logger import Logger

from p2pmta.fileutil import removeIfThere
from p2pmta.spool import NO_SPACE, closeQuietly


class DataReader:
    """
    One message's data, from the C{354} reply to the final dot, into a file
    in the spool.  The limits and replies are those of
    L{p2pmta.smtpsession.SubmissionServer}.

    @ivar error: The reply (code, text) refusing the message, or L{None}.
    @ivar file: The spool file, open for writing; L{None} once discarded.
    @ivar path: The spool file's path.
    @ivar named: Whether the file's name was on disk before the data came.
    @ivar size: The bytes of the message so far, dot-unstuffed.
    @ivar written: The bytes written to the file so far.
    @ivar crc: The CRC-32 of the bytes written so far.
    """

    def __init__(
        self,
        openSpoolFile,
        received: bytes,
        maxMessageSize: int,
        maxLineLength: int,
        maxHeaderSize: int,
        log: Logger,
    ) -> None:
        """
        Open the spool file and write C{received} on top of the message; if
        that fails, L{error} says so.

        @param openSpoolFile: C{f()} returning a new spool file, open for
            writing, its path, and whether its name is on disk already.
        @param received: The trace header put on top of the message.
        @param maxMessageSize: The largest message, in bytes.
        @param maxLineLength: The longest line, CRLF included.
        @param maxHeaderSize: The largest header section, in bytes.
        @param log: Where to log spool errors (the session's log).
        """
        self._maxMessageSize = maxMessageSize
        self._maxLineLength = maxLineLength
        self._maxHeaderSize = maxHeaderSize
        self._log = log
        self._atLineStart = True
        self._inHeader = True
        self._headerSize = 0
        self.size = 0
        # The file's size and CRC-32, for the record.
        self.written, self.crc = len(received), zlib.crc32(received)
        self.error: tuple[int, str] | None = None
        self.file = None
        try:
            self.file, self.path, self.named = openSpoolFile()
            self.file.write(received)
        except OSError as e:
            self._fail(*self._spoolError(e))

    def scan(self, buffer: bytearray) -> bool:
        """
        Take the complete message lines out of C{buffer}.

        @return: whether the end of data was reached (C{CRLF . CRLF}, where
            the first CRLF may be the one that ended the previous line or the
            DATA command); what follows it stays in C{buffer}.
        """
        # The block of whole lines is copied out of the buffer once: a 1 MB
        # message comes in some twenty reads.
        if self._atLineStart and buffer.startswith(b".\r\n"):
            end, blockEnd, consumed = True, 0, 3
        else:
            # No dot, no end (base64 has none): a memchr instead of a search.
            at = buffer.find(b"\r\n.\r\n") if b"." in buffer else -1
            if at >= 0:
                end, blockEnd, consumed = True, at + 2, at + 5
            else:
                last = buffer.rfind(b"\r\n")
                end, blockEnd = False, last + 2 if last >= 0 else 0
                consumed = blockEnd
        with memoryview(buffer) as view:
            block = view[:blockEnd].tobytes()
        del buffer[:consumed]
        if block:
            self._atLineStart = True
            self._lines(block)
        if end:
            return True
        tail = buffer[:-1] if buffer.endswith(b"\r") else buffer
        if len(tail) > self._maxLineLength - 2:
            self._fail(
                500, "5.5.2 Message line longer than %d octets" % (self._maxLineLength,)
            )
            # Discard the line, up to its CRLF: what follows is no line start.
            buffer[:] = buffer[len(tail) :]
            self._atLineStart = False
        return False

    def _lines(self, raw: bytes) -> None:
        """
        Check, unstuff and store whole lines (C{raw} ends with CRLF, and
        starts a line unless the message is already refused).
        """
        if self.error is not None:
            return
        fault = lineFault(raw, self._maxLineLength - 2)
        if fault == "bare":
            self._fail(
                550, "5.5.2 Bare <CR> or <LF> in message: use <CR><LF> line ends"
            )
        elif fault == "long":
            self._fail(
                500, "5.5.2 Message line longer than %d octets" % (self._maxLineLength,)
            )
        elif b"\0" in raw:
            self._fail(550, "5.6.0 NUL character in message")
        if self.error is not None:
            return
        if b"." in raw and (raw.startswith(b".") or b"\n." in raw):
            data = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
        else:
            data = raw  # nothing dot-stuffed (base64 has no dots at all)
        self.size += len(data)
        if self._inHeader:
            blank = (b"\r\n" + data).find(b"\r\n\r\n")
            self._inHeader = blank < 0
            self._headerSize += len(data) if blank < 0 else blank
        if self.size > self._maxMessageSize:
            self._fail(552, "5.3.4 Message size exceeds fixed maximum message size")
        elif self._headerSize > self._maxHeaderSize:
            self._fail(552, "5.3.4 Message header section too large")
        else:
            try:
                self.file.write(data)
                self.written += len(data)
                self.crc = zlib.crc32(data, self.crc)
            except OSError as e:
                self._fail(*self._spoolError(e))

    def _spoolError(self, error: OSError) -> tuple[int, str]:
        """
        Log a failed write to the spool (in an C{except} block).

        @return: the reply: C{452 4.3.1} if the file system is full (the
            client tries again later), else C{451 4.3.0}.
        """
        if error.errno in NO_SPACE:
            self._log.warn("cannot spool a message: {error}", error=str(error))
            return 452, "4.3.1 Insufficient system storage"
        self._log.failure("cannot spool a message")
        return 451, "4.3.0 Cannot spool the message, try again later"

    def _fail(self, code: int, text: str) -> None:
        """
        Refuse the message: swallow the rest of its data, then answer this.
        """
        if self.error is None:
            self.error = (code, text)
            self.discard()

    def discard(self) -> None:
        """
        Close and remove the spool file, if still here: the message is
        refused, or its session is gone.
        """
        f, self.file = self.file, None
        if f is not None:
            closeQuietly(f)
            removeIfThere(self.path)


def lineFault(raw: bytes, limit: int) -> str | None:
    """
    What is wrong with the lines of C{raw} (a block that ends with CRLF):
    C{"bare"} if it holds a CR or LF that is not part of a CRLF, else
    C{"long"} if a line is longer than C{limit} octets (its CRLF aside),
    else L{None}.

    One split and a few scans in C, no loop over the lines in Python: a
    1 MB message is some 19,000 lines, read 64 KiB at a time.  Lines all of
    one width, as base64 is written, need no split: strided slices find
    their CRLFs, and taking out the CRs, then the LFs, shows there is no
    other CR or LF.  That is half the time of counting them: a C{replace}
    finds each with C{memchr}, a C{count} of one byte looks at every byte.
    """
    first = raw.find(b"\r\n")
    width = first + 2
    if 0 <= first <= limit and len(raw) % width == 0:
        k = len(raw) // width
        if (
            raw[first::width] == b"\r" * k
            and raw[width - 1 :: width] == b"\n" * k
            and len(raw.replace(b"\n", b"")) == len(raw) - k
            and len(raw.replace(b"\r", b"")) == len(raw) - k
        ):
            return None
    lines = raw.split(b"\r\n")
    rest = b"".join(lines)
    if b"\r" in rest or b"\n" in rest:
        return "bare"
    if max(map(len, lines)) > limit:
        return "long"
    return None
