"""Tools for tests, demos and benchmarks: public, but not part of the runtime.

Nothing in the runtime (client, slot, supervisor, operator) imports this
package; the demo and the test suites do.

- :mod:`apipool.testing.redis_server`: a throwaway real ``redis-server`` on a
  free loopback port (restart, pause and resume it to stage outages).
- :mod:`apipool.testing.standin`: a stand-in external API that counts
  connections against a hard limit and answers 429 above it.
  Its modules: ``accounting`` (the counts), ``wire`` (HTTP/1.1 heads and
  responses), ``connection`` (one client connection), ``server``.
- :mod:`apipool.testing.harness`: a scenario runner (pool + stand-in +
  producers + seeded chaos) that measures the invariants.
  Its modules: ``scenario`` (what to run), ``result`` (what it reports, and
  the pure computation of it), ``chaos`` (the faults), ``run``.
- :mod:`apipool.testing.polling`: the one way tests wait for something.
"""
