"""Validating admission on request: a test registers a :class:`Refusal` and the
emulator refuses the matching writes after schema validation, as a quota, a
policy engine or an admission webhook would (the object is not stored; a
``dryRun=All`` request is refused the same way)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import kmock

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    409: "Conflict",
    422: "Invalid",
    500: "InternalError",
}


@attrs.define(kw_only=True, eq=False)
class Refusal:
    """Refuse writes of ``kind`` (a plural, e.g. ``pods``; None: any) whose verb is in
    ``verbs`` and for which ``when(obj)`` is true (the object as it would be
    stored), answering ``code`` with ``reason`` and ``message``. ``times``: refuse
    this many matching requests and then let them pass (None: for ever)."""

    kind: str | None = None
    verbs: frozenset[str] = frozenset({"create"})
    when: Callable[[Mapping[str, Any]], bool] | None = None
    code: int = 403
    reason: str | None = None
    message: str = "refused by admission"
    times: int | None = None
    refused: list[dict[str, Any]] = attrs.field(factory=list)
    """The objects refused so far (as they would have been stored)."""

    @property
    def active(self) -> bool:
        return self.times is None or len(self.refused) < self.times

    def matches(self, verb: str, resource: kmock.resource, obj: Mapping[str, Any]) -> bool:
        if not self.active or verb not in self.verbs:
            return False
        if self.kind is not None and self.kind != resource.plural:
            return False
        return self.when is None or bool(self.when(obj))

    def error(self, resource: kmock.resource, obj: Mapping[str, Any]) -> kmock.KubernetesError:
        name = str((obj.get("metadata") or {}).get("name") or "")
        reason = self.reason or REASONS.get(self.code, "Forbidden")
        message = self.message
        if self.code == 403 and not message.startswith(resource.plural or ""):
            message = f'{resource.plural} "{name}" is forbidden: {message}'
        return kmock.KubernetesError(
            status=self.code,
            reason=reason,
            message=message,
            details={"name": name, "kind": resource.plural},
        )


def webhook_denial(webhook: str, message: str, code: int = 400) -> dict[str, Any]:
    """Keyword arguments of a Refusal worded as a denying validating webhook's."""
    return {
        "code": code,
        "reason": REASONS.get(code, "BadRequest"),
        "message": f'admission webhook "{webhook}" denied the request: {message}',
    }


def admit(
    refusals: list[Refusal], verb: str, resource: kmock.resource, obj: Mapping[str, Any]
) -> None:
    """Raise the error of the first registered refusal that matches."""
    for refusal in list(refusals):
        if refusal.matches(verb, resource, obj):
            refusal.refused.append(dict(obj))
            raise refusal.error(resource, obj)
