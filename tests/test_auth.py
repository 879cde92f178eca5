"""
The one cred realm of SMTP and IMAP.
"""

from twisted.cred import error
from twisted.cred.credentials import UsernamePassword
from twisted.internet.task import Clock
from twisted.mail.imap4 import IAccount
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.address import Address
from p2pmta.auth import FIRST_FAILURE_DELAY, MAX_FAILURE_DELAY, makePortal


class Avatar:
    loggedOut = False

    def logout(self):
        self.loggedOut = True


class PortalTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.avatar = Avatar()
        self.portal = makePortal(self.clock, Address("alice", "demo"), "s3cret", {IAccount: lambda: self.avatar})

    def login(self, user, password):
        return self.portal.login(UsernamePassword(user, password), None, IAccount)

    def test_localUser(self):
        """The peer's address (any case) and password log in."""
        iface, avatar, logout = self.successResultOf(self.login(b"Alice@Demo", b"s3cret"))
        self.assertIs(avatar, self.avatar)
        logout()
        self.assertTrue(self.avatar.loggedOut)

    def test_wrongCredentialsSlowed(self):
        """Failures are answered after a delay that doubles, up to a cap."""
        delays = []
        for _ in range(8):
            d = self.login(b"alice@demo", b"guess")
            self.assertNoResult(d)
            waited = 0.0
            while not d.called:
                self.clock.advance(0.05)
                waited += 0.05
            self.failureResultOf(d, error.UnauthorizedLogin)
            delays.append(round(waited, 2))
        self.assertAlmostEqual(delays[0], FIRST_FAILURE_DELAY, delta=0.06)
        self.assertAlmostEqual(delays[1], 2 * FIRST_FAILURE_DELAY, delta=0.06)
        self.assertAlmostEqual(delays[-1], MAX_FAILURE_DELAY, delta=0.06)
        # A good login resets the count.
        self.successResultOf(self.login(b"alice@demo", b"s3cret"))
        d = self.login(b"alice@demo", b"guess")
        self.clock.advance(FIRST_FAILURE_DELAY)
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_otherUser(self):
        """Another user name, or garbage, is refused the same way."""
        for user in (b"bob@demo", b"not an address", b"\xff"):
            d = self.login(user, b"s3cret")
            self.clock.advance(MAX_FAILURE_DELAY)
            self.failureResultOf(d, error.UnauthorizedLogin)
