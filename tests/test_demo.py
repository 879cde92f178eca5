"""
The demo network of p2pmta.tac.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pmta.demo import demoConfigs, demoService


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
        """The demo service holds one named peer per demo address."""
        from twisted.internet import reactor

        service = demoService(reactor, "/srv/demo")
        self.assertEqual(sorted(s.name for s in service), ["alice", "bob"])
