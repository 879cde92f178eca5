"""
Tests for L{p2pmta.imapaccount}.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.mail.imap4 import IAccount, IMailboxInfo, ISearchableMailbox
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from p2pmta.imapaccount import Account, makeAccount
from p2pmta.mailstore import MailStore


class AccountTests(TestCase):
    """
    Tests for L{Account} and its mailboxes.
    """

    @inlineCallbacks
    def test_interfaces(self):
        """
        L{Account} provides C{IAccount}; selected mailboxes provide
        C{IMailboxInfo} and C{ISearchableMailbox}.
        """
        pool = ThreadPool(minthreads=1, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        d = self.mktemp()
        os.makedirs(d)
        store = MailStore(reactor, os.path.join(d, "db"), os.path.join(d, "md"), pool)
        yield store.open()
        self.addCleanup(store.close)
        account = makeAccount(store)
        self.assertIsInstance(account, Account)
        self.assertTrue(verifyObject(IAccount, account))
        box = account.select("inbox")
        self.addCleanup(box.close)
        self.assertTrue(verifyObject(IMailboxInfo, box))
        self.assertTrue(verifyObject(ISearchableMailbox, box))
        self.assertIsNone(account.select("Trash"))
        self.assertEqual(
            [n for n, _ in account.listMailboxes("", "*")], ["INBOX", "Sent", "Outbox"]
        )
        self.assertEqual(
            account.listMailboxes("", "Sent")[0][1].attributes,
            ["\\HasNoChildren", "\\Sent"],
        )
