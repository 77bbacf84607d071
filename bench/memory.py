"""Peak memory of a slot that refuses hostile input, side by side with an idle slot.

Every case runs a fresh slot process (``python -m apipool slot``) against one
throwaway redis-server and reads its peak resident set size (``VmHWM`` of
``/proc/<pid>/status``) once the case's outcome is written:

- ``idle``: a slot that served one small job;
- ``envelope_queued``: a 50 MiB envelope queued before the slot starts; the slot's
  TAKE script dead-letters it inside Redis (over ``--max-envelope-bytes``, 1 MiB
  by default), so it never reaches the slot; then one small job;
- ``response``: the built-in ``http`` handler (``--allow-url`` naming a loopback
  server) calls a URL that answers with a 100 MiB body; the handler stops reading
  past ``--max-response-bytes`` (8 MiB by default) and the call fails;
- ``envelope_waiting``: the same 50 MiB envelope pushed while the slot is blocked
  in ``BLMOVE`` on an empty queue (the WAIT step): Redis hands the whole element
  over, so the slot receives it before it can check its size;
- ``push_refused_at_proto_max_bulk_len_2mb``: whether Redis itself refuses that push once
  ``proto-max-bulk-len`` is 2 MB (the bound docs/operations.md recommends);
- ``idle_pss``: the proportional set size (``Pss`` of ``smaps_rollup``: pages
  shared by a fork counted once) of an idle slot that served one job, plain and
  under a keeper (the keeper, its active worker and its warm standby together):
  what the standby costs.

Targets: tens of MiB for the refusals (an idle slot is about 50 MiB).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from apipool import defaults
from apipool.client import Client, JobResult
from apipool.layout import PoolKeys
from apipool.settings import HttpPolicy
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer

from .common import MIB, Figures, SlotSubprocess, Target, children, peak_rss_mib, pss_mib

POOL = "bench-memory"
ENVELOPE_BYTES = 50 * MIB
RESPONSE_BYTES = 100 * MIB
REFUSAL_TARGET_MIB = 80.0
"""Peak RSS a slot may reach while refusing a 50 MiB envelope or a 100 MiB response."""
PROTO_MAX_BULK_LEN = "2mb"
WAIT_BLOCK = 5.0
"""``--take-block`` of the ``envelope_waiting`` slot: long enough that the push lands
while it waits in BLMOVE, short enough for a quick graceful stop afterwards."""
OUTCOME_TIMEOUT = 60.0
ERROR_CHARS = 48
"""Characters of the refused call's error shown in the table."""

TARGETS = {
    "envelope_queued_peak_mib": Target("<=", REFUSAL_TARGET_MIB),
    "response_peak_mib": Target("<=", REFUSAL_TARGET_MIB),
    "envelope_waiting_peak_mib": Target("<=", REFUSAL_TARGET_MIB),
}


def big_envelope(size: int) -> bytes:
    """A JSON envelope of exactly ``size`` bytes whose payload is one long string."""
    head, tail = b'{"id":"big","payload":"', b'","submitted_at":0,"attempt":1}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _counter(r: redis.Redis, pool: str, name: str) -> int:
    return int(r.hget(PoolKeys(pool).stats, name) or 0)


def _until(slot: SlotSubprocess, predicate: Callable[[], Any], what: str) -> None:
    """Wait for ``predicate``, failing early (with the slot's log) if the slot died."""

    def check() -> Any:
        slot.check_alive()
        return predicate()

    wait_for(check, OUTCOME_TIMEOUT, interval=0.05, what=what)


def _serve_one(url: str, pool: str, slot: SlotSubprocess, payload: Any = None) -> JobResult:
    """Submit one job and wait for its result record."""
    with Client(url, pool) as client:
        job_id = client.submit({"ping": 1} if payload is None else payload)
        key = client.keys.result(job_id)
        r = redis.Redis.from_url(url)
        try:
            _until(slot, lambda: r.exists(key), f"the result of job {job_id}")
        finally:
            r.close()
        return client.wait(job_id, 1.0)


def _slot(url: str, pool: str, handlers: list[str], **options: Any) -> SlotSubprocess:
    return SlotSubprocess(url, pool, handlers, call_timeout=10.0, **options)


def idle_pss(url: str, *, standby: bool) -> tuple[float, int]:
    """PSS of an idle slot that served one job, all its processes together (a
    keeper, its active worker and its standby when ``standby``), and how many."""
    pool = f"{POOL}-pss-{int(standby)}"
    with _slot(url, pool, ["bench.handlers:noop"], standby=standby) as slot:
        if standby:
            _until(slot, lambda: len(children(slot.pid)) == 2, "active + standby")
        _serve_one(url, pool, slot)
        pids = [slot.pid, *children(slot.pid)]
        return pss_mib(pids), len(pids)


def idle(url: str) -> float:
    pool = f"{POOL}-idle"
    with _slot(url, pool, ["bench.handlers:noop"]) as slot:
        _serve_one(url, pool, slot)
        return peak_rss_mib(slot.pid)


def envelope_queued(url: str, r: redis.Redis) -> float:
    """The envelope is in the queue before the slot's first TAKE."""
    pool = f"{POOL}-queued"
    r.lpush(PoolKeys(pool).queue, big_envelope(ENVELOPE_BYTES))
    with _slot(url, pool, ["bench.handlers:noop"]) as slot:
        _until(slot, lambda: _counter(r, pool, "dead") == 1, "the envelope dead-lettered")
        _serve_one(url, pool, slot)
        return peak_rss_mib(slot.pid)


def _blocked_in_blmove(r: redis.Redis) -> bool:
    return any(c.get("cmd") == "blmove" and "b" in str(c.get("flags", "")) for c in r.client_list())


def envelope_waiting(url: str, r: redis.Redis) -> float:
    """The envelope arrives while the slot sits in a long BLMOVE."""
    pool = f"{POOL}-waiting"
    with _slot(url, pool, ["bench.handlers:noop"], take_block=WAIT_BLOCK) as slot:
        _serve_one(url, pool, slot)
        _until(slot, lambda: _blocked_in_blmove(r), "the slot blocked in BLMOVE")
        r.lpush(PoolKeys(pool).queue, big_envelope(ENVELOPE_BYTES))
        _until(slot, lambda: _counter(r, pool, "dead") == 1, "the envelope dead-lettered")
        return peak_rss_mib(slot.pid)


class FloodServer(ThreadingHTTPServer):
    """Answers every GET with a ``size``-byte body; counts the bytes it got out."""

    daemon_threads = True

    def __init__(self, size: int) -> None:
        super().__init__(("127.0.0.1", 0), _Flood)
        self.size = size
        self.sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Flood(BaseHTTPRequestHandler):
    server: FloodServer

    def do_GET(self) -> None:
        size = self.server.size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"\0" * MIB
        sent = 0
        try:
            while sent < size:
                self.wfile.write(chunk[: size - sent])
                sent += min(len(chunk), size - sent)
        except OSError:  # the slot hung up: what the benchmark hopes for
            pass
        finally:
            self.server.sent += sent

    def log_message(self, format: str, *args: Any) -> None:
        return None


def response(url: str) -> tuple[float, JobResult, float]:
    """Peak MiB, the job's result, and MiB the server got out before the slot hung up."""
    pool = f"{POOL}-response"
    server = FloodServer(RESPONSE_BYTES)
    thread = threading.Thread(target=server.serve_forever, name="flood", daemon=True)
    thread.start()
    try:
        policy = HttpPolicy(allow_urls=(server.url,))
        with _slot(url, pool, ["http"], http=policy, max_attempts=1) as slot:
            result = _serve_one(url, pool, slot, {"method": "GET", "url": server.url})
            peak = peak_rss_mib(slot.pid)
    finally:
        server.shutdown()
        server.server_close()
    return peak, result, round(server.sent / MIB, 1)


def push_refused_by_redis(url: str, r: redis.Redis) -> str:
    """``yes`` when Redis with a small ``proto-max-bulk-len`` refuses the push."""
    before = str(r.config_get("proto-max-bulk-len")["proto-max-bulk-len"])
    r.config_set("proto-max-bulk-len", PROTO_MAX_BULK_LEN)
    producer = redis.Redis.from_url(url, socket_timeout=10)
    try:
        producer.lpush(PoolKeys(f"{POOL}-bulk").queue, big_envelope(ENVELOPE_BYTES))
    except redis.RedisError:
        return "yes"
    finally:
        producer.close()
        r.config_set("proto-max-bulk-len", before)
    return "no"


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    """The same sizes with and without ``--quick``: the figures are about them."""
    del quick, seed  # one slot start per case is already short
    figures: Figures = {
        "envelope_mib": ENVELOPE_BYTES // MIB,
        "max_envelope_mib": defaults.MAX_ENVELOPE_BYTES // MIB,
        "response_mib": RESPONSE_BYTES // MIB,
        "max_response_mib": defaults.MAX_RESPONSE_BYTES // MIB,
    }
    with RedisServer() as server:
        url = server.url
        r = redis.Redis.from_url(url, socket_timeout=30)
        try:
            base = idle(url)
            figures["idle_peak_mib"] = base
            figures["envelope_queued_peak_mib"] = queued = envelope_queued(url, r)
            figures["envelope_queued_over_idle_mib"] = round(queued - base, 1)
            peak, result, sent = response(url)
            figures["response_peak_mib"] = peak
            figures["response_over_idle_mib"] = round(peak - base, 1)
            figures["response_outcome"] = result.status
            figures["response_error"] = (result.error or "")[:ERROR_CHARS]
            figures["response_sent_mib"] = sent
            figures["envelope_waiting_peak_mib"] = waiting = envelope_waiting(url, r)
            figures["envelope_waiting_over_idle_mib"] = round(waiting - base, 1)
            figures["push_refused_at_proto_max_bulk_len_2mb"] = push_refused_by_redis(url, r)
            plain, _ = idle_pss(url, standby=False)
            keeper, processes = idle_pss(url, standby=True)
            figures["idle_pss_mib_plain"] = plain
            figures["idle_pss_mib_standby"] = keeper
            figures["standby_processes"] = processes
            figures["standby_extra_pss_mib"] = round(keeper - plain, 1)
        finally:
            r.close()
    return figures
