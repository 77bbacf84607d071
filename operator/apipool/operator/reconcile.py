"""One reconcile of a pool: observe, plan, apply, report.

:meth:`Reconciler.reconcile` reads the pool again, then

1. :meth:`~Reconciler.observe`: its slot pods, its spec (or why it is
   invalid) and its Redis URL (or why it cannot be had);
2. :meth:`~Reconciler.plan`: the pod actions the pure ``planning.plan``
   wants, and which of them may run now;
3. :meth:`~Reconciler.apply`: those actions, then the pool's Redis: N and the
   queue bound published, the in-flight lists of removed slots reaped, the
   stats and ``INFO memory`` read;
4. :meth:`~Reconciler.report`: an Event for a new problem, and the status.

Every slot pod carries the slot-exit finalizer; a terminating pod's is removed
once its process is known gone (planning rule 6, quarantine.py). A slot whose
deleted pod's container still runs past its deletion time is quarantined:
``status.quarantinedSlots`` lists it and a Warning Event ``SlotQuarantined``
says when it comes back. Pods of a pool that is gone are released at once (no
replacement will be made).

Reconciles of one pool never overlap in this process, and a slot pod's event
that arrives while one runs does not start another: the running one runs once
more at its end (:meth:`Reconciler.nudge`).

Error contract: an invalid spec sets the ``Degraded`` condition and posts an
Event, and is not retried (nothing to retry until the spec changes); a missing
Secret or an unreachable Redis set the condition and post an Event too, and are
retried with back-off when the caller asks (``retry_problems``); so is a Redis
that may evict keys (``maxmemory`` with a policy other than ``noeviction``) while
the spec does not set ``allowRedisEviction``, reason ``RedisMayEvict``: the
slots are left as they are (they refuse to serve on their own). A slot pod the
API server (or the client's validation) refuses to create sets the condition
with the reason given, reason ``SlotPodRefused``, and posts an Event; it is not
retried by kopf (the timer looks again). Before the first out-of-date slot of a
rollout is deleted, the new pod is tried with a server-side dry run: if it would
be refused, nothing is deleted. Other errors of the Kubernetes API are raised
as ``kopf.TemporaryError``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from prometheus_client import Counter, Histogram
from redis import Redis
from redis.exceptions import RedisError

from ..errors import ApipoolError
from ..ledger import SlotSeconds, combine, read_minutes
from ..stats import PoolStats, read_stats, write_pool_config
from . import metrics as pool_metrics
from . import redis_ops
from .config import OperatorSettings
from .kube import KubeApi, PodRefused, label_selector, load_config
from .manifests import slot_pod, template_hash
from .planning import (
    TEMPLATE_CHANGED,
    Action,
    Create,
    Delete,
    Desired,
    ObservedPod,
    Release,
    plan,
    releases,
)
from .pool_state import PoolKey, PoolState, PoolStates
from .quarantine import hold_seconds, quarantined, to_status
from .spec import InvalidSpec, PoolSpec, parse_spec
from .status import Problem, build_status

PROBLEM_RETRY_DELAY = 15.0
"""Seconds kopf waits before it retries a pool whose Secret or Redis failed."""

RECONCILES = Counter(
    "apipool_operator_reconciles", "Reconciles of pools, by result (ok, retry, error)", ["result"]
)
ACTIONS = Counter("apipool_operator_actions", "Slot pods created and deleted", ["action"])
RECONCILE_SECONDS = Histogram("apipool_operator_reconcile_seconds", "Time one reconcile takes")


def utc_now() -> str:
    """The current time as conditions carry it (RFC 3339, whole seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def may_evict_message(pool: str, risk: str) -> str:
    """The Degraded message of a pool whose Redis may evict keys."""
    return (
        f"Redis of pool {pool} may evict keys ({risk}): queued jobs, leases and results "
        "could vanish, so the slots refuse to serve. Set maxmemory-policy noeviction "
        "(or maxmemory 0) on that Redis, or set spec.allowRedisEviction: true to accept the risk"
    )


def _replaces(action: Action) -> bool:
    """Whether the action deletes an out-of-date slot (to be created anew)."""
    return isinstance(action, Delete) and action.reason == TEMPLATE_CHANGED


def _body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's posting and adoption helpers read plain mappings too; their types say Body."""
    return cast(kopf.Body, obj)


@dataclass(frozen=True)
class Observation:
    """What a reconcile saw of a pool before it changed anything."""

    body: Mapping[str, Any]
    """The pool as the API server had it."""
    pods: list[ObservedPod]
    spec: PoolSpec | None
    """None: the spec is invalid (``problem`` says why)."""
    template_hash: str = ""
    redis_url: str | None = None
    """None: not known (``problem`` says why, unless the spec is invalid)."""
    problem: Problem | None = None
    now: float = 0.0
    """Wall-clock time (epoch seconds) of the observation."""

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])


@dataclass(frozen=True)
class PoolPlan:
    """The actions the pool needs, and the ones this reconcile takes."""

    actions: list[Action] = field(default_factory=list)
    """Everything that would bring the pods in line (reported as pending)."""
    allowed: list[Action] = field(default_factory=list)
    """The subset that is safe now."""


@dataclass(frozen=True)
class Applied:
    """What became of the pool's Redis during :meth:`Reconciler.apply`."""

    stats: PoolStats | None = None
    utilization: float | None = None
    problem: Problem | None = None
    ledger: SlotSeconds | None = None
    """Where the pool's slot-seconds went over the status window (ledger.py)."""


class Reconciler:
    """Reconciles pools; owns the API clients and each pool's memory.

    One instance serves one operator (one kopf registry); its methods are called
    from kopf's handler threads, several at once.
    """

    def __init__(
        self,
        settings: OperatorSettings,
        *,
        kube: KubeApi | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = utc_now,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.kube = kube if kube is not None else KubeApi()
        self.states = PoolStates()
        self._clock = clock
        self._now = now
        self._wall = wall

    def connect(self) -> None:
        """Load the client configuration; API calls from now on use it."""
        load_config()
        self.kube.reset()

    # -- entry points ------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, *, retry_problems: bool = False) -> None:
        """Bring one pool's pods, Redis bookkeeping and status in line with its spec;
        once more when :meth:`nudge` asked for it meanwhile.

        A pool that is gone or being deleted is left alone (and forgotten)."""
        key: PoolKey = (namespace, name)
        with self.states.hold(key) as state:
            self._once(key, state, retry_problems=retry_problems)
            while self.states.rerun(state):
                self._once(key, state, retry_problems=retry_problems)

    def nudge(self, namespace: str, name: str) -> None:
        """A slot pod of the pool changed: reconcile it, unless a reconcile that
        starts after this moment (or the running one, once more) covers it."""
        if self.states.coalesce((namespace, name)):
            self.reconcile(namespace, name)

    def _once(self, key: PoolKey, state: PoolState, *, retry_problems: bool) -> None:
        namespace, name = key
        with RECONCILE_SECONDS.time():
            try:
                # Read the pool again under the lock: the body kopf hands over can predate
                # the status the previous reconcile wrote, and whether a problem is new
                # (an Event) or a condition flips is decided against that status.
                body = self.kube.read_pool(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    self.states.forget(key)
                    pool_metrics.forget(namespace, name)
                    self._release_all(namespace, name)
                else:
                    self._reconcile(body, state, retry_problems=retry_problems)
            except kopf.TemporaryError:
                RECONCILES.labels("retry").inc()
                raise
            except Exception:
                RECONCILES.labels("error").inc()
                raise
            RECONCILES.labels("ok").inc()

    def remove(self, namespace: str, name: str) -> None:
        """The pool is being deleted: delete its slot pods now (ownership would
        let the garbage collector do it, later) and forget the pool."""
        for pod in self.kube.slot_pods(namespace, name):
            self.kube.delete_pod(namespace, pod.name)
        self._release_all(namespace, name)
        self.states.forget((namespace, name))
        pool_metrics.forget(namespace, name)

    def _release_all(self, namespace: str, name: str) -> None:
        """The pool is gone: no slot will be recreated, so no terminating pod of
        it needs to keep its name; remove their slot-exit finalizers."""
        for pod in self.kube.slot_pods(namespace, name):
            if pod.terminating and pod.finalizer_index is not None:
                self.kube.release_pod(namespace, pod.name, pod.uid, pod.finalizer_index)

    def _reconcile(
        self, body: Mapping[str, Any], state: PoolState, *, retry_problems: bool
    ) -> None:
        seen = self.observe(body)
        todo = self.plan(seen)
        applied = self.apply(seen, todo, state)
        problem = self.report(seen, todo, applied)
        if problem is not None and problem.retry and retry_problems and seen.spec is not None:
            raise kopf.TemporaryError(problem.message, delay=PROBLEM_RETRY_DELAY)

    # -- the four steps ----------------------------------------------------------------

    def observe(self, body: Mapping[str, Any]) -> Observation:
        """The pool's slot pods, its checked spec and its Redis URL."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        pods = self.kube.slot_pods(namespace, name)
        try:
            spec = parse_spec(name, body.get("spec") or {})
        except InvalidSpec as exc:
            return Observation(body, pods, None, problem=Problem("InvalidSpec", str(exc)))
        digest = template_hash(spec, name)
        now = self._wall()
        try:
            url = self.kube.redis_url(namespace, spec)
        except ApipoolError as exc:
            problem = Problem("RedisSecretMissing", str(exc))
            return Observation(body, pods, spec, digest, problem=problem, now=now)
        return Observation(body, pods, spec, digest, redis_url=url, now=now)

    def plan(self, seen: Observation) -> PoolPlan:
        """The pod actions; with a problem only scale-down and releases run (without
        the Secret new pods could not start, and fewer calls is always safe)."""
        spec = seen.spec
        if spec is None:
            # Invalid until the spec changes: existing slots stay; a deleted pod
            # whose process is known gone still frees its name.
            freed = releases(Desired(0, "", now=seen.now, exit_hold=math.inf), seen.pods)
            return PoolPlan(list(freed), list(freed))
        desired = Desired(
            spec.slots,
            seen.template_hash,
            spec.max_unavailable,
            now=seen.now,
            exit_hold=hold_seconds(spec),
        )
        actions = plan(desired, seen.pods)
        allowed = [
            a
            for a in actions
            if seen.problem is None
            or isinstance(a, Release)  # frees a name; creating is what a problem stops
            or (isinstance(a, Delete) and a.index >= spec.slots)
        ]
        return PoolPlan(actions, allowed)

    def apply(self, seen: Observation, todo: PoolPlan, state: PoolState) -> Applied:
        """Run the allowed pod actions, then bring the pool's Redis in line. A
        refused pod stops the pod actions; the refusal is the problem reported."""
        spec = seen.spec
        if spec is None:
            for action in todo.allowed:
                if isinstance(action, Release):
                    self._release(seen.namespace, action)
            return Applied()
        refused = self._act_all(seen, spec, todo.allowed)
        if seen.redis_url is None:
            return Applied(problem=refused)
        synced = self._sync_redis(seen, spec, seen.redis_url, state)
        if refused is None:
            return synced
        return dataclasses.replace(synced, problem=refused)

    def report(self, seen: Observation, todo: PoolPlan, applied: Applied) -> Problem | None:
        """Post an Event for a new problem and write the status; returns the problem."""
        problem = applied.problem or seen.problem
        self._post_problem(seen.body, problem)
        spec = seen.spec
        status = build_status(
            slots=spec.slots if spec is not None else len(seen.pods),
            selector=label_selector(seen.name),
            pods=seen.pods,
            template_hash=seen.template_hash,
            actions=todo.actions,
            stats=applied.stats,
            utilization=applied.utilization,
            problem=problem,
            generation=int(seen.body["metadata"].get("generation") or 0),
            now=self._now(),
            previous=self._conditions(seen.body),
            ledger=applied.ledger,
        )
        pool_metrics.export(
            seen.namespace,
            seen.name,
            slots=status["desiredSlots"] if spec is not None else len(seen.pods),
            ready=status["readySlots"],
            stats=applied.stats,
            utilization=status.get("utilization"),
        )
        if spec is None:
            status["desiredSlots"] = (seen.body.get("spec") or {}).get("slots")
        else:
            held = quarantined(seen.pods, seen.now)
            status["quarantinedSlots"] = to_status(held, hold_seconds(spec))
            self._announce_quarantine(seen, held, hold_seconds(spec))
        self.kube.write_status(seen.namespace, seen.name, status)
        return problem

    def _announce_quarantine(self, seen: Observation, held: list[ObservedPod], hold: float) -> None:
        """A Warning Event for each pod newly quarantined (not in the status yet)."""
        before = {
            q.get("pod") for q in (seen.body.get("status") or {}).get("quarantinedSlots") or []
        }
        for pod in held:
            if f"{pod.name}/{pod.uid}" in before:
                continue
            wait = max(0.0, (pod.deleted_at or 0.0) + hold - seen.now)
            message = (
                f"pod {pod.name} was deleted but its container still runs as far as the "
                f"API knows (force-deleted, or its node is lost): slot {pod.index} is "
                f"recreated when the kubelet reports it stopped, or in {wait:.0f} s, "
                "when its lease has expired and the API has closed the old connection "
                "(spec.apiIdleTimeoutSeconds)"
            )
            kopf.warn(_body(seen.body), reason="SlotQuarantined", message=message)

    # -- the parts of apply and report -------------------------------------------------

    def _act_all(self, seen: Observation, spec: PoolSpec, actions: list[Action]) -> Problem | None:
        """Run the actions in order; a refused pod ends the run and is returned."""
        try:
            if self._rollout_starts(seen, actions):
                index = next(a.index for a in actions if _replaces(a))
                self.kube.dry_run_pod(seen.namespace, self._manifest(seen.body, spec, index))
            for action in actions:
                self._act(seen.body, spec, action)
        except PodRefused as exc:
            kept = " (out-of-date slots are kept)" if any(map(_replaces, actions)) else ""
            return Problem("SlotPodRefused", f"{exc}{kept}", retry=False)
        return None

    @staticmethod
    def _rollout_starts(seen: Observation, actions: list[Action]) -> bool:
        """An out-of-date slot is about to be deleted while no pod of the new
        template exists yet: the new template is untried."""
        return any(map(_replaces, actions)) and not any(
            p.template_hash == seen.template_hash and not p.terminating for p in seen.pods
        )

    @staticmethod
    def _manifest(body: Mapping[str, Any], spec: PoolSpec, index: int) -> dict[str, Any]:
        """Slot ``index``'s pod, owned by the pool (an ownerReference; the pool's
        own labels are not copied)."""
        meta = body["metadata"]
        manifest = slot_pod(spec, meta["name"], meta["namespace"], index)
        kopf.append_owner_reference(manifest, owner=_body(body))
        return manifest

    def _act(self, body: Mapping[str, Any], spec: PoolSpec, action: Action) -> None:
        namespace = body["metadata"]["namespace"]
        if isinstance(action, Release):
            self._release(namespace, action)
        elif isinstance(action, Create):
            manifest = self._manifest(body, spec, action.index)
            if self.kube.create_pod(namespace, manifest):
                ACTIONS.labels("create").inc()
                message = f"created {manifest['metadata']['name']}"
                kopf.info(_body(body), reason="SlotCreated", message=message)
        elif self.kube.delete_pod(namespace, action.name):
            ACTIONS.labels("delete").inc()
            message = f"deleted {action.name}: {action.reason}"
            kopf.info(_body(body), reason="SlotDeleted", message=message)

    def _release(self, namespace: str, action: Release) -> None:
        if self.kube.release_pod(namespace, action.name, action.uid, action.finalizer_index):
            ACTIONS.labels("release").inc()

    def _sync_redis(self, seen: Observation, spec: PoolSpec, url: str, state: PoolState) -> Applied:
        """Publish N and the queue bound, reap removed slots, read the stats, and
        tell whether Redis may evict the pool's keys."""
        name = seen.name
        try:
            r = redis_ops.connect(url, self.settings.redis_timeout)
            try:
                write_pool_config(r, name, slots=spec.slots, max_queue_length=spec.max_queue_length)
                self._reap_removed(r, seen, spec)
                stats = read_stats(r, name, slots=spec.slots)
                wall, window = self._wall(), self.settings.utilization_window
                back = max(window, pool_metrics.TALLY_SECONDS)
                minutes = read_minutes(r, name, seconds=back, now=wall)
                risk = redis_ops.read_eviction_risk(r)
            finally:
                r.close()
        except (RedisError, ApipoolError) as exc:
            return Applied(None, None, Problem("RedisUnreachable", f"Redis of pool {name}: {exc}"))
        pool_metrics.count_seconds(seen.namespace, name, state.ledger.increments(minutes, wall))
        recent = [one for one in minutes if one.until > wall - window]
        ledger = combine(name, recent, until=wall) if recent else None
        utilization = state.utilization(stats, self._clock(), window)
        if risk is None or spec.allow_redis_eviction:
            return Applied(stats, utilization, ledger=ledger)
        problem = Problem("RedisMayEvict", may_evict_message(name, risk))
        return Applied(stats, utilization, problem, ledger)

    @staticmethod
    def _reap_removed(r: Redis, seen: Observation, spec: PoolSpec) -> None:
        """Slots >= N will not come back: return their jobs. A slot < N without a
        pod is recreated, and its new process recovers what its predecessor left
        (never racing a live holder)."""
        proto = redis_ops.pool_protocol(seen.name, spec)
        live = {p.index for p in seen.pods}
        for slot in redis_ops.orphaned_slots(r, proto, live):
            if slot >= spec.slots:
                redis_ops.reap(
                    r,
                    proto,
                    slot,
                    max_attempts=spec.max_attempts,
                    result_ttl_seconds=spec.result_ttl_seconds,
                    redact_headers=spec.http.redact_headers,
                )

    @staticmethod
    def _conditions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return list((body.get("status") or {}).get("conditions") or [])

    def _post_problem(self, body: Mapping[str, Any], problem: Problem | None) -> None:
        """A Warning Event when a problem appears or changes, not on every reconcile."""
        if problem is None:
            return
        before = next((c for c in self._conditions(body) if c.get("type") == "Degraded"), {})
        if before.get("status") == "True" and before.get("message") == problem.message:
            return
        kopf.warn(_body(body), reason=problem.reason, message=problem.message)
