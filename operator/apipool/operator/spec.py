"""The ApiConcurrencyPool spec, read and checked into a frozen dataclass (pure).

The CRD's OpenAPI schema (crds/apiconcurrencypool.yaml) applies defaults and
bounds in the API server; this module checks again what a schema cannot say
(handler syntax, label-safe names) and gives clear messages, so that an invalid
pool gets a status condition and an Event instead of broken pods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import defaults
from ..settings import MIN_HANG_WINDOW, POOL_NAME, HttpPolicy

GROUP = "apipool.dev"
VERSION = "v1alpha1"
PLURAL = "apiconcurrencypools"
KIND = "ApiConcurrencyPool"
MAX_SLOTS = 1000

HANDLER = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9_.-]+)=)?(?:http|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$", re.ASCII
)
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
MAX_CALL_TIMEOUT = 3600
MIN_LIMIT_BYTES = 256
"""The smallest size limit a slot accepts (apipool.settings.Limits)."""
MAX_LIMIT_BYTES = 512 << 20
"""The largest size limit of a pool: Redis's largest string (512 MiB)."""
ALLOW_URL = re.compile(r"^https?://\S+$", re.ASCII)
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
MAX_LIST_ITEMS = 100
"""At most this many entries in spec.http.allowUrls and spec.http.redactHeaders."""
HTTP_FIELDS = frozenset({"allowUrls", "followRedirects", "redactHeaders"})
DEFAULT_SECRET_KEY = "url"
"""The key of the Redis URL in the pool's Secret when spec.redis.secretRef.key is left out."""
RESERVED_ENV_PREFIX = "APIPOOL_"
MAX_API_IDLE_TIMEOUT = 3600
MAX_HANG_WINDOW = 60.0
MAX_PAUSE = 86400.0
"""The most ``spec.maxPauseSeconds`` may say (a day)."""
SPEC_FIELDS = frozenset(
    {
        "slots",
        "image",
        "handler",
        "extraHandlers",
        "redis",
        "callTimeoutSeconds",
        "heartbeatIntervalSeconds",
        "maxAttempts",
        "resultTtlSeconds",
        "maxQueueLength",
        "liveness",
        "maxUnavailable",
        "apiIdleTimeoutSeconds",
        "standby",
        "hangWindowSeconds",
        "adaptive",
        "maxPauseSeconds",
        "template",
        "maxEnvelopeBytes",
        "maxResultBytes",
        "maxResponseBytes",
        "maxDeadLetters",
        "http",
        "allowRedisEviction",
    }
)
TEMPLATE_KEYS = frozenset(
    {
        "resources",
        "env",
        "nodeSelector",
        "tolerations",
        "affinity",
        "serviceAccountName",
        "priorityClassName",
        "imagePullPolicy",
        "imagePullSecrets",
        "labels",
        "annotations",
    }
)


class InvalidSpec(ValueError):
    """The pool's spec cannot be turned into slot pods; the message says why."""


@dataclass(frozen=True)
class Liveness:
    """The slot container's liveness probe (Kubernetes units: whole seconds)."""

    period_seconds: int = defaults.LIVENESS_PERIOD
    failure_threshold: int = defaults.LIVENESS_FAILURE_THRESHOLD
    timeout_seconds: int = defaults.LIVENESS_TIMEOUT

    @property
    def window(self) -> int:
        """Seconds of failing /healthz before the kubelet kills a hung slot."""
        return self.period_seconds * self.failure_threshold


@dataclass(frozen=True)
class PoolSpec:
    """A checked spec: every value is within the bounds the CRD's schema states."""

    slots: int
    image: str
    handler: str
    redis_secret: str
    redis_secret_key: str = DEFAULT_SECRET_KEY
    extra_handlers: tuple[str, ...] = ()
    call_timeout_seconds: float = defaults.CALL_TIMEOUT
    heartbeat_interval_seconds: float = defaults.HEARTBEAT_INTERVAL
    max_attempts: int = defaults.MAX_ATTEMPTS
    result_ttl_seconds: int = defaults.RESULT_TTL
    max_queue_length: int = defaults.MAX_QUEUE_LENGTH
    liveness: Liveness = field(default_factory=Liveness)
    max_unavailable: int = defaults.MAX_UNAVAILABLE
    api_idle_timeout_seconds: int = defaults.API_IDLE_TIMEOUT
    standby: bool = defaults.STANDBY
    hang_window_seconds: float = defaults.HANG_WINDOW
    adaptive: bool = defaults.ADAPTIVE
    max_pause_seconds: float = defaults.MAX_PAUSE
    template: Mapping[str, Any] = field(default_factory=dict)
    max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES
    max_result_bytes: int = defaults.MAX_RESULT_BYTES
    max_response_bytes: int = defaults.MAX_RESPONSE_BYTES
    max_dead_letters: int = defaults.MAX_DEAD_LETTERS
    http: HttpPolicy = field(default_factory=HttpPolicy)
    allow_redis_eviction: bool = False
    """Run the slots although the pool's Redis may evict keys."""

    @property
    def handlers(self) -> tuple[str, ...]:
        """Every handler spec, the default one first."""
        return (self.handler, *self.extra_handlers)


# -- readers of single values ---------------------------------------------------------


def _get(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidSpec(f"spec.{name} must be {_kind_name(kind)}, not {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise InvalidSpec(f"spec.{name} must be > 0, not {value}")
    return value


def _at_least(doc: Mapping[str, Any], name: str, low: int, default: int) -> int:
    value: int = _get(doc, name, int, default)
    if value < low:
        raise InvalidSpec(f"spec.{name} must be >= {low}, not {value}")
    return value


def _hang_window(spec: Mapping[str, Any]) -> float:
    value = float(_get(spec, "hangWindowSeconds", (int, float), defaults.HANG_WINDOW))
    if not MIN_HANG_WINDOW <= value <= MAX_HANG_WINDOW:
        raise InvalidSpec(
            f"spec.hangWindowSeconds must be between {MIN_HANG_WINDOW} and "
            f"{MAX_HANG_WINDOW}, not {value}"
        )
    return value


def _max_pause(spec: Mapping[str, Any]) -> float:
    value = float(_get(spec, "maxPauseSeconds", (int, float), defaults.MAX_PAUSE))
    if not 0 <= value <= MAX_PAUSE:
        raise InvalidSpec(f"spec.maxPauseSeconds must be between 0 and {MAX_PAUSE:g}, not {value}")
    return value


def _flag(doc: Mapping[str, Any], where: str, default: bool) -> bool:
    name = where.rpartition(".")[2]
    value = doc.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidSpec(f"spec.{where} must be true or false, not {value!r}")
    return value


def _whole(doc: Mapping[str, Any], where: str, name: str, default: int) -> int:
    value = doc.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpec(f"spec.{where}.{name} must be an integer >= 1, not {value!r}")
    return value


def _handler_name(spec: str) -> str:
    name, sep, _ = spec.partition("=")
    return name if sep else spec


def _check_handler(where: str, spec: str) -> str:
    if not HANDLER.fullmatch(spec):
        raise InvalidSpec(
            f"{where} {spec!r} is not a handler: use 'http', 'module:function' "
            "or 'name=module:function'"
        )
    return spec


# -- readers of parts of the spec -------------------------------------------------------


def _check_name(name: str) -> None:
    if not POOL_NAME.match(name) or len(name) > 50:
        raise InvalidSpec(
            f"pool name {name!r} must be a DNS label of at most 50 characters "
            "(pods are named <pool>-slot-<i>)"
        )


def _slots(spec: Mapping[str, Any]) -> int:
    slots: int | None = _get(spec, "slots", int, None)
    if slots is None:
        raise InvalidSpec("spec.slots is required: the API's connection limit")
    if not 0 <= slots <= MAX_SLOTS:
        raise InvalidSpec(f"spec.slots must be between 0 and {MAX_SLOTS}, not {slots}")
    return slots


def _image(spec: Mapping[str, Any]) -> str:
    image: str = _get(spec, "image", str, "")
    if not image.strip():
        raise InvalidSpec("spec.image is required")
    if any(c.isspace() for c in image):
        raise InvalidSpec(f"spec.image {image!r} must not contain white space")
    return image


def _handlers(spec: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The default handler and the extra ones, each well-formed, no name twice."""
    handler = _check_handler("spec.handler", _get(spec, "handler", str, defaults.HANDLER))
    extra = _get(spec, "extraHandlers", list, [])
    extra_handlers = tuple(_check_handler("spec.extraHandlers item", str(h)) for h in extra)
    names = [_handler_name(h) for h in (handler, *extra_handlers)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidSpec(f"handler name(s) given twice: {', '.join(twice)}")
    return handler, extra_handlers


def _redis_secret(spec: Mapping[str, Any]) -> tuple[str, str]:
    """The name of the Secret holding the Redis URL, and the URL's key in it."""
    redis = _get(spec, "redis", dict, {})
    secret_ref = redis.get("secretRef") or {}
    if not isinstance(secret_ref, dict) or not secret_ref.get("name"):
        raise InvalidSpec("spec.redis.secretRef.name is required: a Secret holding the Redis URL")
    secret_name, secret_key = secret_ref["name"], secret_ref.get("key") or DEFAULT_SECRET_KEY
    if not isinstance(secret_name, str) or not K8S_NAME.fullmatch(secret_name):
        raise InvalidSpec(f"spec.redis.secretRef.name {secret_name!r} is not a Secret name")
    if not isinstance(secret_key, str) or not SECRET_KEY.fullmatch(secret_key):
        raise InvalidSpec(f"spec.redis.secretRef.key {secret_key!r} is not a Secret key")
    return secret_name, secret_key


def _liveness(spec: Mapping[str, Any]) -> Liveness:
    doc = _get(spec, "liveness", dict, {})
    return Liveness(
        period_seconds=_whole(doc, "liveness", "periodSeconds", defaults.LIVENESS_PERIOD),
        failure_threshold=_whole(
            doc, "liveness", "failureThreshold", defaults.LIVENESS_FAILURE_THRESHOLD
        ),
        timeout_seconds=_whole(doc, "liveness", "timeoutSeconds", defaults.LIVENESS_TIMEOUT),
    )


def _template(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """spec.template: only the supported keys, and no APIPOOL_* variable in its env."""
    template: Mapping[str, Any] = _get(spec, "template", dict, {})
    bad_keys = sorted(set(template) - TEMPLATE_KEYS)
    if bad_keys:
        raise InvalidSpec(
            f"spec.template does not support: {', '.join(bad_keys)} "
            f"(supported: {', '.join(sorted(TEMPLATE_KEYS))})"
        )
    env = template.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, dict) and e.get("name") for e in env):
        raise InvalidSpec("spec.template.env must be a list of {name, value|valueFrom}")
    reserved = sorted(e["name"] for e in env if str(e["name"]).startswith(RESERVED_ENV_PREFIX))
    if reserved:
        # APIPOOL_OWNER decides which process may take a slot's lease over: a
        # pod-independent value would let a new pod take a slot from a live one.
        raise InvalidSpec(
            f"spec.template.env may not set {', '.join(reserved)}: "
            f"{RESERVED_ENV_PREFIX}* variables are set by the operator"
        )
    return template


def _call_timeout(spec: Mapping[str, Any]) -> float:
    value = _get(spec, "callTimeoutSeconds", (int, float), defaults.CALL_TIMEOUT)
    call_timeout = float(_positive("callTimeoutSeconds", value))
    if call_timeout > MAX_CALL_TIMEOUT:
        raise InvalidSpec(
            f"spec.callTimeoutSeconds must be <= {MAX_CALL_TIMEOUT}, not {call_timeout:g}"
        )
    return call_timeout


def _size_limit(spec: Mapping[str, Any], name: str, default: int) -> int:
    value = _at_least(spec, name, MIN_LIMIT_BYTES, default)
    if value > MAX_LIMIT_BYTES:
        raise InvalidSpec(f"spec.{name} must be <= {MAX_LIMIT_BYTES} (512 MiB), not {value}")
    return value


def _strings(doc: Mapping[str, Any], where: str, pattern: re.Pattern[str], rule: str) -> list[str]:
    """A list of strings at spec.<where>, each matching ``pattern`` (``rule`` says how)."""
    items = doc.get(where.rpartition(".")[2])
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidSpec(f"spec.{where} must be a list of strings, not {items!r}")
    if len(items) > MAX_LIST_ITEMS:
        raise InvalidSpec(f"spec.{where} may have at most {MAX_LIST_ITEMS} entries")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise InvalidSpec(f"spec.{where}[{i}] {item!r} {rule}")
    return items


def _http(spec: Mapping[str, Any]) -> HttpPolicy:
    """spec.http: what the built-in http handler may call, and what it redacts."""
    doc = _get(spec, "http", dict, {})
    unknown = sorted(set(doc) - HTTP_FIELDS)
    if unknown:
        raise InvalidSpec(f"unknown field(s) in spec.http: {', '.join(unknown)}")
    allow_urls = _strings(
        doc,
        "http.allowUrls",
        ALLOW_URL,
        "must be a URL prefix starting with http:// or https:// (no white space)",
    )
    redact = _strings(doc, "http.redactHeaders", HEADER_NAME, "is not an HTTP header name")
    return HttpPolicy(
        allow_urls=tuple(allow_urls),
        follow_redirects=_flag(doc, "http.followRedirects", False),
        redact_headers=tuple(redact),
    )


def parse_spec(name: str, spec: Mapping[str, Any]) -> PoolSpec:
    """Read ``spec`` of pool ``name``; raise InvalidSpec with a clear message.

    A field left out (or null) gets the default of :mod:`apipool.defaults`, the
    same the CRD's schema fills in; the checks run in a fixed order, so a spec
    with several faults always names the same one."""
    _check_name(name)
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise InvalidSpec(f"unknown field(s) in spec: {', '.join(unknown)}")
    slots, image = _slots(spec), _image(spec)
    handler, extra_handlers = _handlers(spec)
    secret_name, secret_key = _redis_secret(spec)
    liveness, template = _liveness(spec), _template(spec)
    call_timeout = _call_timeout(spec)
    max_attempts = _at_least(spec, "maxAttempts", 1, defaults.MAX_ATTEMPTS)
    max_queue = _at_least(spec, "maxQueueLength", 0, defaults.MAX_QUEUE_LENGTH)
    max_unavailable = _at_least(spec, "maxUnavailable", 1, defaults.MAX_UNAVAILABLE)
    idle = _at_least(spec, "apiIdleTimeoutSeconds", 0, defaults.API_IDLE_TIMEOUT)
    if idle > MAX_API_IDLE_TIMEOUT:
        limit = MAX_API_IDLE_TIMEOUT
        raise InvalidSpec(f"spec.apiIdleTimeoutSeconds must be <= {limit}, not {idle}")
    heartbeat = _get(spec, "heartbeatIntervalSeconds", (int, float), defaults.HEARTBEAT_INTERVAL)
    result_ttl = _get(spec, "resultTtlSeconds", int, defaults.RESULT_TTL)
    return PoolSpec(
        slots=slots,
        image=image,
        handler=handler,
        extra_handlers=extra_handlers,
        redis_secret=secret_name,
        redis_secret_key=secret_key,
        call_timeout_seconds=call_timeout,
        heartbeat_interval_seconds=float(_positive("heartbeatIntervalSeconds", heartbeat)),
        max_attempts=max_attempts,
        result_ttl_seconds=int(_positive("resultTtlSeconds", result_ttl)),
        max_queue_length=max_queue,
        liveness=liveness,
        max_unavailable=max_unavailable,
        api_idle_timeout_seconds=idle,
        standby=_flag(spec, "standby", defaults.STANDBY),
        hang_window_seconds=_hang_window(spec),
        adaptive=_flag(spec, "adaptive", defaults.ADAPTIVE),
        max_pause_seconds=_max_pause(spec),
        template=template,
        max_envelope_bytes=_size_limit(spec, "maxEnvelopeBytes", defaults.MAX_ENVELOPE_BYTES),
        max_result_bytes=_size_limit(spec, "maxResultBytes", defaults.MAX_RESULT_BYTES),
        max_response_bytes=_size_limit(spec, "maxResponseBytes", defaults.MAX_RESPONSE_BYTES),
        max_dead_letters=_at_least(spec, "maxDeadLetters", 0, defaults.MAX_DEAD_LETTERS),
        http=_http(spec),
        allow_redis_eviction=_flag(spec, "allowRedisEviction", False),
    )
