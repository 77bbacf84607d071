"""``apipool demo``: a real pool against a limited stand-in API, watched live.

The demo runs :func:`apipool.testing.harness.run_scenario` (a throwaway ``redis-server``,
the stand-in API with a hard limit of N, N slot processes and producers that keep
work queued; with ``--chaos`` slots are SIGKILLed and SIGSTOPped at random) and
shows a live panel while it runs, then a summary and a verdict. The exit code
(:class:`apipool.exitcodes.ExitCode`) is ``OK`` (0) only when the cap held and no
job was lost, so the demo doubles as a smoke check: ``CHECK_FAILED`` (7) when the
cap broke, a job was lost or the run failed, ``USAGE`` (2) for bad arguments, and
128 + the signal (130 for Ctrl-C, 143 for SIGTERM) once a stopped run has cleaned up.

The demo is a feature of the package (it needs ``rich``, the ``demo`` extra); the
stand-in API, the harness and the throwaway Redis it drives are the test tools of
:mod:`apipool.testing`.

- :mod:`.scenario`: the scenario the command line asks for.
- :mod:`.figures`: single figures as styled text (the concurrency bar, rates).
- :mod:`.view`: the live panel.
- :mod:`.summary`: the verdict, the summary table and the ``--json`` document.
- :mod:`.signals`: Ctrl-C and SIGTERM, cleanup first.
- :mod:`.run`: running it all, :func:`run_demo`.

Everything that decides what is shown is a small pure function of a
:class:`~apipool.testing.harness.Snapshot` or :class:`~apipool.testing.harness.ScenarioResult`, so
the tests can call it without running anything.
"""

from __future__ import annotations

from .figures import (
    BAR_WIDTH,
    RateMeter,
    concurrency_bar,
    over_limit_text,
    progress_line,
)
from .run import run_demo
from .scenario import build_scenario, chaos_interval
from .signals import Interrupted
from .summary import (
    Verdict,
    faults_by_kind,
    recovery_text,
    render_summary,
    result_doc,
    summary_sections,
    verdict,
    verdict_text,
)
from .view import LiveView, render_panel

__all__ = [
    "BAR_WIDTH",
    "Interrupted",
    "LiveView",
    "RateMeter",
    "Verdict",
    "build_scenario",
    "chaos_interval",
    "concurrency_bar",
    "faults_by_kind",
    "over_limit_text",
    "progress_line",
    "recovery_text",
    "render_panel",
    "render_summary",
    "result_doc",
    "run_demo",
    "summary_sections",
    "verdict",
    "verdict_text",
]
