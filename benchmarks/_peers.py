"""
Real peers on 127.0.0.1 for the benchmarks (the tests have their own
harness, tied to trial's clean-up).
"""

from __future__ import annotations

import os

from p2pmta.address import Address
from p2pmta.config import Config
from p2pmta.service import buildService


async def startPeer(reactor, root: str, name: str, group: str, bootstrap=(), **extra):
    """
    Start peer C{name@group} with its data under C{root}, all ports on
    127.0.0.1 chosen by the system, password C{pw}.

    @return: the running L{p2pmta.service.Peer}.
    """
    config = Config(
        dataDir=os.path.join(root, name),
        address=Address(name, group),
        password="pw",
        smtp="tcp:0:interface=127.0.0.1",
        imap="tcp:0:interface=127.0.0.1",
        http="tcp:0:interface=127.0.0.1",
        dhtPort=0,
        dhtInterface="127.0.0.1",
        bootstrap=tuple(bootstrap),
        **extra,
    )
    peer = buildService(config, reactor, stopReactorOnFailure=False)
    peer.startService()
    await peer.whenReady
    return peer
