# -*- test-case-name: tests.test_mailflow -*-
"""
The service that drives both pipelines: DHT listeners for immediacy, and the
paper's periodic poll as the fallback that catches what a listener missed.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from p2pmta.logs import logFailure
from p2pmta.rounds import RoundService


class MailFlowService(RoundService):
    """
    Listens on C{ns:<self>} and C{nr:<self>}, and polls both every
    C{interval} seconds (see L{RoundService}).
    """

    log = Logger()
    roundName = "a poll round"

    def __init__(self, clock, dht, address, sender, receiver, interval: float, track=lambda d: d) -> None:
        """
        @param track: called with each Deferred of work started by a
            listener, so that the peer can wait for it when stopping.
        """
        RoundService.__init__(self, clock, interval)
        self._track = track
        self._dht = dht
        self._address = address
        self._sender = sender
        self._receiver = receiver

    def startService(self) -> None:
        for key, callback in ((self._address.sendKey, self._notified), (self._address.receiveKey, self._receipted)):
            self._dht.listen(key, callback).addErrback(logFailure(self.log, "cannot listen on {key}", key=key))
        RoundService.startService(self)

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

    async def round(self) -> None:
        for side in (self._receiver, self._sender):
            try:
                await side.round()
            except CancelledError:
                raise
            except Exception:
                self.log.failure("a poll round failed; the next one retries")
