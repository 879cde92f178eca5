"""
Peak RSS and CPU seconds of a system's processes, read from /proc.

A system is a set of processes that changes while it runs (Postfix starts
an smtpd per connection, p2pmta a gpg per operation), so a L{ProcessSet}
names roots and marks, and is resolved anew at every sample:

  - members: the roots, every process whose command line contains one of
    the marks (p2pmta's gpg-agent is a daemon re-parented to init, found
    by the peer's data dir in its C{--homedir}), and all their descendants;
  - RSS: the sum of the members' resident sets (/proc/PID/statm), sampled
    every C{interval} seconds; the peak is the largest sum seen.  Shared
    pages count once per process, as C{ps} shows them, except that a child
    caught between fork and exec (still a copy of its parent) is left out;
  - CPU: user + system time of the members, plus the time of the children
    they have reaped (cutime, cstime in /proc/PID/stat).  That total,
    taken at the start and at the end of a run, counts each CPU second of
    the set once, even for processes born and gone between two samples,
    as long as they were reaped inside the set (Postfix's master and
    Dovecot's reap their workers, twistd reaps its gpg).
"""

from __future__ import annotations

import os
import threading

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcessSet:
    """Processes named by root PIDs and by marks in their command lines."""

    def __init__(self, roots: list[int], marks: list[str] = ()) -> None:
        self.roots = list(roots)
        self.marks = [m.encode() for m in marks]

    def members(self, table: dict[int, tuple]) -> set[int]:
        chosen = {pid for pid in self.roots if pid in table}
        if self.marks:
            for pid in table:
                if pid not in chosen and any(m in _cmdline(pid) for m in self.marks):
                    chosen.add(pid)
        # Close over descendants.
        children: dict[int, list[int]] = {}
        for pid, row in table.items():
            children.setdefault(row[0], []).append(pid)
        stack = list(chosen)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in chosen:
                    chosen.add(child)
                    stack.append(child)
        return chosen


#: Set in a process between fork and exec (/proc/PID/stat flags).
PF_FORKNOEXEC = 0x40


def processTable() -> dict[int, tuple[int, float, float, int]]:
    """
    C{{pid: (ppid, cpu seconds incl. reaped children, own cpu seconds,
    flags)}} of every process.
    """
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        # fields[0] is the state (field 3 of stat(5)); ppid is field 4,
        # utime..cstime are fields 14-17.
        own = int(fields[11]) + int(fields[12])
        reaped = int(fields[13]) + int(fields[14])
        table[int(name)] = (int(fields[1]), (own + reaped) / _TICK, own / _TICK, int(fields[6]))
    return table


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def rssBytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _resetPeak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); needs the right
    # to write there (root, or the same user).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Sampler:
    """
    Samples the RSS of several named process sets in a thread, and their
    CPU seconds at the start and the end of a run.
    """

    def __init__(self, roles: dict[str, ProcessSet], interval: float = 0.1) -> None:
        self.roles = roles
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cpu(self, table) -> dict[str, tuple[float, float]]:
        """Per role: (CPU of the whole set, CPU of its root processes alone)."""
        return {
            role: (sum(table[p][1] for p in ps.members(table)), sum(table[p][2] for p in ps.roots if p in table))
            for role, ps in self.roles.items()
        }

    def begin(self) -> None:
        self.peakRSS = {role: 0 for role in self.roles}
        for ps in self.roles.values():
            for pid in ps.roots:
                _resetPeak(pid)
        self._cpu0 = self._cpu(processTable())
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="procstat", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        table = processTable()
        for role, ps in self.roles.items():
            members = ps.members(table)
            # A child caught between fork and exec (twistd starting a gpg)
            # still maps its parent's memory: counting it would count the
            # parent twice.
            total = sum(rssBytes(p) for p in members
                        if not (table[p][3] & PF_FORKNOEXEC and table[p][0] in members))
            self.peakRSS[role] = max(self.peakRSS[role], total)

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def end(self) -> dict[str, dict[str, float]]:
        """
        @return: per role, C{peak_rss_mb} (sampled sum), C{root_hwm_mb}
            (the kernel's peak RSS of the largest root process since
            L{begin}), C{cpu_s} (the whole set) and C{root_cpu_s} (the
            root processes' own, without their children: for p2pmta, the
            twistd process without gpg).
        """
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu1 = self._cpu(processTable())
        mb = 1024 * 1024
        return {
            role: {
                "peak_rss_mb": self.peakRSS[role] / mb,
                "root_hwm_mb": max((_peak(p) for p in ps.roots), default=0) / mb,
                "cpu_s": cpu1[role][0] - self._cpu0[role][0],
                "root_cpu_s": cpu1[role][1] - self._cpu0[role][1],
            }
            for role, ps in self.roles.items()
        }
