"""
The demo network of p2pmta.tac.
"""

import imaplib
import os
import smtplib
import socket
import sqlite3
from contextlib import closing

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta import demo
from p2pmta.demo import demoConfigs, demoService
from tests.peers import eventually, uids
from tests.peers import freePort


class DemoTests(SynchronousTestCase):
    def test_configs(self):
        """alice and bob get their own data dirs and ports; bob joins alice's DHT node."""
        alice, bob = demoConfigs("/srv/demo")
        self.assertEqual((str(alice.address), str(bob.address)), ("alice@demo", "bob@demo"))
        self.assertNotEqual(alice.dataDir, bob.dataDir)
        ports = {alice.smtp, alice.imap, alice.http, bob.smtp, bob.imap, bob.http}
        self.assertEqual(len(ports), 6)
        self.assertEqual(alice.bootstrap, ())
        self.assertEqual(bob.bootstrap, (("127.0.0.1", alice.dhtPort),))
        self.assertTrue(all(c.smtp.endswith("interface=127.0.0.1") for c in (alice, bob)))

    def test_service(self):
        """
        The demo service holds one named peer per demo address, in a process
        set to keep the memory it frees (see L{p2pmta.allocator}).
        """
        calls = []
        self.patch(demo, "keepFreedMemory", lambda: calls.append(True))
        service = demoService(reactor, "/srv/demo")
        self.assertEqual(sorted(s.name for s in service), ["alice", "bob"])
        self.assertEqual(calls, [True])


class DemoStopTests(TestCase):
    """The demo network, running, on ports of its own."""

    async def _stopRightAfterRead(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        peers = tuple(
            (name, password, freePort(), freePort(), freePort(), freePort(socket.SOCK_DGRAM))
            for name, password in (("alice", "alice-pw"), ("bob", "bob-pw"))
        )
        (_, _, aliceSMTP, _, _, _), (_, _, _, bobIMAP, _, _) = peers
        service = demoService(reactor, root, peers)
        service.startService()
        try:
            await DeferredList([peer.whenReady for peer in service], fireOnOneErrback=True, consumeErrors=True)
            message = b"From: alice@demo\r\nTo: bob@demo\r\nSubject: hi\r\n\r\nHello Bob!\r\n"

            def send():
                with smtplib.SMTP("127.0.0.1", aliceSMTP, timeout=30) as client:
                    client.login("alice@demo", "alice-pw")
                    client.sendmail("alice@demo", ["bob@demo"], message)

            await deferToThread(send)

            def read():
                client = imaplib.IMAP4("127.0.0.1", bobIMAP, timeout=30)
                try:
                    client.login("bob@demo", "bob-pw")
                    found = uids(client)
                    if not found:
                        return None
                    typ, data = client.uid("FETCH", str(found[0]), "(BODY[])")
                    return data[0][1]
                finally:
                    client.logout()

            body = await eventually(lambda: deferToThread(read), timeout=30)
            self.assertIn(b"Hello Bob!", body)
        finally:
            await service.stopService()
        with closing(sqlite3.connect(os.path.join(root, "bob", "p2pmta.sqlite"))) as db:
            states = db.execute("SELECT state FROM incoming").fetchall()
        self.assertEqual(states, [("receipted",)])

    def test_stopRightAfterRead(self):
        """
        Stopped right after bob reads alice's message, the demo still tells
        alice (bob's receipt is posted while both DHT nodes run): the peers
        share one process, and drain their background work together before
        any of them stops.
        """
        return ensureDeferred(self._stopRightAfterRead())
