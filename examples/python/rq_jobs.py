"""RQ jobs that hand their API call to an apipool pool (docs/integrations.md).

Two ways to run the workers (``--path`` puts this directory on the import path):

- RQ's default: ``rq worker --path examples/python --url redis://... apis``. The
  worker forks a work horse per job, and the horse imports this module (and
  apipool) anew for every job, because the worker process never did;
- preloaded: ``rq worker --path examples/python -w rq_jobs.PreloadedWorker ...``.
  Naming the worker class in this module makes the worker process import it
  once, before it forks; every work horse starts with it loaded, and with the
  :class:`~apipool.Client` made in the worker. See docs/integrations.md for the
  measured difference.

Configuration, from the environment: ``APIPOOL_REDIS_URL``, ``APIPOOL_POOL``.
Enqueue from anywhere: ``Queue("apis", connection=r).enqueue("rq_jobs.fetch", url)``.
"""

from __future__ import annotations

from typing import Any

import pool_call
from rq import Worker


def fetch(url: str, wait: float = 30.0) -> dict[str, Any]:
    """GET ``url`` through the pool (pool_call.get: a deadline, cancel on timeout).
    Give the RQ job a ``job_timeout`` above ``wait`` + 5 s."""
    return pool_call.get(url, wait)


class PreloadedWorker(Worker):
    """RQ's forking worker, named here so ``-w rq_jobs.PreloadedWorker`` loads this
    module (and apipool) in the worker process, once, before any work horse."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool_call.client()  # made before the first fork; each horse reuses it
