"""``python -m bench [--quick] [--seed N] [--out PATH] [NAME ...]``: run, print, save.

Runs the named benchmarks (default: all, in the order of ``bench.BENCHMARKS``),
prints a table with every figure, its target and whether it met it, and writes
everything as JSON (default ``bench/out/results.json``). A missed target does not
change the exit status; a benchmark that crashed does (1).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import BENCHMARKS, module_name
from .common import REPO_ROOT, Figures, Target, Value, machine

DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "results.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos and load RNGs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    return parser


def _fmt(value: Value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def render(name: str, figures: Figures, targets: dict[str, Target], seconds: float) -> str:
    rows = [(key, _fmt(value), targets.get(key)) for key, value in figures.items()]
    width = max([len(key) for key, _, _ in rows] + [6])
    vwidth = max([len(v) for _, v, _ in rows] + [5])
    lines = [f"== {name} ({seconds:.1f} s)"]
    lines.append(f"  {'figure':<{width}}  {'value':>{vwidth}}  {'target':<9}  met")
    for key, shown, target in rows:
        if target is None:
            lines.append(f"  {key:<{width}}  {shown:>{vwidth}}")
        else:
            met = _verdict(target.met(figures[key]))
            lines.append(f"  {key:<{width}}  {shown:>{vwidth}}  {target!s:<9}  {met}")
    return "\n".join(lines)


def _plain(figures: Figures) -> dict[str, Value | None]:
    """The figures for JSON: NaN (no samples) becomes null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}


def run_one(name: str, *, quick: bool, seed: int) -> dict[str, Any]:
    module = importlib.import_module(f"bench.{module_name(name)}")
    targets: dict[str, Target] = module.TARGETS
    started = time.monotonic()
    figures: Figures = module.run(quick=quick, seed=seed)
    seconds = time.monotonic() - started
    print(render(name, figures, targets, seconds), flush=True)
    return {
        "seconds": round(seconds, 1),
        "figures": _plain(figures),
        "targets": {key: str(t) for key, t in targets.items()},
        "met": {key: t.met(figures[key]) for key, t in targets.items() if key in figures},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        build_parser().error(f"unknown benchmark(s): {', '.join(unknown)}")
    names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seed": args.seed,
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "benchmarks": {},
    }
    failed: list[str] = []
    for name in names:
        try:
            doc["benchmarks"][name] = run_one(name, quick=args.quick, seed=args.seed)
        except Exception as exc:
            failed.append(name)
            traceback.print_exc()
            print(f"== {name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            doc["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    doc["seconds"] = round(time.monotonic() - started, 1)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    missed = [
        f"{name}.{key}"
        for name, entry in doc["benchmarks"].items()
        for key, met in entry.get("met", {}).items()
        if met is False
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    print(f"\n{len(names)} benchmark(s) in {doc['seconds']:.0f} s; results in {args.out}")
    print(f"targets missed: {', '.join(missed) if missed else 'none'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
