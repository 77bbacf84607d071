"""Prometheus metrics of one slot worker (its own registry, served on /metrics).

Every series a dashboard may look for exists from the start (at 0): one
``apipool_calls_total`` per :class:`~apipool.protocol.Outcome` value and one
``apipool_failures_total`` per cause in :data:`FAILURE_CAUSES`, one
``apipool_redis_errors_total`` per kind (``transient``, ``permanent``), and,
given the slot's :class:`~apipool.slot_time.SlotTime`, one
``apipool_slot_seconds_total`` per state, read from it at each scrape (so it is
exactly what the slot accounted, the open stretch included).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .protocol import Outcome
from .redis_checks import ERROR_KINDS, ErrorKind
from .slot_time import SlotTime

FailureCause = Literal[
    "error", "timeout", "malformed", "unknown handler", "permanent", "bad result"
]
"""Why a job did not succeed (label ``cause`` of apipool_failures_total): the handler
raised (``error``), overran its timeout, the envelope or its result key was unusable
(``malformed``), no such handler, the handler said retrying cannot help or raised a
BaseException (``permanent``), its result was not JSON or too large (``bad result``)."""
FAILURE_CAUSES: tuple[FailureCause, ...] = get_args(FailureCause)


class SlotMetrics:
    """The metrics of slot ``slot`` of pool ``pool``, labelled with both."""

    def __init__(self, pool: str, slot: int, slot_time: SlotTime | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"pool": pool, "slot": str(slot)}
        self._labels = labels
        if slot_time is not None:
            self.registry.register(SlotSecondsCollector(slot_time, labels))
        self.calls = Counter(
            "apipool_calls",
            "Jobs this slot was done with, by outcome (ok, expired, dead, retried, recovered)",
            ["pool", "slot", "outcome"],
            registry=self.registry,
        )
        for outcome in Outcome:
            self.calls.labels(outcome=outcome.value, **labels)
        self.failures = Counter(
            "apipool_failures",
            "Jobs that did not succeed here, by cause (error, timeout, malformed, unknown handler,"
            " permanent, bad result)",
            ["pool", "slot", "cause"],
            registry=self.registry,
        )
        for cause in FAILURE_CAUSES:
            self.failures.labels(cause=cause, **labels)
        self.redis_errors = Counter(
            "apipool_redis_errors",
            "Redis errors met while writing or taking jobs, by kind (transient, permanent)",
            ["pool", "slot", "kind"],
            registry=self.registry,
        )
        for kind in ERROR_KINDS:
            self.redis_errors.labels(kind=kind, **labels)
        self.busy_seconds = Counter(
            "apipool_busy_seconds",
            "Seconds this slot spent inside handler calls",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.queue_wait = Histogram(
            "apipool_queue_wait_seconds",
            "Seconds from submission to the start of the handler call",
            ["pool", "slot"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        ).labels(**labels)
        self.attempts = Histogram(
            "apipool_attempt",
            "Attempt number of the calls this slot started",
            ["pool", "slot"],
            buckets=(1, 2, 3, 5, 10),
            registry=self.registry,
        ).labels(**labels)
        self.lease_losses = Counter(
            "apipool_lease_losses",
            "Times this slot found its lease gone or taken",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.busy = Gauge(
            "apipool_slot_busy",
            "1 while a handler call is in progress",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.lease_held = Gauge(
            "apipool_lease_held",
            "1 while this slot holds its lease",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.ledger_errors = Counter(
            "apipool_ledger_write_errors",
            "Failed writes of this slot's seconds to the pool's ledger (kept for the next write)",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.expired_unread = Counter(
            "apipool_results_expired_unread",
            "Results of paid calls that expired before anyone read them (counted by the slot"
            " that swept them; sum over the slots)",
            ["pool", "slot"],
            registry=self.registry,
        ).labels(**labels)
        self.effective_slots = self._gauge(
            "apipool_effective_slots", "The pool's effective concurrency as this slot last saw it"
        )
        self.parked = self._gauge(
            "apipool_slot_parked", "1 while this slot is parked above the effective concurrency"
        )
        self.pause_remaining = self._gauge(
            "apipool_pause_seconds_remaining", "Seconds left of the pool's Retry-After pause"
        )

    def _gauge(self, name: str, text: str) -> Gauge:
        return Gauge(name, text, ["pool", "slot"], registry=self.registry).labels(**self._labels)

    def outcome(
        self, outcome: Outcome, *, cause: FailureCause | None = None, count: int = 1
    ) -> None:
        """Count ``count`` jobs' outcome here, and why they failed when they did."""
        self.calls.labels(outcome=outcome.value, **self._labels).inc(count)
        if cause is not None:
            self.failures.labels(cause=cause, **self._labels).inc(count)

    def redis_error(self, kind: ErrorKind) -> None:
        """Count one Redis error of ``kind``."""
        self.redis_errors.labels(kind=kind, **self._labels).inc()


class SlotSecondsCollector(Collector):
    """``apipool_slot_seconds_total{state}``: the slot's :meth:`SlotTime.totals` at scrape time."""

    def __init__(self, slot_time: SlotTime, labels: dict[str, str]) -> None:
        self.slot_time = slot_time
        self.labels = labels

    def describe(self) -> Iterator[Metric]:
        return iter([self._family()])

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "apipool_slot_seconds",
            "Seconds of this slot process's wall time, by state (they add up to its uptime)",
            labels=["pool", "slot", "state"],
        )

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        values = [self.labels["pool"], self.labels["slot"]]
        for state, seconds in self.slot_time.totals().items():
            family.add_metric([*values, state], seconds)
        yield family
