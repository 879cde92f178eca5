# -*- test-case-name: tests.test_locks -*-
"""
Locks for code on the reactor thread, taken through Deferreds: what
Twisted's L{twisted.internet.defer.DeferredLock} and
L{twisted.internet.defer.DeferredSemaphore} do not offer.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed


class ReadWriteLock:
    """
    Many shared holders or one exclusive holder, used from the reactor
    thread only.  Waiters are served first come first served, so a waiting
    writer holds back later readers and is not starved.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._waiting: deque = deque()

    def _take(self, exclusive: bool) -> bool:
        if self._writing or (exclusive and self._readers):
            return False
        self._writing = exclusive
        self._readers += not exclusive
        return True

    def acquire(self, exclusive: bool) -> Deferred:
        """
        @return: a Deferred firing with L{None} once the lock is held.
            Cancelling it gives up the place in the queue.
        """
        if not self._waiting and self._take(exclusive):
            return succeed(None)

        def cancel(d):
            self._waiting.remove((exclusive, d))
            self._wake()

        d: Deferred = Deferred(cancel)
        self._waiting.append((exclusive, d))
        return d

    def release(self, exclusive: bool) -> None:
        if exclusive:
            self._writing = False
        else:
            self._readers -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._take(self._waiting[0][0]):
            self._waiting.popleft()[1].callback(None)
