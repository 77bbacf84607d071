"""One load-and-fault run of a real pool against the stand-in API.

The demo, the chaos tests and the benchmarks all use :func:`run_scenario`: a
throwaway ``redis-server`` (unless a URL is given), the stand-in API with a hard
limit of N, a local supervisor running N slot processes with the ``http``
handler, producers that always keep work queued, and optionally a chaos task
that SIGKILLs and SIGSTOPs slots (favouring slots in a call) and restarts or
stops Redis, and a schedule that moves the stand-in's shared limit on calls in
flight (``Scenario.shared_limits``). Everything listens on loopback and stops
by itself.

Modules
=======

:mod:`.scenario`  what to run: :class:`Scenario`, :class:`ChaosPlan`, :class:`ScheduledFault`
:mod:`.result`    what it reports (:class:`ScenarioResult`, :class:`Snapshot`,
                  :class:`Fault`) and the pure computation of it
:mod:`.chaos`     the faults: slot processes signalled, Redis stopped and started
:mod:`.run`       :func:`run_scenario`: setup, producers, observer, drain, accounting
"""

from __future__ import annotations

from .result import Fault, ScenarioResult, Snapshot
from .run import run_scenario
from .scenario import FAULT_KINDS, ChaosPlan, Scenario, ScheduledFault

__all__ = [
    "FAULT_KINDS",
    "ChaosPlan",
    "Fault",
    "Scenario",
    "ScenarioResult",
    "ScheduledFault",
    "Snapshot",
    "run_scenario",
]
