"""
Outbox replication between two members of a group on 127.0.0.1: the time
for dave to replicate --count ciphertexts of --size bytes from alice's
outbox, and the HTTP traffic it took (response bytes from alice's access
log, which counts bodies, not headers).

    python benchmarks/replication.py [--count 100] [--size 100000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from _peers import startPeer

from p2pmta.address import Address
from p2pmta.web import ACCESS_LOG_NAMESPACE

MEMBERS = (Address("alice", "g"), Address("dave", "g"))


async def run(reactor, count: int, size: int) -> None:
    root = tempfile.mkdtemp(prefix="p2r", dir="/tmp")
    served = {"bytes": 0, "requests": 0}

    def observe(event):
        if event.get("log_namespace") == ACCESS_LOG_NAMESPACE:
            match = re.search(r'" (\d{3}) (\d+|-) ', str(event.get("line", "")))
            if match and match.group(2) != "-":
                served["bytes"] += int(match.group(2))
                served["requests"] += 1

    globalLogPublisher.addObserver(observe)
    peers = []
    try:
        dave = await startPeer(reactor, root, "dave", "g", (), replicationInterval=3600)
        peers.append(dave)
        alice = await startPeer(
            reactor, root, "alice", "g", (("127.0.0.1", dave.dht.port),), groupMembers=MEMBERS, replicationInterval=3600
        )
        peers.append(alice)
        for _ in range(count):
            await alice.outbox.add(os.urandom(size))
        await task.deferLater(reactor, 1.0, lambda: None)
        replication = dave.getServiceNamed("replication")
        served["bytes"] = served["requests"] = 0
        started = time.perf_counter()
        await replication.runNow()
        seconds = time.perf_counter() - started
        held = len(dave.replicas.digests())
        print(
            f"replicated {held} of {count} ciphertexts of {size} bytes in {seconds:.2f} s "
            f"({held * size / seconds / 1e6:.1f} MB/s); HTTP response bodies {served['bytes']} bytes "
            f"in {served['requests']} requests ({served['bytes'] / max(held * size, 1):.4f} x the payload)"
        )
        served["bytes"] = served["requests"] = 0
        started = time.perf_counter()
        await replication.runNow()
        print(
            f"a round with nothing new: {time.perf_counter() - started:.3f} s, "
            f"{served['bytes']} bytes in {served['requests']} requests (the msglist)"
        )
    finally:
        globalLogPublisher.removeObserver(observe)
        for peer in reversed(peers):
            await peer.stopService()
        shutil.rmtree(root, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=100_000)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args.count, args.size)))
