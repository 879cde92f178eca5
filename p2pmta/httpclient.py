# -*- test-case-name: tests.test_descriptor -*-
"""
Reading other peers' outboxes over HTTP, bounded in size and time.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from p2pmta import __version__
from p2pmta.errors import FetchError

USER_AGENT = f"p2pmta/{__version__}".encode("ascii")


class _BoundedBody(Protocol):
    """
    Collect a response body into C{sink} (a callable taking bytes), failing
    once more than C{maxSize} bytes arrive.
    """

    def __init__(self, finished: Deferred, sink, maxSize: int) -> None:
        self._finished = finished
        self._sink = sink
        self._remaining = maxSize
        self._failed = False

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self._remaining -= len(data)
        if self._remaining < 0:
            self._failed = True
            self.transport.stopProducing()
            self._finished.errback(FetchError("response larger than expected"))
            return
        try:
            self._sink(data)
        except Exception:
            self._failed = True
            self.transport.stopProducing()
            self._finished.errback(Failure())

    def connectionLost(self, reason: Failure) -> None:
        if self._failed:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(None)
        else:
            self._finished.errback(FetchError(f"connection lost: {reason.getErrorMessage()}"))


async def fetchInto(agent: Agent, url: str, sink, maxSize: int, reactor, timeout: float = 30.0) -> None:
    """
    GET C{url} and pass its body, chunk by chunk, to C{sink}.

    @raise FetchError: on a network error, a status other than 200, a body
        over C{maxSize} bytes, or no answer within C{timeout} seconds.
    """
    requested = agent.request(b"GET", url.encode("ascii"), Headers({b"User-Agent": [USER_AGENT]}))
    requested.addTimeout(timeout, reactor)
    try:
        response = await requested
    except Exception as e:
        raise FetchError(f"{url}: {e}") from None
    if response.code != 200:
        response.deliverBody(Protocol())
        raise FetchError(f"{url}: HTTP {response.code}")
    if response.length is not None and isinstance(response.length, int) and response.length > maxSize:
        response.deliverBody(Protocol())
        raise FetchError(f"{url}: {response.length} bytes is more than {maxSize}")
    finished = Deferred()
    response.deliverBody(_BoundedBody(finished, sink, maxSize))
    finished.addTimeout(timeout, reactor)
    try:
        await finished
    except FetchError as e:
        raise FetchError(f"{url}: {e}") from None
    except Exception as e:
        raise FetchError(f"{url}: {e}") from None


async def fetchBytes(agent: Agent, url: str, maxSize: int, reactor, timeout: float = 30.0) -> bytes:
    """
    GET C{url}, whose body must be at most C{maxSize} bytes.
    """
    chunks: list[bytes] = []
    await fetchInto(agent, url, chunks.append, maxSize, reactor, timeout)
    return b"".join(chunks)
