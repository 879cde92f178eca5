"""
Tests for L{p2pmta.sending.Sender}'s pipeline scheduling, with a fake
clock.  The pipeline's steps themselves are tested with real peers in
L{tests.test_mailflow}.
"""

from types import SimpleNamespace

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.sending import Sender


class GatherTests(SynchronousTestCase):
    """
    In a burst, a pipeline batch waits L{Sender.gatherDelay} for more
    messages, but not while no SMTP session is open.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        peer = SimpleNamespace(reactor=self.clock, dataDir=SimpleNamespace(spool="spool"), track=lambda d: d)
        self.sender = Sender(peer, 1000)
        self.batches: list = []
        self.running: list = []

        def processBatch(ids):
            self.batches.append(ids)
            d: Deferred = Deferred()
            self.running.append(d)
            return d

        self.sender._processBatch = processBatch

    def _burst(self) -> None:
        """One message in a batch while two more arrive."""
        self.sender.process("a")
        self.sender.process("b")
        self.sender.process("c")
        self.assertEqual(self.batches, [["a"]])
        self.running[0].callback(None)

    def test_waitsWhileSessionOpen(self) -> None:
        """
        While a session is open, the next batch waits for the gather delay.
        """
        self.sender.sessions(1)
        self._burst()
        self.clock.advance(self.sender.gatherDelay * 0.9)
        self.assertEqual(self.batches, [["a"]])
        self.clock.advance(self.sender.gatherDelay * 0.2)
        self.assertEqual(self.batches, [["a"], ["b", "c"]])
        self.assertEqual(self.sender._gatherWaiters, [], "a wait over leaves no trace")

    def test_sessionsGoneEndWait(self) -> None:
        """
        The wait ends as soon as the last session closes.
        """
        self.sender.sessions(1)
        self._burst()
        self.clock.advance(self.sender.gatherDelay * 0.1)
        self.assertEqual(self.batches, [["a"]])
        self.sender.sessions(0)
        self.assertEqual(self.batches, [["a"], ["b", "c"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sender._gatherWaiters, [])

    def test_noSessionNoWait(self) -> None:
        """
        With no session open (the client has gone), nothing more is on its
        way: the next batch goes at once.
        """
        self._burst()
        self.assertEqual(self.batches, [["a"], ["b", "c"]])
