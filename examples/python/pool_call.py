"""The step a job of any framework takes to call the API through an apipool pool
(examples/python/rq_jobs.py, examples/python/celery_tasks.py; docs/integrations.md).

The job never calls the external API itself: it submits the request to the pool
with :class:`apipool.Client` and waits for the answer. The deadline is the
moment the job stops waiting, so a call is never made for a waiter that has
gone; a job still queued when the wait ends without an answer (it timed out,
the framework's time limit or a shutdown interrupted it) is cancelled.

Configuration, from the environment: ``APIPOOL_REDIS_URL`` (the pool's Redis),
``APIPOOL_POOL`` (the pool's name).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from apipool import ApipoolError, Client, JobFailed

_client: Client | None = None


def client() -> Client:
    """This process's client, made once. Made before a fork, it serves the
    children too: each opens its own Redis connections (the client is fork-safe)."""
    global _client
    if _client is None:
        _client = Client(os.environ["APIPOOL_REDIS_URL"], os.environ["APIPOOL_POOL"])
    return _client


def get(url: str, wait: float) -> dict[str, Any]:
    """GET ``url`` through the pool, waiting at most ``wait`` seconds (and a
    margin for the call itself); the answer's status and body, and this
    process's id."""
    pool = client()
    job_id = pool.submit({"method": "GET", "url": url}, deadline=time.time() + wait)
    try:
        answer = pool.result(job_id, timeout=wait + 5.0)
    except JobFailed:  # answered (dead or expired): nothing to cancel
        raise
    except BaseException:  # ResultTimeout, the framework's time limit, a shutdown
        with contextlib.suppress(ApipoolError):
            pool.cancel(job_id)  # still queued? then no slot makes the call
        raise
    return {"status": answer["status"], "body": answer["body"], "pid": os.getpid()}
