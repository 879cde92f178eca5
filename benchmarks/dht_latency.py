"""
DHT put -> get latency between two p2pmta OpenDHT nodes on 127.0.0.1.

    python benchmarks/dht_latency.py [--rounds 20]

Node A puts a fresh value under a fresh key; the clock runs until node B's
get returns it (retrying a miss at once).  Prints the median and the spread.
"""

import argparse
import os
import statistics
import time

from twisted.internet import defer, task

from p2pmta.dht.node import OpenDHTNode


async def measure(reactor, rounds: int) -> list[float]:
    a = OpenDHTNode(reactor, interface="127.0.0.1")
    a.startService()
    b = OpenDHTNode(reactor, interface="127.0.0.1", bootstrap=[("127.0.0.1", a.port)])
    b.startService()
    try:
        await task.deferLater(reactor, 1.0, lambda: None)
        samples = []
        for i in range(rounds):
            key, value = f"bench:{os.urandom(8).hex()}", os.urandom(200)
            started = time.perf_counter()
            await a.put(key, value, b"pw", 3600)
            while value not in await b.get(key):
                pass
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await b.stopService()
        await a.stopService()


def main(reactor, rounds: int):
    async def run():
        samples = await measure(reactor, rounds)
        ms = sorted(s * 1000 for s in samples)
        print(f"DHT put->get between two nodes, {rounds} rounds: median {statistics.median(ms):.2f} ms, "
              f"min {ms[0]:.2f} ms, max {ms[-1]:.2f} ms")

    return defer.ensureDeferred(run())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=20)
    task.react(main, [parser.parse_args().rounds])
