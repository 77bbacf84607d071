"""``python -m compare [--quick] [--duration S] [--seed N] [--out DIR]``

Runs apipool, dramatiq's ConcurrentRateLimiter (Redis) and a sorted-set
semaphore, one after the other, against the same stand-in API (hard limit N),
the same seeded chaos schedule, the same load (always work available) and the
same duration. Prints a table, writes ``<out>/results.json`` and
``<out>/concurrency.png``. Then (unless ``--no-failover``) apipool's own
failover benchmark (``python -m bench failover``: the same pool's slots plain
and under keepers, SIGKILL and SIGSTOP every 3 s), printed as a second table
and kept in the JSON under ``failover``. Exit status 0 once every run finished (the figures
are reported, not asserted), 1 if a run crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import time
import traceback
from typing import Any

from .report import failover_rows, grid, plot, table, write_json
from .schedule import Settings, make_schedule

SYSTEMS = ("apipool", "dramatiq", "zset")
NOTES = {
    "apipool": "N slots under apipool's local supervisor (run_scenario), each a keeper with its "
    "worker and a warm standby (the defaults): a killed worker is replaced by the standby, a "
    "stopped one is killed after the keeper's hang window and replaced once reaped",
    "dramatiq": "M general workers, dramatiq.rate_limits.ConcurrentRateLimiter(RedisBackend) "
    "with ttl; killed workers are restarted; nothing detects a stopped worker: it stays "
    "stopped for its whole stop, then gets SIGCONT and carries on",
    "zset": "M general workers, sorted-set semaphore (ZREMRANGEBYSCORE expired, ZADD, ZRANK < N "
    "else ZREM; release ZREM) with a per-holder timeout of ttl; same restart/stop policy as "
    "dramatiq",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compare", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="~7 s per system: checks the harness")
    p.add_argument("--duration", type=float, help="seconds per system (default 45, quick 7)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int, default=4, help="N, the API's limit (default 4)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--only", choices=SYSTEMS, action="append", help="run only these systems")
    p.add_argument(
        "--no-failover", action="store_true", help="skip apipool's plain-vs-keeper failover table"
    )
    return p.parse_args(argv)


async def run_one(system: str, s: Settings, plan: list[Any]) -> dict[str, Any]:
    if system == "apipool":
        from .apipool_run import run_apipool

        return await run_apipool(s, plan)
    from .limiters import run_limiter

    return await run_limiter(system, s, plan)


def run_failover(*, quick: bool, seed: int) -> dict[str, Any] | None:
    """apipool's failover benchmark, printed as a table; None if it crashed."""
    from bench import failover

    print("\n-- failover inside a slot (python -m bench failover) ...", flush=True)
    try:
        figures = failover.run(quick=quick, seed=seed)
    except Exception:
        traceback.print_exc()
        return None
    print()
    print(grid(failover_rows(figures)))
    print(
        f"\n{figures['slots']} slots, {figures['call_ms']:g} ms calls, {figures['duration_s']:g} s"
        " per run; plain = --standby false --prefetch false (a dead slot restarted, a stopped one"
        f" killed after its {figures['liveness_window_s_plain']:g} s liveness window); keeper ="
        f" the defaults (hang window {figures['hang_window_s_standby']:g} s); recovery = from the"
        " fault until the stand-in again serves N calls at once"
    )
    return dict(figures)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    duration = a.duration or (7.0 if a.quick else 45.0)
    s = Settings(
        limit=a.limit,
        workers=2 * a.limit,
        duration=duration,
        seed=a.seed,
        interval=1.5 if a.quick else 3.0,
    )
    plan = make_schedule(s)
    print(
        f"N={s.limit}, M={s.workers} limiter workers, {s.duration:g} s per system, "
        f"{s.call_ms:g} ms calls, ttl {s.ttl:g} s, stops {s.stop_short:g} s / {s.stop_long:g} s, "
        f"{len(plan)} faults planned (seed {s.seed})",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    failed = False
    started = time.time()
    for system in a.only or SYSTEMS:
        print(f"-- {system} ...", flush=True)
        t = time.monotonic()
        try:
            res = asyncio.run(run_one(system, s, plan))
        except Exception:
            traceback.print_exc()
            failed = True
            continue
        res["note"] = NOTES[system]
        results.append(res)
        print(f"   done in {time.monotonic() - t:.0f} s", flush=True)
    if results:
        print()
        print(table(results))
        print()
        for r in results:
            print(f"{r['system']}: {r['note']}; lost = {r['lost_definition']}")
        print(
            "recovery = from a SIGKILL / long SIGSTOP until the stand-in again serves N calls"
            " at once, counted from 1.5 call lengths after the fault (the victim's call has"
            " left by then); 'never' = not within the window"
        )
    failover: dict[str, Any] | None = None
    if not a.no_failover:
        failover = run_failover(quick=a.quick, seed=a.seed)
        failed = failed or failover is None
    doc = {
        "date": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "settings": s.to_dict(),
        "schedule": [p.__dict__ for p in plan],
        "systems": {r["system"]: r for r in results},
        "failover": failover,
        "failed": failed,
    }
    write_json(os.path.join(a.out, "results.json"), doc)
    if results:
        plot(os.path.join(a.out, "concurrency.png"), results)
    print(
        f"\nwrote {os.path.join(a.out, 'results.json')} and "
        f"{os.path.join(a.out, 'concurrency.png')}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
