# -*- test-case-name: tests.test_demo -*-
"""
The demo network of C{p2pmta.tac}: two peers, C{alice@demo} and C{bob@demo},
on 127.0.0.1, the second joining the DHT through the first.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from p2pmta.address import Address
from p2pmta.allocator import keepFreedMemory
from p2pmta.config import Config
from p2pmta.service import buildService

#: name, password, SMTP port, IMAP port, HTTP port, DHT port
PEERS = (
    ("alice", "alice-pw", 2525, 1143, 8080, 4301),
    ("bob", "bob-pw", 2526, 1144, 8081, 4302),
)

log = Logger()


def demoConfigs(root: str, peers=PEERS) -> list[Config]:
    """
    @return: the configuration of each demo peer, data under C{root}.
    """
    configs = []
    first = peers[0][5]
    for index, (name, password, smtp, imap, http, dht) in enumerate(peers):
        configs.append(
            Config(
                dataDir=os.path.join(root, name),
                address=Address(name, "demo"),
                password=password,
                smtp=f"tcp:{smtp}:interface=127.0.0.1",
                imap=f"tcp:{imap}:interface=127.0.0.1",
                http=f"tcp:{http}:interface=127.0.0.1",
                dhtPort=dht,
                dhtInterface="127.0.0.1",
                bootstrap=() if index == 0 else (("127.0.0.1", first),),
                pollInterval=10.0,
            )
        )
    return configs


class DemoNetwork(MultiService):
    """
    The demo peers, in one process.  They stop in two steps: first the
    background work of all of them (a receipt on its way to the other) is
    drained while every DHT node still runs, then each peer stops.  Stopped
    side by side at once, a peer that still had a receipt to post waited for
    a DHT node already gone, for seconds, and the receipt was lost.
    """

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await DeferredList([peer.drain() for peer in self], consumeErrors=True)
        await MultiService.stopService(self)


def demoService(reactor, root: str, peers=PEERS) -> MultiService:
    """
    @return: a service running every demo peer, which logs how to connect.
    """
    keepFreedMemory()
    top = DemoNetwork()
    for config in demoConfigs(root, peers):
        peer = buildService(config, reactor)
        peer.setName(config.address.name)
        peer.setServiceParent(top)
        peer.whenReady.addCallback(_announce, config)
    return top


def _announce(peer, config: Config):
    log.info(
        "demo peer {address} ready: SMTP {smtp}, IMAP {imap}, outbox {url}; "
        "user name {address}, password {password}",
        address=str(config.address),
        smtp=config.smtp,
        imap=config.imap,
        url=peer.publicURL,
        password=config.password,
    )
    return peer
