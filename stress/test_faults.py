"""
The fault loops of issue 6, long and random (see L{tests.test_faults} for
what must hold and for their quick versions):

  - real C{twistd p2pmta} peers SIGKILLed again and again at random points
    of submission, sending, receiving, pulling and replication, each time
    started again on the same data dir;
  - DHT nodes vanishing wave after wave while mail flows.

C{P2PMTA_STRESS_SCALE} scales the number of kills (50 at 1.0, about three
minutes) and of waves (10, about a minute); C{P2PMTA_STRESS_SEED} replays a
run's choices (a failure names its seed; timing still varies).
"""

from __future__ import annotations

import os
import random

from tests import test_faults as faults

SCALE = float(os.environ.get("P2PMTA_STRESS_SCALE", "1"))

#: The longest delay, in seconds, between the start of the work a kind of
#: kill interrupts and the SIGKILL: about as long as that work takes here.
MAX_DELAY = {
    "smtp250": 0.0,
    "data": 0.08,
    "append": 0.0,
    "sending": 0.4,
    "receiving": 0.5,
    "pulling": 0.15,
    "serving": 0.1,
    "replicating": 1.2,
    "receipt": 0.05,
}


class KillLoopTests(faults.KillLoop):
    """Random kills, one after another, on the same three peers."""

    iterations = max(1, round(50 * SCALE))
    timeout = max(600, 15 * iterations)

    async def _loop(self) -> None:
        seed = int(os.environ.get("P2PMTA_STRESS_SEED") or random.SystemRandom().randrange(2**32))
        rng = random.Random(seed)
        self.note(f"P2PMTA_STRESS_SEED={seed}, {self.iterations} kills")
        await self.startPeers()
        for _ in range(self.iterations):
            kind = rng.choice(faults.KINDS)
            size = int(rng.choice((2_000, 30_000, 300_000, 1_000_000)) * rng.uniform(0.5, 1.5))
            await self.iteration(kind, rng.uniform(0, MAX_DELAY[kind]), size)
        await self.finalCheck()

    def test_randomKills(self):
        """
        Kills at random points of sending, receiving, pulling and
        replication lose nothing accepted, deliver nothing twice and never
        show or serve a torn file.
        """
        return self.scenario(self._loop())


class DHTChurnLoopTests(faults.DHTChurn):
    """Waves of DHT nodes vanishing and new ones joining, mail all along."""

    waves = max(1, round(10 * SCALE))
    timeout = max(600, 60 * waves)

    async def _waves(self) -> None:
        seed = int(os.environ.get("P2PMTA_STRESS_SEED") or random.SystemRandom().randrange(2**32))
        rng = random.Random(seed)
        self.note(f"P2PMTA_STRESS_SEED={seed}, {self.waves} waves")
        await self.startChurn()
        for _ in range(self.waves):
            await self.mail(2)
            # A third vanish at random, as many fresh nodes join through
            # the survivors: the network keeps its size, not its members.
            await self.vanish(rng.sample(self.nodes, self.NODES // 3))
            for _ in range(self.NODES // 3):
                self.nodes.append(await faults.BareNode(self, [("127.0.0.1", n.port) for n in self.nodes]).started())
        await self.mail(2)
        await self.drained()

    def test_nodesComeAndGo(self):
        """Mail keeps arriving, once and whole, while the DHT's nodes are replaced wave after wave."""
        return self.scenario(self._waves())
