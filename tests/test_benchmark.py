"""
The paper's benchmark (C{benchmarks/paper.py}) runs end to end on a tiny
configuration and leaves consistent results and nothing else behind.  No
timing is asserted: this checks the machinery, not p2pmta's speed.
"""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "paper.py")

#: Keys summary.json must have, each a number (or null where the tiny run
#: cannot measure it: no 1 MB or text variant here).
SUMMARY_KEYS = (
    "e2e_ratio_10k_binary", "e2e_ratio_1m_binary", "traffic_ratio_10k_text", "traffic_ratio_10k_binary",
    "traffic_ratio_reject_all", "break_even_acceptance", "notify_latency_median_s", "peak_rss_mb",
)
TINY = ["-n", "3", "--sizes", "10k", "--kinds", "binary", "--runs", "1", "--accept", "0,1",
        "--probe", "2", "--warmup", "1", "--settle", "0.3", "--settle-limit", "10", "--no-install"]


def _paper():
    """benchmarks/paper.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FreePortsTests(SynchronousTestCase):
    """
    Tests for the benchmark's choice of ports.
    """

    def test_neverTheSameTwice(self):
        """
        A port handed out once is not handed out again in the same process,
        though it is still free: each system chooses its ports when it is
        made and binds them when it starts, so the baseline could otherwise
        be given one of p2pmta's.
        """
        _paper()  # puts benchmarks/ on the path
        from paperbench import procs

        self.patch(procs, "_handedOut", set())
        seeded = procs.random.Random
        self.patch(procs.random, "Random", lambda: seeded(1234))  # the same draws each time
        first, second = procs.freePorts(12), procs.freePorts(2)
        self.assertEqual(len(set(first)), 12)
        self.assertFalse(set(first) & set(second))
        self.assertEqual(procs._handedOut, set(first) | set(second))


class TurnsTests(SynchronousTestCase):
    """
    Tests for the order the systems take their turns in.
    """

    def test_firstAlternates(self):
        """
        In the full mode, every spec runs on both systems, one right after
        the other; the first of a turn alternates from one spec to the
        next within a run, and for each variant from one run to the next.
        """
        paper = _paper()
        specs = paper.specs(paper.parseArgs([]))
        self.assertEqual(len(specs), 3 * (8 + 6))
        turns = paper.turns(specs, ["p2pmta", "baseline"])
        self.assertEqual(len(turns), 2 * len(specs))
        firsts = []
        for (spec, one), (same, other) in zip(turns[::2], turns[1::2]):
            self.assertIs(spec, same)
            self.assertEqual({one, other}, {"p2pmta", "baseline"})
            firsts.append(one)
        for run in range(3):
            inRun = [first for spec, first in zip(specs, firsts) if spec.run == run]
            self.assertTrue(all(a != b for a, b in zip(inRun, inRun[1:])), run)
        byVariant = collections.defaultdict(list)
        for spec, first in zip(specs, firsts):
            byVariant[(spec.phase, spec.size, spec.kind, spec.accept)].append(first)
        for variant, order in byVariant.items():
            self.assertEqual(len(order), 3, variant)
            self.assertTrue(order[0] != order[1] != order[2], variant)


class RunByRunTests(SynchronousTestCase):
    """
    Tests for the run-by-run ratios, which pair each run of one system
    with the same run of the other.
    """

    def test_pairsByRun(self):
        """
        Each ratio is p2pmta's figure over the baseline's in the same run of
        the same variant, in the order of the runs, whatever the order of
        the rows; a run one system lacks gives no ratio.
        """
        report = _paper().report
        def row(system, run, e2e, size="10k"):
            return {"system": system, "phase": "variant", "size": size, "kind": "binary", "run": run, "e2e_s": e2e}
        p2p = [row("p2pmta", 2, 3.0), row("p2pmta", 0, 4.0), row("p2pmta", 1, 6.0), row("p2pmta", 3, 1.0),
               row("p2pmta", 0, 99.0, size="1m")]
        base = [row("postfix", 0, 2.0), row("postfix", 1, 3.0), row("postfix", 2, 6.0), row("postfix", 0, 1.0, size="1m")]
        self.assertEqual(report.runByRun(p2p, base, "e2e_s", phase="variant", size="10k", kind="binary"), [2.0, 2.0, 0.5])
        self.assertEqual(report.runByRun(p2p, base, "e2e_s", phase="variant", size="1m", kind="binary"), [99.0])
        self.assertEqual(report.runByRun(p2p, [], "e2e_s", phase="variant", size="10k", kind="binary"), [])


def _dead(pids: list[str]) -> list[str]:
    return [pid for pid in pids if not os.path.exists(f"/proc/{pid}")]


def _hasMatplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class PaperBenchmarkTests(TestCase):
    timeout = 300

    def setUp(self):
        self.out = tempfile.mkdtemp(prefix="p2bt", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.out, True)

    def bench(self, *args: str):
        """Run the benchmark in a subprocess (in a thread: the reactor keeps turning)."""

        def run():
            return subprocess.run([sys.executable, SCRIPT, *TINY, "--out", self.out, *args],
                                  check=False, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)

        return deferToThread(run)

    def check(self, result, systems: dict[str, int]) -> dict:
        """
        Common checks of a finished run; C{systems} maps each system's name in
        runs.csv to the rows it must have.
        """
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        with open(os.path.join(self.out, "runs.csv")) as f:
            rows = list(csv.DictReader(f))
        for system, count in systems.items():
            self.assertEqual(len([r for r in rows if r["system"] == system]), count, system)
        for row in rows:
            if row["phase"] == "probe":
                self.assertGreaterEqual(float(row["notify_s"]), 0)
                continue
            wanted = round(int(row["n"]) * float(row["accept"]))
            self.assertEqual((int(row["fetched"]), int(row["matched"])), (wanted, wanted), row)
            self.assertGreater(int(row["rx_bytes"]), 0, row)
            self.assertIn(row["traffic_method"], ("iptables", "lo-total"))
            self.assertTrue(0 < float(row["fetch_s"]) < float(row["e2e_s"]), row)
            self.assertGreaterEqual(float(row["client_fetch_cpu_s"]), 0, row)
            self.assertGreaterEqual(int(row["client_fetch_minflt"]), 0, row)
        with open(os.path.join(self.out, "summary.json")) as f:
            summary = json.load(f)
        for key in SUMMARY_KEYS:
            self.assertIn(key, summary)
            self.assertIsInstance(summary[key], (int, float, type(None)), key)
        for key in ("nproc", "cpu", "memory", "kernel", "python", "gpg", "date"):
            self.assertIn(key, summary["machine"])
        with open(os.path.join(self.out, "results.md")) as f:
            self.assertIn("| target |", f.read())
        if _hasMatplotlib():
            self.assertTrue(os.path.exists(os.path.join(self.out, "fig5_traffic_vs_acceptance.png")))
        self.assertNothingLeft(result.stdout)
        return summary

    def assertNothingLeft(self, output: str) -> None:
        """The run's working directory, processes and iptables chain are gone."""
        root = re.search(r"working directory (\S+)", output).group(1)
        self.assertFalse(os.path.exists(root), root)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    self.assertNotIn(root.encode(), f.read(), f"process {pid} left running")
            except OSError:
                pass
        # Chains, Postfix instances and users are named after the benchmark's
        # pid: none may be left by a process that has ended.
        if shutil.which("iptables") and os.geteuid() == 0:
            chains = subprocess.run(["iptables", "-w", "-S"], check=False, capture_output=True, text=True).stdout
            self.assertEqual(_dead(re.findall(r"^-N P2B-(\d+)-\d+$", chains, re.MULTILINE)), [], "iptables chains left")
        instances = [d[len("postfix-p2b"):] for d in os.listdir("/etc") if re.fullmatch(r"postfix-p2b\d+", d)]
        self.assertEqual(_dead(instances), [], "Postfix instances left")
        with open("/etc/passwd") as f:
            self.assertEqual(_dead(re.findall(r"^p2b(\d+):", f.read(), re.MULTILINE)), [], "users left")
        self.assertNotIn("!! clean-up", output)

    async def _twisted(self):
        result = await self.bench("--baseline", "twisted")
        summary = self.check(result, {"p2pmta": 2 + 1 + 2, "twisted": 2 + 1 + 2})
        # The systems take turns, the first of each pair alternating, so
        # that both are measured in the same minutes.
        with open(os.path.join(self.out, "runs.csv")) as f:
            order = [row["system"] for row in csv.DictReader(f) if row["phase"] != "probe"]
        self.assertEqual(order, ["p2pmta", "twisted", "twisted", "p2pmta", "p2pmta", "twisted"])
        for key in ("e2e_ratio_10k_binary", "traffic_ratio_10k_binary", "traffic_ratio_reject_all",
                    "notify_latency_median_s"):
            self.assertIsInstance(summary[key], (int, float), key)
        # One run: its own ratio is the ratio of the medians.
        self.assertEqual(len(summary["e2e_by_run_10k_binary"]), 1)
        self.assertAlmostEqual(summary["e2e_by_run_10k_binary"][0], summary["e2e_ratio_10k_binary"])
        self.assertEqual(summary["e2e_by_run_1m_binary"], [])
        with open(os.path.join(self.out, "results.md")) as f:
            self.assertIn("End to end, run by run", f.read())
        self.assertEqual(summary["baseline"], "twisted")
        self.assertIn("FALLBACK", summary["systems"]["baseline"])

    def test_p2pmtaAgainstTwistedFallback(self):
        """
        Both p2pmta and the twisted.mail fallback baseline run the tiny
        workload, taking turns: every body matches, summary and results
        are complete.
        """
        return Deferred.fromCoroutine(self._twisted())

    async def _postfix(self):
        result = await self.bench("--systems", "baseline", "--baseline", "postfix")
        summary = self.check(result, {"postfix": 2 + 1 + 2})
        self.assertEqual(summary["baseline"], "postfix")
        self.assertIsInstance(summary["baseline_notify_latency_median_s"], float)

    def test_postfixBaseline(self):
        """The Postfix + Dovecot baseline runs the tiny workload and is removed afterwards."""
        if os.geteuid() != 0 or not (shutil.which("postfix") and shutil.which("dovecot")):
            raise SkipTest("Postfix and Dovecot are not installed (or not root)")
        return Deferred.fromCoroutine(self._postfix())
