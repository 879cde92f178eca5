"""
Services that do a round of work every so often.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.rounds import Coalescing, RoundService


class Counting(RoundService):
    def __init__(self, clock, interval):
        RoundService.__init__(self, clock, interval)
        self.started = 0
        self.gates: list[Deferred] = []
        self.fail = False

    async def round(self):
        self.started += 1
        if self.fail:
            raise RuntimeError("boom")
        gate = Deferred()
        self.gates.append(gate)
        await gate


class RoundServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.service = Counting(self.clock, 10)

    def test_firstAtStartThenEveryInterval(self):
        """A round runs at start and then every interval."""
        self.service.startService()
        self.assertEqual(self.service.started, 1)
        self.service.gates[0].callback(None)
        self.clock.advance(10)
        self.assertEqual(self.service.started, 2)

    def test_noOverlap(self):
        """A round still running when the next is due is not doubled."""
        self.service.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.service.started, 1)
        self.service.gates[0].callback(None)
        self.clock.advance(10)
        self.assertEqual(self.service.started, 2)

    def test_failureLoggedAndLoopGoesOn(self):
        """A failing round is logged; the next one still runs."""
        self.service.fail = True
        self.service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(self.service.started, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopWaitsForRoundInFlight(self):
        """stopService fires only once the round in flight is done."""
        self.service.startService()
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.service.gates[0].callback(None)
        self.successResultOf(stopped)
        self.clock.advance(100)
        self.assertEqual(self.service.started, 1)

    def test_runNowJoinsRoundInFlight(self):
        """runNow during a round waits for that round instead of starting another."""
        self.service.startService()
        joined = self.service.runNow()
        self.assertEqual(self.service.started, 1)
        self.assertNoResult(joined)
        self.service.gates[0].callback(None)
        self.successResultOf(joined)

    def test_stopCancelsSlowRound(self):
        """A round still running after the grace period is cancelled, quietly."""
        self.service.startService()
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(self.service.stopGrace)
        self.successResultOf(stopped)
        self.assertEqual(self.flushLoggedErrors(), [])


class CoalescingTests(SynchronousTestCase):
    def test_asksDuringARunMakeOneMore(self):
        """
        A run starts a moment after the first ask; asks while it waits or
        works cause one more run after it, not one each; a failure is
        logged and the next ask runs again.
        """
        clock = Clock()
        runs, gates = [], []

        async def work():
            runs.append(clock.seconds())
            gate = Deferred()
            gates.append(gate)
            await gate

        coalescing = Coalescing(clock, 0.5, work, "work failed")
        coalescing()
        coalescing()
        self.assertEqual(runs, [])
        clock.advance(0.5)
        self.assertEqual(runs, [0.5])
        for _ in range(3):
            coalescing()
        gates[0].callback(None)
        self.assertEqual(runs, [0.5], "the run after waits a moment for company")
        coalescing()
        clock.advance(0.5)
        self.assertEqual(runs, [0.5, 1.0], "one more run for the four asks")
        gates[1].callback(None)
        clock.advance(0.5)
        self.assertEqual(len(runs), 2)
        coalescing()
        clock.advance(0.5)
        gates[2].errback(ValueError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        coalescing()
        clock.advance(0.5)
        self.assertEqual(len(runs), 4)
