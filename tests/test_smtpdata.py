"""
Tests for L{p2pmta.smtpdata}: the checks on a block of message lines.  The
data phase as a whole is tested through the session in L{tests.test_smtp}.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.smtpdata import _longestLine


class LongestLineTests(SynchronousTestCase):
    """
    L{_longestLine} finds a line over the limit without splitting the block
    into lines: it must agree with splitting.
    """

    @settings(max_examples=500, deadline=None)
    @given(
        limit=st.integers(0, 40),
        lengths=st.lists(st.integers(0, 130), min_size=1, max_size=12),
    )
    def test_agreesWithSplitting(self, limit, lengths):
        raw = b"".join(b"x" * n + b"\r\n" for n in lengths)
        self.assertEqual(_longestLine(raw, limit), max(lengths) > limit)

    def test_longLineInLargeBlock(self):
        """One line of 999 octets among 19,000 short ones is found."""
        lines = [b"A" * 76] * 19_000
        lines[12_345] = b"B" * 999
        raw = b"".join(line + b"\r\n" for line in lines)
        self.assertTrue(_longestLine(raw, 998))
        lines[12_345] = b"B" * 998
        self.assertFalse(_longestLine(b"".join(line + b"\r\n" for line in lines), 998))
