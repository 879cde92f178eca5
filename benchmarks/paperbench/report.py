"""
What a benchmark run leaves behind: C{runs.csv} (every run), the table on
stdout, C{summary.json} (medians, ratios, targets, machine facts),
C{results.md} (table and targets, for the README) and the figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

#: The issue's targets: (what, summary key, comparison, bound, unit).
TARGETS = [
    ("end to end, 1000 × 10 KB binary", "e2e_ratio_10k_binary", "<=", 1.0, "× baseline"),
    ("end to end, 1000 × 1 MB binary", "e2e_ratio_1m_binary", "<=", 0.8, "× baseline"),
    ("receiver traffic, 10 KB text", "traffic_ratio_10k_text", "<=", 0.5, "× baseline"),
    ("receiver traffic, 10 KB binary", "traffic_ratio_10k_binary", "<=", 0.85, "× baseline"),
    ("receiver traffic, p = 0 (all rejected)", "traffic_ratio_reject_all", "<=", 0.15, "× baseline"),
    ("break-even acceptance", "break_even_acceptance", ">", 1.0, "(1.0 = 100 %)"),
    ("notification latency, median", "notify_latency_median_s", "<", 0.2, "s"),
    ("peak RSS of a peer receiving 1 MB messages", "peak_rss_mb", "<", 200, "MB"),
]

#: One colour per system (baseline, p2pmta); text dashed, binary solid.
COLORS = ("tab:orange", "tab:blue")
SIZE_KB = {"1k": 1, "10k": 10, "100k": 100, "1m": 1024}
MB = 1024 * 1024


# runs.csv


def writeCSV(path: str, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# Medians


def _measured(rows, key, **match) -> list[dict]:
    """The rows of the variant C{match} that have a figure for C{key}."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None]


def _median(rows, key, **match):
    values = [r[key] for r in _measured(rows, key, **match)]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def runByRun(p2p: list[dict], base: list[dict], key: str, **match) -> list[float]:
    """
    The ratio p2pmta / baseline of C{key} for each run index both systems
    have for the variant C{match}: the two turns of one run, taken in the
    same minutes, so that the machine's drift between runs cancels out.
    """
    ours, theirs = ({r["run"]: r[key] for r in _measured(rows, key, **match)} for rows in (p2p, base))
    return [ours[run] / theirs[run] for run in sorted(ours) if theirs.get(run)]


def breakEven(points: list[tuple[float, float, float]]) -> tuple[float | None, str]:
    """
    The acceptance p where p2pmta's traffic curve crosses the baseline's.

    @param points: C{(p, p2pmta bytes, baseline bytes)}, sorted by p.
    @return: (p, how it was found): interpolated between the two measured
        p around the crossing; else, where straight lines fitted (least
        squares) to the two curves meet, which is above 1 when p2pmta
        stays below the baseline at every p; L{None} if they never meet.
    """
    if not points:
        return None, "not measured"
    ps = [p for p, _, _ in points]
    diff = [a - b for _, a, b in points]
    for i, d in enumerate(diff):
        if d == 0:
            return ps[i], "measured"
        if i and diff[i - 1] * d < 0:
            p0, p1, d0 = ps[i - 1], ps[i], diff[i - 1]
            return p0 + (p1 - p0) * (-d0) / (d - d0), "interpolated between measured points"
    if len(points) < 2:
        return None, "one point only"

    def fit(ys):
        mp, my = statistics.fmean(ps), statistics.fmean(ys)
        slope = sum((p - mp) * (y - my) for p, y in zip(ps, ys)) / sum((p - mp) ** 2 for p in ps)
        return my - slope * mp, slope

    a1, b1 = fit([a for _, a, _ in points])
    a2, b2 = fit([b for _, _, b in points])
    if math.isclose(b1, b2):
        return None, "the fitted lines are parallel: the curves never cross"
    crossing = (a2 - a1) / (b1 - b2)
    below = diff[-1] < 0
    if below and crossing <= ps[-1]:
        return None, "p2pmta is below the baseline at every p and the fitted lines diverge: never crosses"
    return crossing, "extrapolated: where least-squares lines through the two curves meet"


def summarise(rows: list[dict], options, baselineName: str | None) -> dict:
    p2p = [r for r in rows if r["system"] == "p2pmta"]
    base = [r for r in rows if baselineName and r["system"] == baselineName]

    def ratio(key, **match):
        return _ratio(_median(p2p, key, **match), _median(base, key, **match))

    sweep = []
    for p in sorted({r["accept"] for r in rows if r["phase"] == "sweep"}):
        a = _median(p2p, "rx_bytes", phase="sweep", accept=p)
        b = _median(base, "rx_bytes", phase="sweep", accept=p)
        if a is not None and b is not None:
            sweep.append((p, a, b))
    breakEvenP, breakEvenMethod = breakEven(sweep)
    big = [r for r in p2p if r["phase"] == "variant" and r["size"] == "1m"]
    peak = max((max(r.get("receiver_peak_rss_mb", 0), r.get("sender_peak_rss_mb", 0)) for r in big), default=None)
    return {
        "e2e_ratio_10k_binary": ratio("e2e_s", phase="variant", size="10k", kind="binary"),
        "e2e_ratio_1m_binary": ratio("e2e_s", phase="variant", size="1m", kind="binary"),
        "e2e_by_run_10k_binary": runByRun(p2p, base, "e2e_s", phase="variant", size="10k", kind="binary"),
        "e2e_by_run_1m_binary": runByRun(p2p, base, "e2e_s", phase="variant", size="1m", kind="binary"),
        "traffic_ratio_10k_text": ratio("rx_bytes", phase="variant", size="10k", kind="text"),
        "traffic_ratio_10k_binary": ratio("rx_bytes", phase="variant", size="10k", kind="binary"),
        "traffic_ratio_reject_all": _ratio(_median(p2p, "rx_bytes", phase="sweep", accept=0.0),
                                           _median(base, "rx_bytes", phase="sweep", accept=0.0)),
        "break_even_acceptance": breakEvenP,
        "break_even_method": breakEvenMethod,
        "notify_latency_median_s": _median(p2p, "notify_s", phase="probe"),
        "baseline_notify_latency_median_s": _median(base, "notify_s", phase="probe"),
        "peak_rss_mb": peak,
        "peak_rss_note": "largest peak RSS (sampled sum over the peer's processes) of alice or bob "
                         "during the 1 MB variants" if big else "no 1 MB variant was run",
        "sweep": [{"accept": p, "p2pmta_rx_bytes": a, "baseline_rx_bytes": b} for p, a, b in sweep],
        "medians": medians(rows),
    }


def medians(rows: list[dict]) -> list[dict]:
    """Per system and variant, the median of every measured figure over its runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["phase"] in ("variant", "sweep"):
            groups.setdefault((r["system"], r["phase"], r["size"], r["kind"], r["accept"]), []).append(r)
    out = []
    for (system, phase, size, kind, accept), runs in groups.items():
        entry = {"system": system, "phase": phase, "size": size, "kind": kind, "accept": accept, "runs": len(runs)}
        for key in runs[0]:
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
            if key not in entry and key not in ("run", "n") and len(values) == len(runs):
                entry[key] = statistics.median(values)
        entry["n"] = runs[0]["n"]
        out.append(entry)
    return out


def targets(summary: dict, options) -> list[dict]:
    out = []
    for what, key, op, bound, unit in TARGETS:
        value = summary.get(key)
        if value is None:
            status = "not measured"
        else:
            met = {"<=": value <= bound, "<": value < bound, ">": value > bound}[op]
            status = "met" if met else "not met"
        out.append({"target": what, "key": key, "bound": f"{op} {bound} {unit}".strip(), "value": value,
                    "status": status})
    return out


# Machine facts


def machineFacts(repo: str, extra: dict) -> dict:
    def first(argv):
        try:
            return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except Exception:
            return None

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    facts = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "gpg": first(["gpg", "--version"]),
    }
    try:
        import opendht

        import twisted

        facts["twisted"] = twisted.__version__
        facts["opendht"] = getattr(opendht, "__version__", None) or first([sys.executable, "-m", "pip", "show", "-q", "opendht"])
    except ImportError:
        pass
    facts["p2pmta_commit"] = first(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "p2pmta"],
                           check=False, capture_output=True, text=True).stdout
    facts["p2pmta_tree_modified"] = bool(dirty.strip())
    facts.update(extra)
    return facts


# The table


def _fmt(value, digits=2, scale=1.0):
    if value is None:
        return "-"
    return f"{value / scale:.{digits}f}"


def tableRows(summary: dict, baselineName: str | None) -> tuple[list[str], list[list[str]]]:
    byKey = {}
    for m in summary["medians"]:
        byKey.setdefault((m["phase"], m["size"], m["kind"], m["accept"]), {})[m["system"]] = m
    header = ["variant", "n", "e2e s p2p", "e2e s base", "e2e ×", "recv s p2p", "recv s base",
              "rx MB p2p", "rx MB base", "rx ×", "imap MB p2p", "RSS MB bob/alice", "RSS MB base",
              "CPU s bob/alice", "CPU s base", "bodies ok"]
    lines = []
    order = {"variant": 0, "sweep": 1}
    for key in sorted(byKey, key=lambda k: (order[k[0]], SIZE_KB[k[1]], k[2], k[3])):
        phase, size, kind, accept = key
        p, b = byKey[key].get("p2pmta", {}), byKey[key].get(baselineName, {}) if baselineName else {}
        name = f"{size} {kind}" + (f" p={accept:g}" if phase == "sweep" else "")
        ok = []
        for system, m in (("p2p", p), ("base", b)):
            if m:
                ok.append(f"{m.get('matched', 0):.0f}/{round(m['n'] * m['accept'])}")
        lines.append([
            name, str(p.get("n") or b.get("n")),
            _fmt(p.get("e2e_s")), _fmt(b.get("e2e_s")), _fmt(_ratio(p.get("e2e_s"), b.get("e2e_s"))),
            _fmt(p.get("receive_s")), _fmt(b.get("receive_s")),
            _fmt(p.get("rx_bytes"), 2, MB), _fmt(b.get("rx_bytes"), 2, MB),
            _fmt(_ratio(p.get("rx_bytes"), b.get("rx_bytes"))),
            _fmt(p.get("imap_bytes"), 2, MB),
            f"{_fmt(p.get('receiver_peak_rss_mb'), 0)}/{_fmt(p.get('sender_peak_rss_mb'), 0)}" if p else "-",
            _fmt(b.get("receiver_peak_rss_mb"), 0),
            f"{_fmt(p.get('receiver_cpu_s'), 1)}/{_fmt(p.get('sender_cpu_s'), 1)}" if p else "-",
            _fmt(b.get("receiver_cpu_s"), 1),
            " ".join(ok),
        ])
    return header, lines


def textTable(header, lines) -> str:
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join(out)


def markdownTable(header, lines) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in lines]
    return "\n".join(out)


def _value(t):
    v = t["value"]
    return "-" if v is None else f"{v:.3g}"


def markdown(summary: dict, header, lines) -> str:
    facts = summary["machine"]
    out = [
        (f"Run of {facts['date']}: `{summary['command']}` ({summary['mode']} mode, N = {summary['n']}, "
         f"{summary['runs']} run(s) per variant, medians), {summary['wall_s']:.0f} s wall."),
        "",
        f"- p2pmta: {summary['systems'].get('p2pmta', 'not run')}",
        f"- baseline: {summary['systems'].get('baseline', 'not run')}",
        f"- traffic counted with: {summary['traffic_label']}",
        f"- machine: {facts['nproc']} cores ({facts['cpu']}), {facts['memory']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}, {facts['gpg']}, Postfix {facts.get('postfix', '-')}, "
        f"Dovecot {facts.get('dovecot', '-')}, p2pmta {facts['p2pmta_commit']}"
        + (" (modified)" if facts["p2pmta_tree_modified"] else ""),
        "",
        ("Times in seconds, traffic in MiB (receiver, both directions), RSS in MiB, CPU in seconds; "
         "`×` is p2pmta / baseline."),
        "",
        markdownTable(header, lines),
        "",
        (f"Notification latency (SMTP 250 → listed in the receiver's INBOX), median of "
         f"{summary['probe_count']}: p2pmta {_fmt(summary['notify_latency_median_s'], 3)} s, "
         f"baseline {_fmt(summary['baseline_notify_latency_median_s'], 3)} s."),
        "",
        "| target | bound | measured | status |",
        "|---|---|---|---|",
    ]
    for t in summary["targets"]:
        out.append(f"| {t['target']} | {t['bound']} | {_value(t)} | {t['status']} |")
    byRun = [(label, summary.get(key) or []) for label, key in
             (("10 KB binary", "e2e_by_run_10k_binary"), ("1 MB binary", "e2e_by_run_1m_binary"))]
    if any(ratios for _, ratios in byRun):
        out += ["", "End to end, run by run (p2pmta / baseline within each run's pair of turns): "
                + "; ".join(f"{label} {', '.join(f'{r:.2f}' for r in ratios)}" for label, ratios in byRun if ratios)
                + "."]
    if summary["caveats"]:
        out += ["", "Caveats:"] + [f"- {c}" for c in summary["caveats"]]
    return "\n".join(out) + "\n"


# Figures


def plots(summary: dict, outDir: str, baselineName: str | None, log=print) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    meds = summary["medians"]
    n = summary["n"]
    names = {"p2pmta": "p2pmta", baselineName: f"baseline ({baselineName})"}
    made = []

    def series(system, kind, key):
        pts = sorted((SIZE_KB[m["size"]], m.get(key)) for m in meds
                     if m["system"] == system and m["phase"] == "variant" and m["kind"] == kind)
        return [x for x, _ in pts], [y for _, y in pts]

    for name, key, scale, ylabel, title in (
        ("fig3_time_vs_size.png", "e2e_s", 1, "seconds", f"Time to receive {n} messages"),
        ("fig4_traffic_vs_size.png", "rx_bytes", MB, "MiB (in + out)", f"Receiver traffic, {n} messages"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for system in ("p2pmta", baselineName):
            for kind, style in (("text", "--"), ("binary", "-")):
                xs, ys = series(system, kind, key)
                if xs:
                    ax.plot(xs, [y / scale for y in ys], style, marker="o", color=COLORS[system == "p2pmta"],
                            label=f"{names[system]}, {kind}")
                    drawn = True
        if drawn:
            # Both span orders of magnitude (1 KB to 1 MB): log on both axes.
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks([SIZE_KB[s] for s in SIZE_KB], ["1K", "10K", "100K", "1M"])
            ax.set_xlabel("attachment size")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(outDir, name), dpi=120)
            made.append(name)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for system in ("p2pmta", baselineName):
        pts = sorted((m["accept"], m["rx_bytes"]) for m in meds if m["system"] == system and m["phase"] == "sweep")
        if pts:
            ax.plot([p * 100 for p, _ in pts], [b / MB for _, b in pts], marker="o", color=COLORS[system == "p2pmta"],
                    label=names[system])
            drawn = True
    if drawn:
        ax.set_xlabel("messages accepted (%)")
        ax.set_ylabel("MiB (in + out)")
        ax.set_title(f"Receiver traffic vs acceptance, {n} × 10 KB binary")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(outDir, "fig5_traffic_vs_acceptance.png"), dpi=120)
        made.append("fig5_traffic_vs_acceptance.png")
    plt.close(fig)
    return made


def copyLogs(paths: list[str], outDir: str, system: str) -> None:
    """Keep the systems' logs of the last run under C{OUT/logs/SYSTEM/}."""
    target = os.path.join(outDir, "logs", system)
    shutil.rmtree(target, True)
    os.makedirs(target, exist_ok=True)
    for path in paths:
        if path and os.path.exists(path):
            shutil.copy(path, target)


def writeJSON(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
