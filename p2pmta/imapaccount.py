# -*- test-case-name: tests.test_imapaccount -*-
"""
The IMAP avatar of the peer's one user: an L{Account} over the mail store's
fixed mailboxes (Twisted's L{twisted.mail.imap4.IAccount}, which the cred
realm hands out), and the L{MailboxInfo} LIST shows of each.  Selecting a
mailbox gives the session its own L{p2pmta.imapmailbox.SelectedMailbox}.
"""

from __future__ import annotations

import re

from twisted.mail.imap4 import (
    IAccount,
    IMailboxInfo,
    INamespacePresenter,
    MailboxException,
)
from zope.interface import implementer

from p2pmta import imapsyntax
from p2pmta.imapmailbox import SelectedMailbox
from p2pmta.errors import NoSuchMailbox


@implementer(IMailboxInfo)
class MailboxInfo:
    """
    What LIST shows of a mailbox: C{attributes} are mailbox attributes
    (e.g. C{\\Sent}), never message flags.
    """

    def __init__(self, name: str, attributes) -> None:
        self.name = name
        self.attributes = ["\\HasNoChildren", *attributes]

    def getFlags(self) -> list:
        return list(imapsyntax.SYSTEM_FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"


@implementer(IAccount, INamespacePresenter)
class Account:
    """
    The IMAP avatar of the peer's one user: the store's fixed mailboxes.
    """

    def __init__(self, store) -> None:
        self.store = store

    def listMailboxes(self, ref, wildcard) -> list:
        ref = ref.decode("imap4-utf-7") if isinstance(ref, bytes) else ref
        wildcard = (
            wildcard.decode("imap4-utf-7") if isinstance(wildcard, bytes) else wildcard
        )
        pattern = "".join(
            ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c)
            for c in ref + wildcard
        )
        found = []
        for name, attributes in self.store.mailboxNames():
            flags = re.IGNORECASE if name == "INBOX" else 0
            if re.fullmatch(pattern, name, flags):
                found.append((name, MailboxInfo(name, attributes)))
        return found

    def select(self, name, rw=True):
        name = name.decode("imap4-utf-7") if isinstance(name, bytes) else name
        try:
            self.store.uidValidity(name)
        except NoSuchMailbox:
            return None
        return SelectedMailbox(
            self.store, "INBOX" if name.upper() == "INBOX" else name, rw
        )

    def _fixed(self, *args, **kwargs):
        raise MailboxException("this server's mailboxes are fixed")

    addMailbox = create = delete = rename = _fixed

    def isSubscribed(self, name) -> bool:
        return True

    def subscribe(self, name) -> bool:
        return True

    def unsubscribe(self, name) -> bool:
        return True

    def getPersonalNamespaces(self):
        return [["", "/"]]

    def getSharedNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None


def makeAccount(store) -> Account:
    """
    The IMAP avatar factory for the cred realm:
    C{{IAccount: lambda: makeAccount(store)}}.
    """
    return Account(store)
