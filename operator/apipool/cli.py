"""The ``apipool`` command line: up, slot, submit, result, stats, report, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from . import __version__, defaults
from .errors import ApipoolError, ConfigError
from .exitcodes import ExitCode, for_error, for_outcome
from .settings import (
    ENV_REDIS_URL,
    HttpPolicy,
    Limits,
    SlotSettings,
    Timings,
    default_redis_url,
)

if TYPE_CHECKING:
    from .ledger import SlotSeconds

EXTRA_OF_MODULE = {
    "aiohttp": "slot",
    "prometheus_client": "slot",
    "multidict": "slot",
    "kopf": "operator",
    "kubernetes": "operator",
    "rich": "demo",
}
"""Which extra of the apipool package brings a module a command needs."""


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _count_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _flag(value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {value}")
    return text in ("true", "1", "yes")


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d``: seconds (> 0)."""
    text = value.strip().lower()
    unit = DURATION_UNITS.get(text[-1:], 0)
    try:
        number = float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a duration like 90s, 15m, 1h, got {value}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=default_redis_url(),
        help=f"Redis URL (default: ${ENV_REDIS_URL})",
    )
    p.add_argument("--pool", required=True, help="pool name")


def _add_slot_options(p: argparse.ArgumentParser) -> None:
    t = Timings()
    p.add_argument(
        "--handler",
        action="append",
        dest="handlers",
        metavar="H",
        help="'http', 'module:function' or 'name=module:function'; repeatable, first is default",
    )
    p.add_argument("--call-timeout", type=_positive, default=t.call_timeout, metavar="S")
    p.add_argument(
        "--heartbeat-interval", type=_positive, default=t.heartbeat_interval, metavar="S"
    )
    p.add_argument("--fence-margin", type=_positive, default=t.fence_margin, metavar="S")
    p.add_argument("--health-grace", type=_count_float, default=t.health_grace, metavar="S")
    p.add_argument("--take-block", type=_positive, default=t.take_block, metavar="S")
    p.add_argument(
        "--standby",
        type=_flag,
        default=defaults.STANDBY,
        metavar="BOOL",
        help="run each slot under a keeper with a warm standby (true/false)",
    )
    p.add_argument(
        "--prefetch",
        type=_flag,
        default=defaults.PREFETCH,
        metavar="BOOL",
        help="take the next job during a call while the queue is long (true/false)",
    )
    p.add_argument(
        "--adaptive",
        type=_flag,
        default=defaults.ADAPTIVE,
        metavar="BOOL",
        help="use fewer than N slots while the API keeps answering 429 (true/false)",
    )
    p.add_argument(
        "--max-pause",
        type=_count_float,
        default=defaults.MAX_PAUSE,
        metavar="S",
        help="longest pool-wide pause a Retry-After may ask for",
    )
    p.add_argument(
        "--hang-window",
        type=_positive,
        default=t.hang_window,
        metavar="S",
        help="with --standby: kill a worker whose event loop is silent this long",
    )
    p.add_argument("--max-attempts", type=int, default=defaults.MAX_ATTEMPTS, metavar="K")
    p.add_argument("--result-ttl", type=_positive, default=defaults.RESULT_TTL, metavar="S")
    lim = Limits()
    p.add_argument("--max-envelope-bytes", type=int, default=lim.max_envelope_bytes, metavar="B")
    p.add_argument("--max-result-bytes", type=int, default=lim.max_result_bytes, metavar="B")
    p.add_argument("--max-response-bytes", type=int, default=lim.max_response_bytes, metavar="B")
    p.add_argument("--max-dead-letters", type=_count, default=lim.max_dead_letters, metavar="K")
    p.add_argument(
        "--allow-url",
        action="append",
        dest="allow_urls",
        default=[],
        metavar="URL",
        help="URL prefix the http handler may call; repeatable (default: any public address;"
        " loopback and private addresses only when a prefix names them)",
    )
    p.add_argument(
        "--follow-redirects",
        action="store_true",
        help="http handler: follow redirects (credentials stay on their origin)",
    )
    p.add_argument(
        "--redact-header",
        action="append",
        dest="redact_headers",
        default=[],
        metavar="NAME",
        help="also redact this header in logs and dead letters",
    )
    p.add_argument(
        "--allow-eviction",
        action="store_true",
        help="serve although Redis may evict keys (maxmemory without noeviction)",
    )


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        max_envelope_bytes=args.max_envelope_bytes,
        max_result_bytes=args.max_result_bytes,
        max_response_bytes=args.max_response_bytes,
        max_dead_letters=args.max_dead_letters,
    )


def _http_policy(args: argparse.Namespace) -> HttpPolicy:
    return HttpPolicy(
        allow_urls=tuple(args.allow_urls),
        follow_redirects=args.follow_redirects,
        redact_headers=tuple(args.redact_headers),
    )


def _timings(args: argparse.Namespace) -> Timings:
    return Timings(
        call_timeout=args.call_timeout,
        heartbeat_interval=args.heartbeat_interval,
        fence_margin=args.fence_margin,
        health_grace=args.health_grace,
        take_block=args.take_block,
        hang_window=args.hang_window,
    )


def _add_runtime_commands(sub: Any) -> None:
    """``up`` and ``slot``: the processes that call the API."""
    up = sub.add_parser("up", help="run N slot processes on this machine (local supervisor)")
    _add_redis(up)
    up.add_argument("--slots", type=_count, required=True, metavar="N", help="the API's limit")
    _add_slot_options(up)
    up.add_argument(
        "--liveness-window", type=_positive, default=defaults.LIVENESS_WINDOW, metavar="S"
    )
    up.add_argument(
        "--max-queue-length", type=_count, default=defaults.MAX_QUEUE_LENGTH, metavar="L"
    )
    up.add_argument("--log-dir", default=None, help="write slot logs here instead of stderr")

    slot = sub.add_parser("slot", help="run one slot worker in this process")
    _add_redis(slot)
    slot.add_argument("--slot", type=_count, required=True, metavar="I")
    _add_slot_options(slot)
    slot.add_argument("--health-host", default="127.0.0.1")
    slot.add_argument("--health-port", type=_count, default=defaults.HEALTH_PORT)
    slot.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _add_producer_commands(sub: Any) -> None:
    """``submit``, ``result`` and ``stats``: what a producer or an operator types."""
    submit = sub.add_parser("submit", help="queue one job; print its id (or its result)")
    _add_redis(submit)
    submit.add_argument("payload", help="the job payload as JSON, or - to read it from stdin")
    submit.add_argument("--deadline-in", type=_positive, default=None, metavar="S")
    submit.add_argument("--handler", default=None)
    submit.add_argument("--wait", type=_positive, default=None, metavar="S",
                        help="wait this long for the result and print it")  # fmt: skip

    result = sub.add_parser("result", help="wait for a job's result and print it")
    _add_redis(result)
    result.add_argument("job_id")
    result.add_argument("--timeout", type=_positive, default=30.0, metavar="S")

    stats = sub.add_parser("stats", help="queue depth, in-flight per slot, dead letters")
    _add_redis(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--dead", type=_count, default=0, metavar="K",
                       help="also show the K newest dead letters")  # fmt: skip
    stats.add_argument("--since", type=_duration, default=300.0, metavar="D",
                       help="slot-seconds by state over this long (default 5m)")  # fmt: skip

    report = sub.add_parser(
        "report", help="one screen: share of paid capacity used, lost capacity by cause"
    )
    _add_redis(report)
    report.add_argument("--since", type=_duration, default=3600.0, metavar="D",
                        help="how far back: 90s, 15m, 1h, 2d (default 1h)")  # fmt: skip
    report.add_argument("--json", action="store_true", help="print one JSON object")


def _add_other_commands(sub: Any) -> None:
    """``standin``, ``operator`` and ``demo``."""
    standin = sub.add_parser(
        "standin", help="serve the stand-in API with a hard connection limit (for trials)"
    )
    standin.add_argument("--limit", type=int, required=True, metavar="N")
    standin.add_argument("--host", default="127.0.0.1")
    standin.add_argument("--port", type=_count, default=8080)
    standin.add_argument("--ms", type=_positive, default=100.0, help="default call duration")
    standin.add_argument(
        "--shared-limit",
        type=_count,
        default=None,
        metavar="N",
        help="answer 429 to a call arriving while N calls are in flight (a shared limit)",
    )
    standin.add_argument(
        "--retry-after", default=None, metavar="V", help="send Retry-After: V with every 429"
    )

    sub.add_parser(
        "operator",
        help="run the Kubernetes operator (settings from APIPOOL_* environment variables)",
    )

    demo = sub.add_parser("demo", help="the local demo: a pool against a limited stand-in API")
    demo.add_argument("--duration", type=_positive, default=30.0, metavar="S")
    demo.add_argument("--slots", type=int, default=4, metavar="N")
    demo.add_argument("--chaos", action="store_true", help="SIGKILL and SIGSTOP random slots")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.add_argument("--svg", metavar="PATH", help="save the final view and summary as an SVG")
    demo.add_argument("--redis-url", default=default_redis_url(),
                      help="use this Redis instead of a throwaway redis-server")  # fmt: skip
    demo.add_argument("--call-ms", type=_positive, default=100.0, help="API call duration")
    demo.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apipool",
        description="Keep a paid API at exactly its concurrent-connection limit.",
    )
    parser.add_argument("--version", action="version", version=f"apipool {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_runtime_commands(sub)
    _add_producer_commands(sub)
    _add_other_commands(sub)
    return parser


def _need_redis(args: argparse.Namespace) -> str:
    if not args.redis_url:
        raise ConfigError(f"no Redis: pass --redis-url or set ${ENV_REDIS_URL}")
    return str(args.redis_url)


def _cmd_up(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor, SupervisorSettings

    settings = SupervisorSettings(
        redis_url=_need_redis(args),
        pool=args.pool,
        slots=args.slots,
        handlers=tuple(args.handlers or ("http",)),
        timings=_timings(args),
        max_attempts=args.max_attempts,
        result_ttl=args.result_ttl,
        limits=_limits(args),
        http=_http_policy(args),
        allow_eviction=args.allow_eviction,
        max_queue_length=args.max_queue_length,
        liveness_window=args.liveness_window,
        log_dir=args.log_dir,
        log_level=args.log_level,
        standby=args.standby,
        prefetch=args.prefetch,
        adaptive=args.adaptive,
        max_pause=args.max_pause,
    )
    return asyncio.run(Supervisor(settings).run())


def slot_settings(args: argparse.Namespace) -> SlotSettings:
    """The settings ``apipool slot`` runs with (the inverse of SlotSettings.to_argv)."""
    return SlotSettings(
        redis_url=_need_redis(args),
        pool=args.pool,
        slot=args.slot,
        handlers=tuple(args.handlers or ("http",)),
        timings=_timings(args),
        max_attempts=args.max_attempts,
        result_ttl=args.result_ttl,
        limits=_limits(args),
        http=_http_policy(args),
        allow_eviction=args.allow_eviction,
        health_host=args.health_host,
        health_port=args.health_port,
        parent_pid=args.parent_pid,
        standby=args.standby,
        prefetch=args.prefetch,
        adaptive=args.adaptive,
        max_pause=args.max_pause,
    )


def _cmd_slot(args: argparse.Namespace) -> int:
    settings = slot_settings(args)
    if settings.standby:
        from .keeper import run_keeper

        return run_keeper(settings)
    from .slot import run_slot

    return run_slot(settings)


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _cmd_submit(args: argparse.Namespace) -> int:
    from .client import Client

    text = sys.stdin.read() if args.payload == "-" else args.payload
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"payload is not valid JSON: {exc}") from None
    deadline = time.time() + args.deadline_in if args.deadline_in else None
    with Client(_need_redis(args), args.pool) as client:
        job_id = client.submit(payload, deadline=deadline, handler=args.handler)
        if args.wait is None:
            print(job_id)
            return ExitCode.OK
        return _print_result(client, job_id, args.wait)


def _print_result(client: Any, job_id: str, timeout: float) -> int:
    """Print a job's result record; the exit code follows its status."""
    record = client.wait(job_id, timeout)
    _print(record.__dict__)
    return for_outcome(record.status)


def _cmd_result(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(_need_redis(args), args.pool) as client:
        return _print_result(client, args.job_id, args.timeout)


def _cmd_stats(args: argparse.Namespace) -> int:
    from .layout import PoolKeys
    from .ledger import read_ledger
    from .stats import read_stats

    with redis.Redis.from_url(_need_redis(args), socket_timeout=5) as r:
        stats = read_stats(r, args.pool)
        seconds = read_ledger(r, args.pool, seconds=args.since)
        dead = (
            [json.loads(x) for x in r.lrange(PoolKeys(args.pool).dead, 0, args.dead - 1)]
            if args.dead
            else []
        )
    if args.json:
        doc = stats.to_dict()
        doc["slot_seconds"] = seconds.to_dict()
        if dead:
            doc["dead"] = dead
        print(json.dumps(doc, sort_keys=True))
        return 0
    util = stats.utilization
    print(f"pool {stats.pool}: {stats.slots} slots, {stats.busy} busy"
          f" ({'-' if util is None else f'{util:.0%}'}), {stats.queued} queued,"
          f" {stats.dead_letters} dead letters")  # fmt: skip
    effective = stats.effective_slots
    if effective is not None and effective < stats.slots:
        print(f"  effective concurrency {effective} of {stats.slots} (the API refused above it)")
    paused = stats.paused_until
    if paused is not None and paused > time.time():
        print(f"  paused by the API's Retry-After for {paused - time.time():.1f} s more")
    for i, n in sorted(stats.inflight.items()):
        holder = stats.leases.get(i, "(no lease)")
        print(f"  slot {i}: {'busy' if n else 'idle'}  lease {holder}")
    print("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.counters.items())))
    print(f"  {_states_line(seconds)}")
    for entry in dead:
        print(f"  dead {entry.get('id')}: {entry.get('reason')}")
    return 0


def _states_line(seconds: SlotSeconds) -> str:
    """Slot-seconds by state, as shares of the paid capacity, on one line."""
    if seconds.capacity <= 0:
        return "slot-seconds: none recorded"
    parts = {"calling": seconds.states.get("calling", 0.0), **seconds.losses}
    shares = ", ".join(
        f"{name}={value / seconds.capacity:.1%}" for name, value in parts.items() if value > 0
    )
    return f"slot-seconds since {time.strftime('%H:%M:%S', time.gmtime(seconds.since))}: {shares}"


def _cmd_report(args: argparse.Namespace) -> int:
    from .ledger import read_ledger

    if args.json:
        with redis.Redis.from_url(_need_redis(args), socket_timeout=5) as r:
            print(json.dumps(read_ledger(r, args.pool, seconds=args.since).to_dict()))
        return 0
    from .report import print_report  # needs rich (the demo extra): checked before Redis

    with redis.Redis.from_url(_need_redis(args), socket_timeout=5) as r:
        print_report(read_ledger(r, args.pool, seconds=args.since))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_standin(args: argparse.Namespace) -> int:
    from .testing.standin import StandInApi

    async def serve() -> None:
        api = StandInApi(
            args.limit,
            host=args.host,
            port=args.port,
            default_ms=args.ms,
            shared_limit=args.shared_limit,
            retry_after=args.retry_after,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1 nothing else would stop it
            loop.add_signal_handler(sig, stop.set)
        async with api:
            logging.getLogger("apipool.testing.standin").info(
                "stand-in API limited to %d connections on %s (GET /work?ms=, GET /stats)",
                args.limit,
                api.url,
            )
            await stop.wait()

    asyncio.run(serve())
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from .operator.run import run_operator

    return run_operator()


COMMANDS = {
    "standin": _cmd_standin,
    "operator": _cmd_operator,
    "up": _cmd_up,
    "slot": _cmd_slot,
    "submit": _cmd_submit,
    "result": _cmd_result,
    "stats": _cmd_stats,
    "report": _cmd_report,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    try:
        return int(COMMANDS[args.command](args))
    except ApipoolError as exc:
        print(f"apipool: error: {exc}", file=sys.stderr)
        return for_error(exc)
    except redis.exceptions.RedisError as exc:  # ConnectionError, TimeoutError, ...
        print(f"apipool: error: Redis: {exc}", file=sys.stderr)
        return ExitCode.REDIS_UNAVAILABLE
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"apipool: error: 'apipool {args.command}' needs {exc.name}: "
            f"pip install 'apipool[{extra}]'",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
