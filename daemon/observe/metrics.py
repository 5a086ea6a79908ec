"""Prometheus metrics. Per-job counts and histograms are plain numbers bumped as jobs start and
end, turned into metric families at scrape time (prometheus_client's Counter and Histogram take
a lock per increment: ~6% of the daemon's CPU in a drain); everything else is read from
in-memory state at scrape time, or from the database by a sampler on a timer (never per
scrape). Scrapes run on the event loop's thread, like the updates, so nothing is torn. Label
values are bounded: queues and kinds that are not configured or registered are reported as
"(other)", database schedules as "(db)", and job ids never become labels."""

from __future__ import annotations

import functools
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

OTHER = "(other)"
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600)


@functools.cache
def stoker_version() -> str:
    try:
        return version("stoker")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Snapshot:
    """What the scrape-time collector reads; filled by the runtime and the sampler."""

    running: Callable[[], dict[str, tuple[int, int]]] = dict  # queue -> (running, free)
    leader: Callable[[], bool] = lambda: False
    listener_reconnects: Callable[[], int] = lambda: 0
    discarded: Callable[[], int] = lambda: 0
    parked: Callable[[], int] = lambda: 0
    lost: Callable[[], int] = lambda: 0
    db_pool: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (size, in use)
    schedules: Callable[[], dict[str, tuple[int, int, float | None]]] = dict
    skipped_by_reason: Callable[[], dict[str, int]] = dict
    depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, state) -> jobs
    oldest_due: dict[str, float] = field(default_factory=dict)  # queue -> seconds
    # schedule label -> (last success epoch or None, consecutive failures, late) (sampled)
    schedule_health: dict[str, tuple[float | None, int, bool]] = field(default_factory=dict)
    # queue -> {"global" | "key" | "rate": the configured limit}: limited queues only
    limits: dict[str, dict[str, int]] = field(default_factory=dict)
    limited: Callable[[], dict[str, frozenset[str]]] = dict  # queue -> what held its pool back
    held_back: dict[str, int] = field(default_factory=dict)  # queue -> due jobs (sampled)
    # queue -> 1 while a live daemon serving it has other limits than this one, else 0
    limits_mismatch: Callable[[], dict[str, int]] = dict


class _Histogram:
    """One label set's buckets, counted the way Prometheus reads them: `le` is inclusive."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        family.add_metric(labels, buckets, sum_value=self.total)


class Metrics:
    def __init__(self, queues: Iterable[str], kinds: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queues = set(queues)
        self.kinds = set(kinds)
        self.snapshot = Snapshot()
        # Keyed by the bounded labels: unknown queues and kinds share "(other)".
        self.completed: dict[tuple[str, str, str], int] = {}
        self.duration: dict[tuple[str, str], _Histogram] = {}
        self.wait: dict[str, _Histogram] = {}
        self._wait_of_queue: dict[str, _Histogram] = {}  # any queue name -> its label's
        self.registry.register(_JobCollector(self))
        self.registry.register(_StateCollector(self.snapshot))

    def queue_label(self, queue: str) -> str:
        return queue if queue in self.queues else OTHER

    def kind_label(self, kind: str) -> str:
        return kind if kind in self.kinds else OTHER

    def job_ended(self, queue: str, kind: str, outcome: str, duration: float) -> None:
        q, k = self.queue_label(queue), self.kind_label(kind)
        key = (q, k, outcome)
        self.completed[key] = self.completed.get(key, 0) + 1
        if duration >= 0:
            histogram = self.duration.get((q, k))
            if histogram is None:
                histogram = self.duration[q, k] = _Histogram(DURATION_BUCKETS)
            histogram.observe(duration)

    def job_started(self, queue: str, wait: float) -> None:
        histogram = self._wait_of_queue.get(queue)
        if histogram is None:  # resolved once per queue name, not per job
            label = self.queue_label(queue)
            histogram = self.wait.setdefault(label, _Histogram(WAIT_BUCKETS))
            self._wait_of_queue[queue] = histogram
        histogram.observe(max(0.0, wait))


class _JobCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        completed = CounterMetricFamily(
            "stoker_jobs_completed",
            "Job attempts that ended, by outcome: succeeded, retried, failed, timed_out "
            "(a timed-out attempt is retried or failed, and counted only here), cancelled, "
            "handed_back.",
            labels=["queue", "kind", "outcome"],
        )
        for labels, count in sorted(m.completed.items()):
            completed.add_metric(list(labels), count)
        yield completed
        duration = HistogramMetricFamily(
            "stoker_job_duration_seconds", "How long handlers ran.", labels=["queue", "kind"]
        )
        for (queue, kind), histogram in sorted(m.duration.items()):
            histogram.add_to(duration, [queue, kind])
        yield duration
        wait = HistogramMetricFamily(
            "stoker_job_wait_seconds",
            "Queue wait: from run_at (when the job was due) to the start of the attempt.",
            labels=["queue"],
        )
        for queue, histogram in sorted(m.wait.items()):
            histogram.add_to(wait, [queue])
        yield wait


class _StateCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._s = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self._s
        running = GaugeMetricFamily("stoker_running_jobs", "Jobs running now.", labels=["queue"])
        free = GaugeMetricFamily("stoker_free_slots", "Free slots per queue.", labels=["queue"])
        for queue, (busy, slots) in sorted(s.running().items()):
            running.add_metric([queue], busy)
            free.add_metric([queue], slots)
        yield running
        yield free
        depth = GaugeMetricFamily(
            "stoker_queue_jobs", "Jobs per queue and state (sampled).", labels=["queue", "state"]
        )
        for (queue, state), count in sorted(s.depth.items()):
            depth.add_metric([queue, state], count)
        yield depth
        oldest = GaugeMetricFamily(
            "stoker_queue_oldest_due_seconds",
            "Age of the oldest job that is due and not started (sampled).",
            labels=["queue"],
        )
        for queue, age in sorted(s.oldest_due.items()):
            oldest.add_metric([queue], age)
        yield oldest
        yield from _limit_gauges(s)
        yield GaugeMetricFamily(
            "stoker_leader", "1 if this process fires the schedules.", value=int(s.leader())
        )
        yield CounterMetricFamily(
            "stoker_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            value=s.listener_reconnects(),
        )
        yield CounterMetricFamily(
            "stoker_outcomes_discarded",
            "Outcomes not written because the job's lease had passed to another attempt.",
            value=s.discarded(),
        )
        yield CounterMetricFamily(
            "stoker_outcomes_parked",
            "Finished outcomes stoker.job_history refused for good, kept in stoker.jobs.",
            value=s.parked(),
        )
        yield CounterMetricFamily(
            "stoker_outcomes_lost",
            "Outcomes PostgreSQL refused in every form: their jobs run again.",
            value=s.lost(),
        )
        size, in_use = s.db_pool()
        yield GaugeMetricFamily("stoker_db_pool_size", "Database pool connections.", value=size)
        yield GaugeMetricFamily("stoker_db_pool_in_use", "Pool connections in use.", value=in_use)
        fired = CounterMetricFamily(
            "stoker_schedule_ticks",
            "Schedule ticks by result (fired, skipped), while leading.",
            labels=["schedule", "result"],
        )
        last = GaugeMetricFamily(
            "stoker_schedule_last_tick_timestamp_seconds",
            "The last tick this process fired or skipped, per schedule.",
            labels=["schedule"],
        )
        for name, (n_fired, n_skipped, last_tick) in sorted(s.schedules().items()):
            fired.add_metric([name, "fired"], n_fired)
            fired.add_metric([name, "skipped"], n_skipped)
            if last_tick is not None:
                last.add_metric([name], last_tick)
        yield fired
        yield last
        last_ok = GaugeMetricFamily(
            "stoker_schedule_last_success_timestamp_seconds",
            "When the newest succeeded run of the schedule finished (sampled; absent until one "
            "has).",
            labels=["schedule"],
        )
        failures = GaugeMetricFamily(
            "stoker_schedule_consecutive_failures",
            "Runs of the schedule failed for good since its last success (sampled).",
            labels=["schedule"],
        )
        late = GaugeMetricFamily(
            "stoker_schedule_late",
            "1 if the schedule's newest fired tick has not started a minute after it was due, "
            "or its next tick is a minute overdue (sampled).",
            labels=["schedule"],
        )
        for name, (success, n_failed, is_late) in sorted(s.schedule_health.items()):
            if success is not None:
                last_ok.add_metric([name], success)
            failures.add_metric([name], n_failed)
            late.add_metric([name], int(is_late))
        yield last_ok
        yield failures
        yield late
        skipped = CounterMetricFamily(
            "stoker_schedule_ticks_skipped",
            "Ticks not fired, by reason (skipped_overlap: the previous run still going; "
            "skipped_catch_up: passed over by the catch-up policy), while leading.",
            labels=["reason"],
        )
        for reason, n in sorted(s.skipped_by_reason().items()):
            skipped.add_metric([reason], n)
        yield skipped
        info = GaugeMetricFamily(
            "stoker_build_info", "Version information.", labels=["version", "python"]
        )
        info.add_metric([stoker_version(), platform.python_version()], 1)
        yield info


def _limit_gauges(s: Snapshot) -> Iterable[Metric]:
    limit = GaugeMetricFamily(
        "stoker_queue_limit",
        "A queue's configured limit: global (jobs running at once, all daemons), key (running "
        "per concurrency_key), rate (starts per rate_limit window).",
        labels=["queue", "limit"],
    )
    limited = GaugeMetricFamily(
        "stoker_queue_limited",
        "1 while this daemon's last claim of the queue was held back by the limit.",
        labels=["queue", "limit"],
    )
    held = s.limited()
    for queue, limits in sorted(s.limits.items()):
        for name, value in sorted(limits.items()):
            limit.add_metric([queue, name], value)
            limited.add_metric([queue, name], int(name in held.get(queue, ())))
    yield limit
    yield limited
    held_back = GaugeMetricFamily(
        "stoker_queue_limit_held_back",
        "Due jobs of a limited queue waiting because a limit is reached (sampled).",
        labels=["queue"],
    )
    for queue, n in sorted(s.held_back.items()):
        held_back.add_metric([queue], n)
    yield held_back
    mismatch = GaugeMetricFamily(
        "stoker_queue_limits_mismatch",
        "1 while another live daemon serving the queue is configured with other limits: the "
        "limit that holds then depends on which daemon claims (heartbeat).",
        labels=["queue"],
    )
    for queue, n in sorted(s.limits_mismatch().items()):
        mismatch.add_metric([queue], n)
    yield mismatch
