# -*- test-case-name: tests.test_mailflow -*-
"""
The service that drives both pipelines: DHT listeners for immediacy, and the
paper's periodic poll as the fallback that catches what a listener missed.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from p2pmta.logs import logFailure


class MailFlowService(Service):
    """
    Listens on C{ns:<self>} and C{nr:<self>} and polls both every
    C{interval} seconds.  A round never raises: a failure is logged and the
    next round tries again; C{stopService} waits for the round in flight.
    """

    log = Logger()

    def __init__(self, clock, dht, address, sender, receiver, interval: float, track=lambda d: d) -> None:
        """
        @param track: called with each Deferred of work started by a
            listener, so that the peer can wait for it when stopping.
        """
        self._track = track
        self._clock = clock
        self._dht = dht
        self._address = address
        self._sender = sender
        self._receiver = receiver
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._round: Deferred | None = None

    def startService(self) -> None:
        Service.startService(self)
        self._dht.listen(self._address.sendKey, self._notified).addErrback(
            lambda f: self.log.failure("cannot listen for send notifications", f)
        )
        self._dht.listen(self._address.receiveKey, self._receipted).addErrback(
            lambda f: self.log.failure("cannot listen for receive notifications", f)
        )
        self._loop = LoopingCall(self.pollNow)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def _notified(self, value: bytes) -> None:
        if self.running:
            self._track(Deferred.fromCoroutine(self._receiver.handleNotification(value))).addErrback(
                logFailure(self.log, "handling a send notification failed")
            )

    def _receipted(self, value: bytes) -> None:
        if self.running:
            self._track(Deferred.fromCoroutine(self._sender.handleReceipt(value))).addErrback(
                logFailure(self.log, "handling a receive notification failed")
            )

    def pollNow(self) -> Deferred:
        """Run one round now (or join the one in flight)."""
        if self._round is not None:
            return self._round
        d = Deferred.fromCoroutine(self._poll())
        if not d.called:
            self._round = d

            def finished(result):
                self._round = None
                return result

            d.addBoth(finished)
        return d

    async def _poll(self) -> None:
        for side in (self._receiver, self._sender):
            try:
                await side.round()
            except Exception:
                self.log.failure("a poll round failed; the next one retries")

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._round if self._round is not None else succeed(None)
