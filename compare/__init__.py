"""Side-by-side comparison: apipool against two lease/TTL limiters, one harness.

``python -m compare`` runs three systems one after the other against the same
stand-in API (hard limit N), the same seeded chaos schedule, the same load and
duration:

1. ``apipool``: the real pool through :func:`apipool.testing.harness.run_scenario`;
2. ``dramatiq``: dramatiq's ``ConcurrentRateLimiter`` on its Redis backend,
   used as a library by M > N general worker processes;
3. ``zset``: the classic Redis sorted-set semaphore with per-holder timeouts.

See :mod:`compare.__main__` for the command line and :mod:`compare.report`
for the figures.
"""
