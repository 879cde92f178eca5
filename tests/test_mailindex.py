"""
Tests for L{p2pmta.mailindex}.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.mailindex import splitHeaders


class SplitHeadersTests(SynchronousTestCase):
    """
    Tests for L{splitHeaders}.
    """

    @given(
        st.lists(
            st.from_regex(rb"[A-Za-z-]{1,10}: [ -~]{0,30}\r\n", fullmatch=True),
            max_size=5,
        ),
        st.binary(max_size=50),
    )
    def test_headerSectionWithBlankLine(self, fields, body) -> None:
        """
        The header section is everything up to and including the first
        blank line, whatever the body holds.
        """
        headers = b"".join(fields) + b"\r\n"
        self.assertEqual(splitHeaders(headers + body), headers)

    def test_noBlankLine(self) -> None:
        """
        A message without a blank line is all header.
        """
        self.assertEqual(splitHeaders(b"Subject: x\r\n"), b"Subject: x\r\n")
