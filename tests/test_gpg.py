"""
Tests for L{p2pmta.gpg}.  What runs gpg is tested through the keyring, in
C{tests.test_crypto}.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.gpg import uidEmail

_EMAIL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+"


class UserIdTests(SynchronousTestCase):
    """
    Tests for L{uidEmail}.
    """

    @given(st.from_regex(_EMAIL, fullmatch=True), st.sampled_from(["", "Bob ", "A B "]))
    def test_email(self, address, name):
        """
        The address of C{address}, C{<address>} and C{Name <address>} is C{address}.
        """
        self.assertEqual(uidEmail(address), address.lower())
        self.assertEqual(uidEmail(f"{name}<{address}>"), address.lower())

    def test_notAnAddress(self):
        """
        A user id without an address has no address.
        """
        self.assertIsNone(uidEmail("Alice"))
        self.assertIsNone(uidEmail("Alice x@y z"))
