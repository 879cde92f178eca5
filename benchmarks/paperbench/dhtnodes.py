"""
Plain OpenDHT nodes on p2pmta's network, in one helper process, so that the
two peers of the benchmark are not a DHT of two.

    python dhtnodes.py PORT [PORT...]

The first node starts the network, the others join through it.  Every node
registers p2pmta's value types (a node that stores a value keeps it for its
type's expiry, and drops values of unknown types).  Prints C{ready} once all
nodes run, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import opendht

from p2pmta.dht import NETWORK_ID
from p2pmta.dht.node import VALUE_TYPES


def startNode(port: int, bootstrap: int | None) -> opendht.DhtRunner:
    runner = opendht.DhtRunner()
    config = opendht.DhtConfig()
    config.setNetwork(NETWORK_ID)
    config.setPeerDiscovery(False, False)  # no multicast: join explicitly, as the peers do
    runner.run(port=port, ipv4="127.0.0.1", config=config)
    for typeId, name, expiry in VALUE_TYPES:
        runner.registerType(opendht.ValueType(typeId, name, expiry))
    if bootstrap is not None:
        runner.bootstrap("127.0.0.1", str(bootstrap))
    return runner


def main(ports: list[int]) -> None:
    runners = [startNode(port, ports[0] if i else None) for i, port in enumerate(ports)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("ready", " ".join(str(r.getBound().getPort()) for r in runners), flush=True)
    while not stop.wait(0.5):  # a short wait, so signals are seen at once
        pass
    # Shut the nodes down politely, but never hang on the binding's join
    # (see p2pmta.dht.node): this process has nothing else to save.
    threading.Timer(5.0, lambda: os._exit(0)).start()
    for runner in runners:
        done = threading.Event()
        runner.shutdown(done.set)
        done.wait(2)
    os._exit(0)


if __name__ == "__main__":
    main([int(p) for p in sys.argv[1:]])
