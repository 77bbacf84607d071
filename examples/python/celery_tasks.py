"""Celery tasks that hand their API call to an apipool pool (docs/integrations.md).

Run a worker with the prefork pool (``-P examples/python`` is not a Celery
option: put this directory on ``PYTHONPATH``)::

    CELERY_BROKER_URL=redis://.../1 APIPOOL_REDIS_URL=redis://.../0 APIPOOL_POOL=payments \\
        celery -A celery_tasks worker --pool prefork -c 4

Celery preloads by default: ``-A celery_tasks`` imports this module in the
parent, which then forks its pool processes; each inherits it loaded. The
:class:`~apipool.Client` is made on first use in each pool process (made in the
parent it would work as well: the client is fork-safe).
The call itself is pool_call.get: a deadline, and a cancel when the wait times out.

Configuration, from the environment: ``CELERY_BROKER_URL`` (the broker; a
Redis database of its own), ``CELERY_RESULT_BACKEND`` (optional),
``APIPOOL_REDIS_URL``, ``APIPOOL_POOL`` (pool_call.py).

Call it from anywhere: ``fetch.delay(url).get(timeout=60)``.
"""

from __future__ import annotations

import os
from typing import Any

import pool_call
from celery import Celery

app = Celery(
    "celery_tasks",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/1"),
    backend=os.environ.get("CELERY_RESULT_BACKEND") or None,
)
app.conf.update(
    # a task is acknowledged after it ran: a worker killed mid-task has it redelivered
    task_acks_late=True,
    # a pool process takes one task at a time: the others stay in the broker for idle ones
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(name="celery_tasks.fetch")
def fetch(url: str, wait: float = 30.0) -> dict[str, Any]:
    """GET ``url`` through the pool (pool_call.get: a deadline, cancel on timeout)."""
    return pool_call.get(url, wait)
