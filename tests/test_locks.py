"""
Tests for L{p2pmta.locks}.
"""

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from p2pmta.locks import ReadWriteLock


class ReadWriteLockTests(SynchronousTestCase):
    """
    Tests for L{ReadWriteLock}.
    """

    def test_sharedTogetherExclusiveAlone(self):
        """
        Shared holders share; an exclusive one waits for them, and later
        shared requests wait behind it.
        """
        lock = ReadWriteLock()
        fired = []
        lock.acquire(False).addCallback(lambda _: fired.append("r1"))
        lock.acquire(False).addCallback(lambda _: fired.append("r2"))
        lock.acquire(True).addCallback(lambda _: fired.append("w"))
        lock.acquire(False).addCallback(lambda _: fired.append("r3"))
        self.assertEqual(fired, ["r1", "r2"])
        lock.release(False)
        self.assertEqual(fired, ["r1", "r2"])
        lock.release(False)
        self.assertEqual(fired, ["r1", "r2", "w"])
        lock.release(True)
        self.assertEqual(fired, ["r1", "r2", "w", "r3"])

    def test_cancelWaiting(self):
        """
        Cancelling a waiting exclusive request lets the shared ones behind it in.
        """
        lock = ReadWriteLock()
        lock.acquire(False)
        waiting = lock.acquire(True)
        behind = lock.acquire(False)
        self.assertNoResult(behind)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.successResultOf(behind)
