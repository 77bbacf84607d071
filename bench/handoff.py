"""Hand-off latency: from ``Client.submit`` to the handler's first line on an idle slot.

One slot worker runs as a subprocess (``python -m apipool slot``) on a throwaway
redis-server with two handlers that return ``{"started": time.time()}`` at entry:
``record_start`` (sync: the slot runs it in a worker thread) and
``record_start_async`` (awaited in the slot's event loop). Jobs are submitted
one at a time, alternating the two, each after the previous result came back
and a 1 ms pause, so the slot is idle, blocked in ``BLMOVE``, when a job arrives.

Per job, from the envelope's ``submitted_at`` (set by ``make_envelope`` right
before the submit round trip; read back from the envelope the client sent):

- ``handoff``: ``result["started"] - submitted_at``, the handler's entry;
- ``slot_start``: the result record's ``started_at - submitted_at``, the slot's
  own timestamp right before it builds the call (after parse and fence);
- ``roundtrip``: ``Client.wait`` returned - ``submitted_at`` (whole call).
"""

from __future__ import annotations

import json
import time
from typing import Any

from apipool.client import Client, JobResult
from apipool.errors import ResultTimeout
from apipool.testing.redis_server import RedisServer

from .common import Figures, SlotSubprocess, Target, maximum, percentile

POOL = "bench-handoff"
HANDLERS = {
    "sync": "sync=bench.handlers:record_start",
    "async": "async=bench.handlers:record_start_async",
}
GAP = 0.001
"""Pause between a result and the next submit (the slot goes back to BLMOVE)."""

TARGETS = {
    "handoff_sync_p50_ms": Target("<=", 0.5),
    "handoff_sync_p99_ms": Target("<=", 2.0),
    "handoff_async_p50_ms": Target("<=", 0.5),
    "handoff_async_p99_ms": Target("<=", 2.0),
}


class StampingClient(Client):
    """A Client that keeps the envelopes it sent, to read their ``submitted_at``."""

    def __init__(self, redis_url: str, pool: str) -> None:
        super().__init__(redis_url, pool)
        self.sent: dict[str, str] = {}

    def _encode(self, payload: Any, deadline: float | None, handler: str | None) -> tuple[str, str]:
        job_id, raw = super()._encode(payload, deadline, handler)
        self.sent[job_id] = raw  # parsed only after the result is back
        return job_id, raw

    def __enter__(self) -> StampingClient:
        return self

    def submitted_at(self, job_id: str) -> float:
        return float(json.loads(self.sent.pop(job_id))["submitted_at"])


def _wait(client: Client, slot: SlotSubprocess, job_id: str, timeout: float) -> JobResult:
    """Wait for a result in short steps, failing early if the slot died."""
    deadline = time.monotonic() + timeout
    while True:
        slot.check_alive()
        step = min(1.0, deadline - time.monotonic())
        if step <= 0:
            raise TimeoutError(f"no result for job {job_id} within {timeout:g} s")
        try:
            return client.wait(job_id, step)
        except ResultTimeout:
            continue


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    samples = 200 if quick else 2000
    warmup = 50 if quick else 200
    lat: dict[str, dict[str, list[float]]] = {
        kind: {"handoff": [], "slot_start": [], "roundtrip": []} for kind in HANDLERS
    }
    server = RedisServer()
    server.start()
    try:
        with (
            SlotSubprocess(server.url, POOL, list(HANDLERS.values())) as slot,
            StampingClient(server.url, POOL) as client,
        ):
            # The first job waits for the slot process to start and take its lease.
            _wait(client, slot, client.submit({}, handler="sync"), timeout=30.0)
            kinds = list(HANDLERS)
            for i in range(warmup + 2 * samples):
                kind = kinds[i % 2]
                time.sleep(GAP)
                job_id = client.submit({"i": i}, handler=kind)
                record = _wait(client, slot, job_id, timeout=10.0)
                done = time.time()
                submitted = client.submitted_at(job_id)
                if record.status != "ok":
                    raise RuntimeError(f"job {job_id}: {record.status} {record.error}")
                if i < warmup:
                    continue
                lat[kind]["handoff"].append(_ms(float(record.result["started"]) - submitted))
                if record.started_at is not None:
                    lat[kind]["slot_start"].append(_ms(record.started_at - submitted))
                lat[kind]["roundtrip"].append(_ms(done - submitted))
    finally:
        server.close()

    figures: Figures = {"samples_per_handler": samples}
    for kind, series in lat.items():
        for what, values in series.items():
            qs = (50, 90, 99) if what == "handoff" else (50, 99)
            for q in qs:
                figures[f"{what}_{kind}_p{q}_ms"] = round(percentile(values, q), 3)
            figures[f"{what}_{kind}_max_ms"] = round(maximum(values), 3)
    return figures
