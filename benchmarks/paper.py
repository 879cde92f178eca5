"""
The experiments of the paper's section 5 (Figures 3-5), p2pmta against a
conventional push system (Postfix + Dovecot), on this machine.

    python benchmarks/paper.py            # full: N = 1000, 8 variants, p sweep, 3 runs each
    python benchmarks/paper.py --quick    # N = 50, 10 KB and 1 MB binary, p sweep, 1 run

N messages go from alice to bob over one SMTP connection, each with an
empty body and one attachment; bob's IMAP client waits until all are
listed, then fetches and checks the bodies.  Measured at the receiver: end
to end and receive time, traffic across its host boundary (kernel
counters), peak RSS and CPU seconds; and the receiver's traffic when it
opens only a fraction p of the messages.  See benchmarks/README.md.

Writes runs.csv, summary.json, results.md and fig3-5 PNGs to --out.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paperbench import baseline, report, traffic
from paperbench.experiment import Bench
from paperbench.peers import P2PMTASystem
from paperbench.workload import KINDS, SIZES, Spec

HERE = os.path.dirname(os.path.abspath(__file__))
ACCEPTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def parseArgs(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_argument_group("what to run")
    mode.add_argument("--quick", action="store_true",
                      help="N = 50, 10k and 1m binary, the p sweep, 1 run (a few minutes at most)")
    mode.add_argument("-n", type=int, help="messages per run (default 1000; 50 with --quick)")
    mode.add_argument("--runs", type=int, help="runs per variant, medians over them (default 3; 1 with --quick)")
    mode.add_argument("--sizes", help=f"attachment sizes, of {','.join(SIZES)} (default all; 10k,1m with --quick)")
    mode.add_argument("--kinds", help="attachment kinds, of text,binary (default both; binary with --quick)")
    mode.add_argument("--accept", help="the acceptance fractions of the sweep (default 0,0.2,...,1); "
                                       "'none' skips the sweep")
    mode.add_argument("--systems", default="p2pmta,baseline", help="p2pmta,baseline (default both)")
    mode.add_argument("--baseline", choices=("auto", "postfix", "twisted"), default="auto",
                      help="postfix: Postfix + Dovecot (installed when root and missing); twisted: the labelled "
                           "fallback on twisted.mail; auto (default): postfix when it can be had")
    mode.add_argument("--probe", type=int, default=20, help="messages of the notification-latency probe (0: none)")
    mode.add_argument("--warmup", type=int, help="messages of the discarded warm-up run (default min(N, 100); "
                                                 "10 with --quick; 0: none)")
    how = parser.add_argument_group("how")
    how.add_argument("--chunk", type=int, default=50, help="messages per UID FETCH (default 50)")
    how.add_argument("--traffic", choices=("auto", "iptables", "lo"), default="auto",
                     help="traffic counters: iptables (installed when root and missing) or the labelled "
                          "lo-total fallback; auto (default): iptables when it can be had")
    how.add_argument("--no-install", action="store_true",
                     help="install nothing (iptables, Postfix, Dovecot): use the labelled fallbacks where missing")
    how.add_argument("--dht-nodes", type=int, default=4, help="plain OpenDHT nodes besides the two peers (default 4)")
    how.add_argument("--poll-interval", type=float, default=60.0,
                     help="p2pmta's --poll-interval, seconds between DHT polls (default 60, the peer's default)")
    how.add_argument("--poll", type=float, default=0.02, help="seconds between the IMAP client's NOOPs (default 0.02)")
    how.add_argument("--probe-poll", type=float, default=0.005, help="the same during the probe (default 0.005)")
    how.add_argument("--settle", type=float, default=3.0,
                     help="the receiver is quiet when its traffic has not moved for this long (default 3 s: "
                          "longer than p2pmta's 1 s receipt delay, so that receipts are counted)")
    how.add_argument("--settle-limit", type=float, default=60.0, help="wait at most this long for quiet (default 60 s)")
    how.add_argument("--sample-interval", type=float, default=0.1, help="seconds between RSS samples (default 0.1)")
    how.add_argument("--list-timeout", type=float, default=60.0,
                     help="seconds to wait for all messages to be listed, plus --list-timeout-per-message × N")
    how.add_argument("--list-timeout-per-message", type=float, default=0.5)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default benchmarks/results)")
    out.add_argument("--markdown", action="store_true", help="also print results.md on stdout")
    out.add_argument("--no-plots", action="store_true", help="no figures")
    args = parser.parse_args(argv)

    quick = args.quick
    args.mode = "quick" if quick else ("full" if not any((args.n, args.runs, args.sizes, args.kinds)) else "custom")
    args.n = args.n or (50 if quick else 1000)
    args.runs = args.runs or (1 if quick else 3)
    args.sizes = _choices(args.sizes or ("10k,1m" if quick else ",".join(SIZES)), SIZES, "--sizes")
    args.kinds = _choices(args.kinds or ("binary" if quick else ",".join(KINDS)), KINDS, "--kinds")
    args.accepts = [] if args.accept == "none" else (
        [float(x) for x in args.accept.split(",")] if args.accept else list(ACCEPTS))
    args.systems = _choices(args.systems, ("p2pmta", "baseline"), "--systems")
    if args.warmup is None:
        args.warmup = 10 if quick else min(args.n, 100)
    return args


def _choices(text: str, allowed, option: str) -> list[str]:
    chosen = [x.strip().lower() for x in text.split(",") if x.strip()]
    wrong = [x for x in chosen if x not in allowed]
    if wrong or not chosen:
        raise SystemExit(f"{option}: choose among {', '.join(allowed)}")
    return [x for x in allowed if x in chosen]  # in the canonical order


def specs(args) -> list[Spec]:
    """The measured runs of each system, runs interleaved so drift spreads over all variants."""
    out = []
    for run in range(args.runs):
        out += [Spec("variant", args.n, size, kind, 1.0, run) for size in args.sizes for kind in args.kinds]
        out += [Spec("sweep", args.n, "10k", "binary", p, run) for p in args.accepts]
    return out


def turns(specs: list, systems: list) -> list:
    """
    The order to run C{specs} on C{systems}: each spec on every system in
    turn, the first of the turn alternating from one spec to the next
    within a run and, for the same variant, from one run to the next.

    @return: C{(spec, system)} pairs.
    """
    out = []
    for i, spec in enumerate(specs):
        first = (i + spec.run) % 2 == 0
        out += [(spec, system) for system in (systems if first else systems[::-1])]
    return out


def chooseBaseline(args, log) -> str:
    if args.baseline == "twisted":
        return "twisted"
    why = baseline.ensurePostfixDovecot(log, install=not args.no_install)
    if why is None:
        return "postfix"
    if args.baseline == "postfix":
        raise SystemExit(f"--baseline postfix: {why}")
    log(f"!! {why}: using the FALLBACK baseline on twisted.mail, clearly labelled")
    return "twisted"


def measure(systems: list, args, rows: list[dict], csvPath: str, log) -> None:
    """
    Start C{systems}, warm each up and probe it, then run every spec on each
    in turn (see L{turns}), and stop them.  The runs of both spread over
    the same minutes, so that the machine's drift (the same work can take
    half as long again twenty minutes later) falls on both alike.  While
    one is measured, the other is idle.
    """
    with ExitStack() as stack:
        benches = []
        for system in systems:
            log(f"== {system.name}: {system.label}")
            started = time.perf_counter()
            # Clean-ups run last first: counters, then the system, then its logs are kept.
            stack.callback(_quietly, lambda system=system: report.copyLogs(system.logs(), args.out, system.name), log)
            stack.callback(_quietly, system.stop, log)
            system.start()
            log(f"  started in {time.perf_counter() - started:.1f} s")
            counters = traffic.openCounters(system.counted(), system.local(), args.traffic, install=not args.no_install)
            stack.callback(counters.close)
            args.traffic_label = counters.label
            log(f"  traffic: {counters.label}")
            benches.append(Bench(system, counters, args, log))
        for bench in benches:
            if args.warmup:
                bench.run(Spec("warmup", args.warmup, "10k", "binary"))
                log(f"  {bench.system.name}: warm-up done (discarded)")
            if args.probe:
                rows += bench.probe(args.probe)
                report.writeCSV(csvPath, rows)
        for spec, bench in turns(specs(args), benches):
            row = bench.run(spec)
            rows.append(row)
            report.writeCSV(csvPath, rows)
            log(f"  {bench.system.name:<8} {spec.size:>4} {spec.kind:<6} p={spec.accept:<3g} run {spec.run + 1}: "
                f"e2e {row['e2e_s']:.2f} s, receive {row['receive_s']:.2f} s, "
                f"rx {row['rx_bytes'] / 1e6:.2f} MB, bodies {row['matched']}/{row['fetched']}")


def removeStaleDirs(log) -> None:
    """Remove the working directories of benchmarks that were killed (named after their pid)."""
    for name in os.listdir("/tmp"):
        match = re.fullmatch(r"p2bench(\d+)-\w+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            log(f"removing /tmp/{name}, left by a killed benchmark")
            shutil.rmtree(os.path.join("/tmp", name), True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def _quietly(action, log) -> None:
    try:
        action()
    except Exception as e:
        log(f"!! clean-up: {e}")


def main(argv=None) -> int:
    args = parseArgs(argv)
    os.makedirs(args.out, exist_ok=True)
    log = lambda *a: print(*a, flush=True)
    wall = time.perf_counter()
    # Ctrl-C and SIGTERM both raise KeyboardInterrupt, so every clean-up
    # below runs either way (SIGINT explicitly: a shell starts background
    # jobs with it ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)

    traffic.removeStale()
    baseline.removeStale(log)
    removeStaleDirs(log)
    baselineName = chooseBaseline(args, log) if "baseline" in args.systems else None
    # The code measured is the tree as it is now (the peers load it at
    # their start), whatever happens to it during the run.
    machine = report.machineFacts(os.path.dirname(HERE), {})
    args.traffic_label = None
    rows: list[dict] = []
    csvPath = os.path.join(args.out, "runs.csv")
    labels = {}
    with ExitStack() as stack:
        root = tempfile.mkdtemp(prefix=f"p2bench{os.getpid()}-", dir="/tmp")
        os.chmod(root, 0o755)  # Dovecot's unprivileged processes walk into it
        stack.callback(shutil.rmtree, root, True)
        log(f"working directory {root} (removed at the end)")
        systems = []
        if "p2pmta" in args.systems:
            system = P2PMTASystem(os.path.join(root, "p2pmta"), args.dht_nodes, args.poll_interval)
            os.makedirs(system.root)
            labels["p2pmta"] = system.label
            systems.append(system)
        if baselineName:
            broot = os.path.join(root, "baseline")
            os.makedirs(broot)
            system = (baseline.PostfixDovecot if baselineName == "postfix" else baseline.TwistedMail)(broot)
            labels["baseline"] = system.label
            systems.append(system)
        measure(systems, args, rows, csvPath, log)

    summary = report.summarise(rows, args, baselineName)
    caveats = []
    if args.n != 1000:
        caveats.append(f"the targets are stated for N = 1000; this run used N = {args.n}")
    if baselineName == "twisted":
        caveats.append("the baseline is the twisted.mail FALLBACK, not Postfix + Dovecot")
    if args.traffic_label and "FALLBACK" in args.traffic_label:
        caveats.append("traffic was counted with the lo-total FALLBACK (all loopback traffic)")
    if any(r.get("matched") != round(r["n"] * r["accept"]) for r in rows if r["phase"] != "probe"):
        caveats.append("some fetched bodies did not match what was sent (see runs.csv)")
    summary.update({
        "command": "python benchmarks/paper.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "mode": args.mode, "n": args.n, "runs": args.runs, "sizes": args.sizes, "kinds": args.kinds,
        "accepts": args.accepts, "chunk": args.chunk, "probe_count": args.probe, "dht_nodes": args.dht_nodes,
        "systems": labels, "baseline": baselineName,
        "traffic_method": rows[0]["traffic_method"] if rows else None, "traffic_label": args.traffic_label,
        "machine": {**machine, **baseline.versions()},
        "wall_s": time.perf_counter() - wall, "caveats": caveats,
    })
    summary["targets"] = report.targets(summary, args)
    header, lines = report.tableRows(summary, baselineName)
    md = report.markdown(summary, header, lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    figures = [] if args.no_plots else report.plots(summary, args.out, baselineName, log)
    summary["figures"] = figures
    report.writeJSON(os.path.join(args.out, "summary.json"), summary)

    log("")
    log(report.textTable(header, lines))
    log("")
    for t in summary["targets"]:
        log(f"{t['status']:>12}  {t['target']}: {report._value(t)} (target {t['bound']})")
    for c in caveats:
        log(f"      caveat  {c}")
    if args.markdown:
        log("")
        log(md)
    log(f"\nwrote {csvPath}, summary.json, results.md{', ' + ', '.join(figures) if figures else ''} "
        f"to {args.out} in {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything was stopped and removed", file=sys.stderr)
        sys.exit(130)
