"""Benchmarks of apipool: ``python -m bench [--quick] [NAME ...]``.

Each benchmark is a module here with ``run(*, quick: bool, seed: int) -> Figures``
(a dict of figure name to number or short text) and a ``TARGETS`` table;
``bench/__main__.py`` runs them, prints every figure with its target and writes
``bench/out/results.json``. Figures are printed, not
asserted: a missed target does not fail the run. See docs/benchmarks.md.
"""

from __future__ import annotations

BENCHMARKS = (
    "goodput",
    "chaos",
    "failover",
    "shared-limit",
    "false-kills",
    "handoff",
    "overhead",
    "memory",
    "operator",
    "operator-scale",
    "integrations",
)
"""Benchmark names, in the order ``python -m bench`` runs them: each is the name of
a module here, a dash standing for an underscore."""


def module_name(name: str) -> str:
    """The module (in ``bench``) of a benchmark name."""
    return name.replace("-", "_")
