"""
Tests for L{p2pmta.smtpdata}: the checks on a block of message lines.  The
data phase as a whole is tested through the session in L{tests.test_smtp}.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.smtpdata import lineFault


def _byLines(raw: bytes, limit: int):
    """L{lineFault} the slow way, a line at a time."""
    assert raw.endswith(b"\r\n")
    lines, rest = [], raw
    while rest:
        cr = rest.find(b"\r")
        lf = rest.find(b"\n")
        if cr < 0 or lf != cr + 1 or rest.find(b"\n", 0, cr) >= 0:
            return "bare"
        lines.append(rest[:cr])
        rest = rest[lf + 1 :]
    return "long" if any(len(line) > limit for line in lines) else None


class LineFaultTests(SynchronousTestCase):
    """
    L{lineFault} finds bare line ends and long lines with splits and scans
    in C: it must agree with reading line by line.
    """

    @settings(max_examples=1000, deadline=None)
    @given(
        limit=st.integers(0, 40),
        pieces=st.lists(
            st.one_of(
                st.integers(0, 60).map(lambda n: b"x" * n),
                st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n", b"\r\n\n"]),
            ),
            max_size=12,
        ),
    )
    def test_agreesWithLineByLine(self, limit, pieces):
        raw = b"".join(pieces) + b"\r\n"
        self.assertEqual(lineFault(raw, limit), _byLines(raw, limit))

    @settings(max_examples=1000, deadline=None)
    @given(
        limit=st.integers(0, 12),
        width=st.integers(0, 12),
        count=st.integers(1, 8),
        changes=st.lists(
            st.tuples(st.integers(0, 200), st.sampled_from([b"\r", b"\n", b"x", b"\r\n", b""])),
            max_size=2,
        ),
    )
    def test_evenLinesAgreeWithLineByLine(self, limit, width, count, changes):
        """
        Blocks of lines all of one width (the case with no split), and such
        blocks with a byte or two changed, added or taken out, are judged
        as line by line.
        """
        raw = (b"y" * width + b"\r\n") * count
        for at, put in changes:
            at %= len(raw) or 1
            raw = raw[:at] + put + raw[at + 1 :]
        if not raw.endswith(b"\r\n"):
            raw += b"\r\n"
        self.assertEqual(lineFault(raw, limit), _byLines(raw, limit))

    def test_longLineInLargeBlock(self):
        """One line of 999 octets among 19,000 short ones is found."""
        lines = [b"A" * 76] * 19_000
        lines[12_345] = b"B" * 999
        raw = b"".join(line + b"\r\n" for line in lines)
        self.assertEqual(lineFault(raw, 998), "long")
        lines[12_345] = b"B" * 998
        self.assertIsNone(lineFault(b"".join(line + b"\r\n" for line in lines), 998))

    def test_bareBeforeLong(self):
        """A block with both faults is refused for its bare line end."""
        self.assertEqual(lineFault(b"x" * 2000 + b"\r\ny\nz\r\n", 998), "bare")
