"""Every default of a pool, defined once.

The command line, the settings dataclasses, the supervisor, the operator's spec
reader, the CRD's schema defaults and the chart's values all take their
defaults from here; tests check that the CRD and the chart agree.
"""

from __future__ import annotations

from typing import Final

CALL_TIMEOUT: Final = 10.0
"""Seconds a single handler call may run before it is cancelled."""
HEARTBEAT_INTERVAL: Final = 1.0
"""Seconds between lease renewals (and liveness heartbeats) of a slot."""
FENCE_MARGIN: Final = 1.0
"""A call starts only while the lease stays valid for call_timeout + this."""
HEALTH_GRACE: Final = 2.0
"""/healthz fails once a call has run this long past its timeout."""
HANG_WINDOW: Final = 0.5
"""Under a keeper: seconds of counted silence of the worker's event loop (time it
waited for a CPU, or its keeper did not run, does not count: silence.py) before
the keeper kills it and promotes the standby (docs/design.md, "The hang window")."""
STANDBY: Final = True
"""Whether a slot runs under a keeper with a warm standby (``--standby``)."""
ADAPTIVE: Final = True
"""Whether a pool uses fewer than N slots while the API keeps answering 429 and
climbs back to N when it stops (``--adaptive``, ``spec.adaptive``)."""
MAX_PAUSE: Final = 300.0
"""The longest pool-wide pause a Retry-After can ask for, in seconds (``--max-pause``)."""
PROBE_INTERVAL: Final = 2.0
"""Seconds without a 429 after which an adapted pool tries one more slot (then
2, 4, ... while none comes)."""
PREFETCH: Final = True
"""Whether a slot takes its next job during a call while the queue holds at least
as many jobs as the pool has slots, and writes a call's outcome while the next
call runs (``--prefetch``)."""
TAKE_BLOCK: Final = 0.5
"""Seconds one blocking take waits for a job before the slot looks at its lease again."""
MAX_ATTEMPTS: Final = 3
"""A job is dead-lettered after this many failed attempts."""
RESULT_TTL: Final = 3600
"""Seconds a result stays readable."""
MAX_ENVELOPE_BYTES: Final = 1 << 20
"""Envelopes larger than this are dead-lettered unread (and refused by the client)."""
MAX_QUEUE_LENGTH: Final = 0
"""Producers get QueueFull past this many queued jobs; 0: unbounded."""
HEALTH_PORT: Final = 8080
"""Port of a slot's /healthz, /readyz and /metrics (a pod's; locally a free one)."""
LIVENESS_WINDOW: Final = 3.0
"""Seconds of failing /healthz before the local supervisor kills a slot."""
LIVENESS_PERIOD: Final = 1
"""Kubernetes: the liveness probe's periodSeconds."""
LIVENESS_FAILURE_THRESHOLD: Final = 3
"""Kubernetes: the liveness probe's failureThreshold (window = period x threshold)."""
LIVENESS_TIMEOUT: Final = 1
"""Kubernetes: the liveness probe's timeoutSeconds."""
MAX_UNAVAILABLE: Final = 1
API_IDLE_TIMEOUT: Final = 60
"""Seconds the external API is taken to keep an idle connection open (a slot pod
that vanished while running is replaced only after its lease TTL plus this)."""
"""Kubernetes: slots replaced at once during a rolling replacement."""
HANDLER: Final = "http"
"""The handler a pool serves when none is named."""

# -- bounds on what a stranger who can push to the queue can make a slot hold --

MAX_RESULT_BYTES: Final = 1 << 20
"""A handler result whose JSON is larger than this is refused (the job is dead-lettered)."""
MAX_RESPONSE_BYTES: Final = 8 << 20
"""The http handler stops reading a response body past this many bytes (the call fails)."""
MAX_DEAD_LETTERS: Final = 10_000
"""The dead-letter list keeps this many newest entries; older ones are trimmed (counted)."""
MAX_JSON_DEPTH: Final = 64
"""Envelopes nested deeper than this (objects and arrays) are refused before parsing."""
DEAD_LETTER_ENVELOPE_BYTES: Final = 4096
"""A dead-letter entry keeps at most this many bytes of the envelope (plus its size and hash)."""
MAX_SUBMIT_BATCH: Final = 10_000
"""Client.submit_many refuses larger batches (split them): one batch is one Redis command."""
REDACT_HEADERS: Final = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
)
"""Header names whose values never reach a log line or a dead letter (case-insensitive)."""
