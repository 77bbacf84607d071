"""A stand-in external API that counts open connections against a hard limit.

The demo, the tests and the benchmarks point the pool at it to prove that the
fleet never goes over the limit. It is a minimal HTTP/1.1 server written
directly on an :class:`asyncio.Protocol` (no web framework), so that it sees a
connection open and close at the exact moment the event loop does.

Connections
===========

HTTP/1.1 persistent connections are supported, pipelining included. After a
response the server keeps the connection open and reads the next request on it
(bytes the client sent ahead are served in order, one request at a time),
unless the request asked to close: ``Connection: close``, or HTTP/1.0 without
``Connection: keep-alive``. A kept-alive response says ``Connection:
keep-alive`` and ``Keep-Alive: timeout=<idle_timeout>``; the server closes a
connection that has gone ``idle_timeout`` seconds without sending a whole
request head (from its opening, or from the end of the last response). A
response to a request that asked to close says ``Connection: close``; the
server then reads and discards anything further until the client closes or
``linger_timeout`` passes, and closes it then. A client that half-closes
(``shutdown(SHUT_WR)``) counts as gone at once, even mid-request.

Two counts
==========

*active* (``active``, ``max_concurrency``, the over-limit time and events)
    open **connections**: a connection counts from its first request head
    (``/stats`` aside) until it is closed, by the client (EOF or reset) or by
    the server (idle or linger timeout, a malformed head, ``/stats``,
    :meth:`StandInApi.stop`). This is what the limit is about: a kept-alive
    connection sitting idle between calls still counts, and so does a client
    frozen mid-call (SIGSTOP) until it is killed. Further requests on a
    counted connection do not count it again.
*in flight* (``in_flight``, ``max_in_flight``)
    **requests** being served: from the moment a request head has been read
    until its response is written. A 429 is answered as soon as its head is
    read, so it never shows here.

``busy_seconds`` is the integral over time of ``min(in_flight, limit)`` (the
API's capacity doing work, not merely held), so ``utilisation`` is in-flight
work / (``limit`` x elapsed). ``useful_seconds`` sums the actual service time
(head read to response written, the stand-in's own timer lateness included)
of the requests answered 200; ``nominal_seconds`` sums their ``ms / 1000``.
A request still in flight at a :meth:`StandInApi.reset` is timed from the
reset.

Routes
======

``GET|POST /work?ms=<float>``  sleep ``ms`` milliseconds, answer 200
                               ``{"ok": true, "ms": ms, "active": n}`` where
                               ``n`` is the active count on arrival.
``GET /stats``                 200 with :meth:`StandInApi.stats` as JSON
                               (``?samples=0`` leaves out the timeline), then
                               the server closes the connection (which drops
                               its count if it was counted). Not counted and
                               never limited.
anything else                  404.

A request that arrives while the active count (its own connection included)
is over the limit gets ``429 {"error": "over limit", "active": n, "limit":
L}`` at once; its body, if any, is skipped. 429, 404 and 400 (bad ``ms``)
follow the keep-alive rules above. A malformed request head gets 400 and the
server closes the connection (a head alone never counts it).

Pushing back
============

Three settings, each off by default and changeable at run time from any
thread, make the stand-in refuse requests the way a paid API does. A refused
request is answered at once (it never goes in flight), counted in
``rejected_total`` and its arrival time kept in ``rejected_at``:

*shared limit* (``shared_limit=``, :meth:`StandInApi.set_shared_limit`)
    a limit on **requests in flight**, modelling other consumers that use part
    of the API's limit: a request arriving while ``in_flight`` is at the shared
    limit gets ``429 {"error": "shared limit", "in_flight": k, "limit": S}``
    (also counted in ``shared_rejected_total``). Lowering it does not cut the
    requests already in flight short. ``shared_limits`` records the limit in
    force at the start (or last reset) and every change since, so that a
    benchmark can measure goodput against the limit in force. The hard limit
    and its over-limit accounting (connections) are unchanged by it, and are
    checked first.
*Retry-After* (``retry_after=``, :meth:`StandInApi.set_retry_after`)
    a string sent verbatim as the ``Retry-After`` header of every 429 over
    either limit: seconds, an HTTP date, or anything else a test wants to see
    handled (printable ASCII only).
*forced answers* (:meth:`StandInApi.throttle_next`)
    the next ``count`` ``/work`` requests are answered ``429`` or ``503``
    ``{"error": "throttled"}``, with their own ``Retry-After`` (or none),
    whatever the limits (counted in ``forced_total`` too). For a test of one
    pool-wide pause.

Modules
=======

:mod:`.accounting`  the counters and :class:`StandInStats` (no I/O, thread-safe)
:mod:`.wire`        request heads parsed, responses written (pure functions)
:mod:`.connection`  one client connection: keep-alive, pipelining, timers
:mod:`.server`      :class:`StandInApi`, :class:`StandInThread`, :func:`run_in_thread`
"""

from __future__ import annotations

from .accounting import MAX_SAMPLES, OverLimitEvent, StandInStats
from .server import StandInApi, StandInThread, run_in_thread

__all__ = [
    "MAX_SAMPLES",
    "OverLimitEvent",
    "StandInApi",
    "StandInStats",
    "StandInThread",
    "run_in_thread",
]
