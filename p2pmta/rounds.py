# -*- test-case-name: tests.test_rounds -*-
"""
Services that do a round of work every so often: the descriptor's renewal,
the notification poll, replication; and work done soon, together
(L{Coalescing}).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from p2pmta.logs import logFailure


class RoundService(Service):
    """
    Calls L{round} every C{interval} seconds, first at start.  A round never
    raises: a failure is logged and the next round tries again.  Rounds
    never overlap, and L{stopService} waits for the round in flight.

    Subclasses implement C{async def round()}.
    """

    log = Logger()
    #: What a round does, for the log line of a failed round.
    roundName = "round"
    #: How long stopping waits for a round in flight before cancelling it
    #: (a DHT look-up towards nodes that left can take long).
    stopGrace = 2.0

    def __init__(self, clock, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._inFlight: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._retry = None

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.runNow)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred:
        """
        Stop looping; wait for the round in flight, for at most
        L{stopGrace} seconds, then cancel it.
        """
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        idle = self.whenIdle()
        if self._inFlight is not None:
            inFlight = self._inFlight
            timer = self._clock.callLater(self.stopGrace, inFlight.cancel)
            idle.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return idle

    def whenIdle(self) -> Deferred:
        """
        @return: a Deferred that fires once no round is in flight.
        """
        if self._inFlight is None:
            return succeed(None)
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    def retryIn(self, seconds: float) -> None:
        """
        Run an extra round in C{seconds}, before the next regular one (at
        most one such retry is pending at a time).
        """
        if self._retry is not None and self._retry.active():
            return
        self._retry = self._clock.callLater(seconds, self.runNow)

    def runNow(self) -> Deferred:
        """
        Run one round now, or, if one is in flight, wait for it.

        @return: a Deferred that fires (with L{None}) when the round is done.
        """
        if self._inFlight is not None:
            return self.whenIdle()
        d = Deferred.fromCoroutine(self._safeRound())
        if d.called:
            return d
        self._inFlight = d

        def finished(_: object) -> None:
            self._inFlight = None
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

        d.addBoth(finished)
        return self.whenIdle() if self._inFlight is not None else succeed(None)

    async def _safeRound(self) -> None:
        try:
            await self.round()
        except CancelledError:
            self.log.info("{what} cancelled: stopping", what=self.roundName)
        except Exception:
            self.log.failure("{what} failed; the next one tries again", what=self.roundName)

    async def round(self) -> None:
        raise NotImplementedError()


class Coalescing:
    """
    Runs C{work()} (an async function) a moment after it is asked for; asks
    while it runs make it run once more afterwards, not once each, and that
    run too waits a moment first: what came in meanwhile is handled
    together (one notice for the messages sent in that time, one receipt
    for those read), instead of a trickle of small runs while asks keep
    coming.

    @ivar delay: the moment, in seconds, that a run waits for company.
    """

    log = Logger()

    def __init__(self, reactor, delay: float, work, failed: str, track=lambda d: d, pause=None) -> None:
        """
        @param failed: the log line of a failed run (the next ask retries).
        @param track: called with each run's Deferred, so that the peer
            can wait for it when stopping.
        @param pause: C{pause(delay)}, a Deferred firing when a run may
            start: after C{delay} seconds, or sooner when no company can
            come.  By default, after C{delay} seconds.
        """
        self._reactor = reactor
        self.delay = delay
        self._pause = pause or (lambda delay: deferLater(reactor, delay, lambda: None))
        self._work = work
        self._failed = failed
        self._track = track
        self._running = False
        self._again = False

    def __call__(self) -> Deferred:
        """
        Ask for a run.

        @return: a Deferred firing when the run this ask caused is over (at
            once if one was already under way).
        """
        if self._running:
            self._again = True
            return succeed(None)
        self._running = True

        async def run() -> None:
            try:
                while True:
                    await self._pause(self.delay)
                    self._again = False
                    await self._work()
                    if not self._again:
                        return
            finally:
                self._running = False

        d = Deferred.fromCoroutine(run())
        d.addErrback(logFailure(self.log, self._failed))
        return self._track(d)
