"""
One system under test, driven through the workload: timed runs, the
acceptance sweep and the notification-latency probe.  Each returns rows
for C{runs.csv}.
"""

from __future__ import annotations

import random
import resource
import statistics
import time

from paperbench import workload
from paperbench.procstat import Sampler
from paperbench.workload import Reader, Sender, Spec


def _clientUsage() -> tuple[float, int]:
    """
    The CPU seconds and minor page faults of the calling thread so far: the
    mail client's own share of a fetch (it reads in the main thread).
    """
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


class Bench:
    """
    Runs the workload against C{system} (already started), counting
    traffic with C{counters} and processes with a L{Sampler}.
    """

    def __init__(self, system, counters, options, log=print) -> None:
        self.system = system
        self.counters = counters
        self.options = options
        self.log = log
        self.sampler = Sampler(system.roles(), options.sample_interval)
        self._runs = 0

    # Helpers

    def _receiverBytes(self, snapshot: dict[str, int]) -> int:
        return sum(snapshot[k] for k in self.counters.receiverKeys)

    def _quiet(self) -> float:
        """Wait until the receiver's traffic stops moving."""
        if self.counters.method == "lo-total":
            # Every program's loopback traffic moves that counter: it never
            # goes quiet.  Wait a fixed five settle times instead.
            wait = min(5 * self.options.settle, self.options.settle_limit)
            time.sleep(wait)
            return wait
        return workload.settle(lambda: self._receiverBytes(self.counters.snapshot()),
                               self.options.settle, self.options.settle_limit)

    def _reader(self) -> Reader:
        host, port, auth = self.system.imap
        return Reader(host, port, auth)

    def _sender(self, messages) -> Sender:
        host, port, auth = self.system.smtp
        return Sender(host, port, auth, self.system.mailFrom, self.system.rcptTo, messages)

    def clear(self, reader: Reader) -> None:
        """Delete whatever the INBOX holds and let the receiver go quiet (not measured)."""
        uids = reader.uids()
        if uids:
            reader.delete(uids)
            self._quiet()

    def _breakdown(self, delta: dict[str, int]) -> dict[str, int]:
        """The receiver's traffic by component and direction, and the local IMAP traffic."""
        out = {}
        keys = self.counters.receiverKeys
        if all(f"{k}_packets" in delta for k in keys):
            out["rx_packets"] = sum(delta[f"{k}_packets"] for k in keys)
        for k in keys:
            out[f"rx_{k}_bytes"] = delta[k]
            for direction in ("in", "out"):
                if f"{k}_{direction}" in delta:
                    out[f"rx_{k}_{direction}_bytes"] = delta[f"{k}_{direction}"]
        for k in self.counters.localKeys:
            out[f"{k}_bytes"] = delta[k]
        return out

    def _row(self, spec: Spec, **values) -> dict:
        row = {
            "system": self.system.name,
            "phase": spec.phase,
            "size": spec.size,
            "kind": spec.kind,
            "n": spec.n,
            "accept": spec.accept,
            "run": spec.run,
            "traffic_method": self.counters.method,
        }
        row.update(values)
        return row

    # A run

    def run(self, spec: Spec) -> dict:
        """
        Send C{spec.n} messages, read them as the paper's receiver does,
        and measure.  The time runs from the first SMTP submission to the
        last body fetched; traffic and CPU until the receiver is quiet.
        """
        self._runs += 1
        opts = self.options
        tag = f"{self.system.name}-{spec.phase}-{self._runs}-{random.getrandbits(24):06x}"
        messages = workload.makeMessages(self.system.mailFrom, self.system.rcptTo, tag, spec.n,
                                         workload.SIZES[spec.size], spec.kind, seed=self._runs)
        bySubject = {m.subject: m for m in messages}
        reader = self._reader()
        try:
            self.clear(reader)
            sender = self._sender(messages)
            before = self.counters.snapshot()
            self.sampler.begin()
            t0 = sender.go()

            def senderFailed():
                if sender.error is not None:
                    raise RuntimeError(f"SMTP submission failed: {sender.error!r}")

            first, listed = reader.waitForCount(spec.n, opts.list_timeout + spec.n * opts.list_timeout_per_message,
                                                opts.poll, senderFailed)
            uids = reader.uids()
            if len(uids) != spec.n:
                raise RuntimeError(f"expected {spec.n} messages in the INBOX, found {len(uids)}")
            k = round(spec.accept * spec.n)
            accepted = sorted(random.Random(self._runs).sample(uids, k))
            rejected = sorted(set(uids) - set(accepted))
            fetchStarted, clientBefore = time.perf_counter(), _clientUsage()
            bodies = reader.fetch(accepted, opts.chunk)
            fetched, clientAfter = time.perf_counter(), _clientUsage()
            atFetched = self.counters.snapshot()
            reader.delete(rejected)
            settled = self._quiet()
            after = self.counters.snapshot()
            processes = self.sampler.end()
            sender.join(60)
            senderFailed()

            matched = 0
            for body in bodies:
                message = bySubject.get(workload.subjectOf(body) or "")
                if message is not None and workload.matches(message, body):
                    matched += 1
            delta = {k: after[k] - before[k] for k in after}
            row = self._row(
                spec,
                e2e_s=fetched - t0,
                receive_s=fetched - first,
                submit_s=sender.replies[-1] - t0,
                first_listed_s=first - t0,
                all_listed_s=listed - t0,
                fetch_s=fetched - fetchStarted,
                client_fetch_cpu_s=clientAfter[0] - clientBefore[0],
                client_fetch_minflt=clientAfter[1] - clientBefore[1],
                settle_s=settled,
                fetched=len(bodies),
                matched=matched,
                rx_bytes=self._receiverBytes(delta),
                rx_bytes_at_fetched=self._receiverBytes({k: atFetched[k] - before[k] for k in atFetched}),
                **self._breakdown(delta),
            )
            for role, stats in processes.items():
                for key, value in stats.items():
                    row[f"{role}_{key}"] = value
            if matched != k:
                self.log(f"  !! {self.system.name}: {matched} of {k} bodies matched what was sent")
            # Leave the INBOX empty for the next run (not measured).
            reader.delete(accepted)
            self._quiet()
            return row
        finally:
            reader.close()

    # The probe

    def probe(self, count: int, size: str = "10k") -> list[dict]:
        """
        Notification latency: single messages sent one at a time; from
        each SMTP 250 to the message being listed in the receiver's INBOX.
        """
        messages = workload.makeMessages(self.system.mailFrom, self.system.rcptTo,
                                         f"{self.system.name}-probe-{random.getrandbits(24):06x}",
                                         count, workload.SIZES[size], "binary", seed=99)
        reader = self._reader()
        rows = []
        try:
            self.clear(reader)
            host, port, auth = self.system.smtp
            sender = Sender(host, port, auth, self.system.mailFrom, self.system.rcptTo, [])
            for i, message in enumerate(messages):
                sender.client.sendmail(self.system.mailFrom, [self.system.rcptTo], message.data)
                replied = time.perf_counter()
                _, listed = reader.waitForCount(i + 1, 60, self.options.probe_poll)
                rows.append(self._row(Spec("probe", 1, size, "binary", run=i), notify_s=listed - replied))
            sender.client.quit()
            self.clear(reader)
        finally:
            reader.close()
        latencies = [r["notify_s"] for r in rows]
        self.log(f"  {self.system.name}: notification latency median {statistics.median(latencies) * 1000:.1f} ms "
                 f"over {count} messages")
        return rows
