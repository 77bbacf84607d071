"""The table, the JSON and the PNG."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

COLOURS = {"kill": "tab:red", "stop_short": "tab:orange", "stop_long": "tab:purple"}


def _times(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    never = len(xs) - len(got)
    if not xs:
        return "-"
    text = f"{statistics.median(got):.2f}/{max(got):.2f}" if got else "never"
    return text + (f" ({never} never)" if never and got else "")


def rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    head = (
        "system", "max conn", "over-limit s", "util", "goodput", "ok calls", "429", "lost",
        "faults k/s/l", "recovery kill med/max s", "recovery long-stop med/max s",
    )  # fmt: skip
    out: list[tuple[str, ...]] = [head]
    for r in results:
        kinds = [f["kind"] for f in r["faults"]]
        out.append(
            (
                r["system"],
                f"{r['max_concurrency']} (N={r['limit']})",
                f"{r['over_limit_seconds']:.2f}",
                f"{r['utilization']:.3f}",
                f"{r['goodput']:.3f}",
                str(r["calls_ok"]),
                str(r["rejected_429"]),
                str(r["lost"]),
                f"{kinds.count('kill')}/{kinds.count('stop_short')}/{kinds.count('stop_long')}",
                _times(r["recovery"]["kill"]),
                _times(r["recovery"]["stop_long"]),
            )
        )
    return out


def failover_rows(figures: dict[str, Any]) -> list[tuple[str, ...]]:
    """The failover benchmark's figures (bench/failover.py) as one row per fault
    and way of running a slot: plain (as before keepers) and with a keeper."""
    head = ("fault", "slots run", "goodput", "recovery p50/max ms", "over-limit s", "max conn",
            "lost", "duplicated")  # fmt: skip
    out: list[tuple[str, ...]] = [head]
    kinds = {"kill": "SIGKILL every 3 s", "hang": "SIGSTOP 8 s every 3 s"}
    ways = {"plain": "plain (restart, liveness)", "standby": "keeper + standby (default)"}
    for kind, fault in kinds.items():
        for way, label in ways.items():
            name = f"{kind}_{way}"
            out.append(
                (
                    fault,
                    label,
                    f"{figures[f'goodput_{name}']:.4f}",
                    f"{figures[f'recovery_ms_p50_{name}']:g}/{figures[f'recovery_ms_max_{name}']:g}",
                    f"{figures[f'over_limit_s_{name}']:g}",
                    f"{figures[f'max_concurrency_{name}']} (N={figures['slots']})",
                    str(figures[f"lost_{name}"]),
                    str(figures[f"duplicated_{name}"]),
                )
            )
    return out


def table(results: list[dict[str, Any]]) -> str:
    return grid(rows(results))


def grid(rs: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns under a rule."""
    widths = [max(len(r[i]) for r in rs) for i in range(len(rs[0]))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)) for r in rs]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def write_json(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def plot(path: str, results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 3.2 * len(results)), sharex=True)
    if len(results) == 1:
        axes = [axes]
    for ax, r in zip(axes, results, strict=True):
        window = r["window"]
        samples = [s for s in r["samples"] if s[0] <= window]
        ts = [s[0] for s in samples] + [window]
        active = [s[1] for s in samples] + [samples[-1][1] if samples else 0]
        flight = [s[2] for s in samples] + [samples[-1][2] if samples else 0]
        ax.step(ts, active, where="post", lw=1.0, color="tab:blue", label="open connections")
        ax.step(
            ts, flight, where="post", lw=0.7, color="tab:green", alpha=0.7, label="calls in flight"
        )
        ax.axhline(r["limit"], color="black", ls="--", lw=1.2, label=f"limit N={r['limit']}")
        seen: set[str] = set()
        for f in r["faults"]:
            kind = f["kind"]
            ax.axvline(
                f["at"],
                color=COLOURS.get(kind, "grey"),
                lw=1.0,
                alpha=0.8,
                label=kind if kind not in seen else None,
            )
            seen.add(kind)
        ax.set_ylim(0, max(r["limit"] + 2, r["max_concurrency"] + 1))
        ax.set_ylabel("count")
        ax.set_title(
            f"{r['system']}: max {r['max_concurrency']} connections, "
            f"{r['over_limit_seconds']:.2f} s over the limit, goodput {r['goodput']:.3f}, "
            f"lost {r['lost']}",
            fontsize=10,
        )
        ax.legend(loc="lower left", fontsize=7, ncol=6)
    axes[-1].set_xlabel("seconds into the window")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
