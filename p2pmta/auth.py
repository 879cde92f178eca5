# -*- test-case-name: tests.test_auth -*-
"""
One cred realm for SMTP and IMAP: the peer's single local user logs in with
the peer's address as user name and C{--password}.  Failed attempts are
answered more and more slowly.
"""

from __future__ import annotations

import hmac

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from p2pmta.address import Address
from p2pmta.errors import BadAddress

#: Delay of the first failed login, doubled for each further failure in a
#: row, up to L{MAX_FAILURE_DELAY}.
FIRST_FAILURE_DELAY = 0.25
MAX_FAILURE_DELAY = 8.0


@implementer(ICredentialsChecker)
class LocalUserChecker:
    """
    Accepts the one local user.  After a failure, the next failures wait
    longer before they are answered, so guessing the password is slow.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)
    log = Logger()

    def __init__(self, clock, address: Address, password: str) -> None:
        self._clock = clock
        self._address = address
        self._password = password.encode("utf-8")
        self._failures = 0

    def requestAvatarId(self, creds) -> Deferred:
        username = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password = creds.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            who = Address.parse(username)
        except BadAddress:
            who = None
        if who == self._address and hmac.compare_digest(password, self._password):
            self._failures = 0
            return succeed(str(self._address).encode("ascii"))
        self._failures += 1
        delay = min(FIRST_FAILURE_DELAY * 2 ** (self._failures - 1), MAX_FAILURE_DELAY)
        self.log.warn("failed login as {user!r} ({n} in a row)", user=username[:100], n=self._failures)
        return deferLater(self._clock, delay, lambda: None).addCallback(
            lambda _: fail(error.UnauthorizedLogin("wrong user name or password"))
        )


@implementer(IRealm)
class LocalRealm:
    """
    Hands out the local user's avatars: C{factories} maps an interface
    (e.g. L{twisted.mail.imap4.IAccount}) to a callable of no argument
    returning the avatar.
    """

    def __init__(self, factories: dict) -> None:
        self._factories = factories

    def requestAvatar(self, avatarId, mind, *interfaces):
        for iface in interfaces:
            factory = self._factories.get(iface)
            if factory is not None:
                avatar = factory()
                logout = getattr(avatar, "logout", lambda: None)
                return iface, avatar, logout
        raise NotImplementedError("no avatar for these interfaces")


def makePortal(clock, address: Address, password: str, factories: dict) -> Portal:
    """
    @return: the portal SMTP and IMAP log in through.
    """
    return Portal(LocalRealm(factories), [LocalUserChecker(clock, address, password)])
