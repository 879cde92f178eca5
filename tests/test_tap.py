"""
The twistd p2pmta command line.
"""

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2pmta import allocator
from p2pmta.address import Address
from p2pmta.config import DEFAULT_HTTP, DEFAULT_IMAP, DEFAULT_SMTP
from p2pmta.dht import NETWORK_ID
from p2pmta.service import Peer
from p2pmta.tap import Options, makeService

BASE = ["--data-dir", "d1", "--address", "alice@demo", "--password", "pw"]


class OptionsTests(SynchronousTestCase):
    def parse(self, *extra):
        options = Options()
        options.parseOptions(BASE + list(extra))
        return options.config

    def test_defaults(self):
        """The documented defaults apply when only the required options are given."""
        config = self.parse()
        self.assertEqual(config.address, Address("alice", "demo"))
        self.assertEqual((config.smtp, config.imap, config.http), (DEFAULT_SMTP, DEFAULT_IMAP, DEFAULT_HTTP))
        self.assertEqual(DEFAULT_SMTP, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(DEFAULT_IMAP, "tcp:1143:interface=127.0.0.1")
        self.assertEqual(DEFAULT_HTTP, "tcp:8080")
        self.assertEqual(config.dhtNetwork, NETWORK_ID)
        self.assertEqual(config.bootstrap, ())
        self.assertIsNone(config.publicURL)

    def test_everyOption(self):
        """Every documented option is accepted under its exact name."""
        config = self.parse(
            "--smtp", "tcp:0", "--imap", "tcp:0", "--http", "tcp:0",
            "--public-url", "http://peer.example:8080", "--dht-port", "0",
            "--dht-network", "7", "--bootstrap", "127.0.0.1:4222",
            "--bootstrap", "[::1]:4223", "--poll-interval", "2.5",
            "--group-members", "alice@demo,dave@demo",
        )
        self.assertEqual(config.bootstrap, (("127.0.0.1", 4222), ("::1", 4223)))
        self.assertEqual(config.dhtPort, 0)
        self.assertEqual(config.dhtNetwork, 7)
        self.assertEqual(config.pollInterval, 2.5)
        self.assertEqual(config.publicURL, "http://peer.example:8080")
        self.assertEqual(config.groupMembers, (Address("alice", "demo"), Address("dave", "demo")))

    def test_usageErrors(self):
        """Bad options are usage errors with a readable message."""
        bad = [
            ["--address", "not-an-address"],
            ["--dht-port", "many"],
            ["--dht-port", "70000"],
            ["--bootstrap", "nohostport"],
            ["--bootstrap", "host:0"],
            ["--poll-interval", "0"],
            ["--public-url", "ftp://x"],
            ["--group-members", "bob@demo"],
            ["--group-members", "alice@demo,eve@other"],
        ]
        for extra in bad:
            options = Options()
            with self.assertRaises(usage.UsageError, msg=extra) as caught:
                options.parseOptions(BASE + extra)
            self.assertNotIn("Traceback", str(caught.exception))

    def test_required(self):
        """Data dir, address and password are required."""
        for i in range(0, 6, 2):
            args = BASE[:i] + BASE[i + 2:]
            self.assertRaises(usage.UsageError, Options().parseOptions, args)


class MakeServiceTests(SynchronousTestCase):
    def test_peerKeepsFreedMemory(self):
        """
        The twistd plugin builds a peer in a process set to keep the memory
        it frees (see L{p2pmta.allocator}).
        """
        calls = []
        self.patch(allocator, "keepFreedMemory", lambda: calls.append(True))
        options = Options()
        options.parseOptions(BASE)
        self.assertIsInstance(makeService(options), Peer)
        self.assertEqual(calls, [True])
