"""A container's environment and command line, resolved as the kubelet does.

Pure functions: the pod and container are plain dicts as the API serves them;
Secrets and ConfigMaps are read through the ``lookup`` the caller passes (the
node fetches them from the API server when the container starts).

- ``env[].value`` expands ``$(VAR)`` references to variables defined earlier in
  the list; ``$$`` is a literal ``$``; an unknown reference stays as written;
- ``valueFrom.secretKeyRef`` / ``configMapKeyRef`` read the object's key (a
  Secret's ``data`` is base64; ``stringData`` never reaches a reader); a missing
  object or key is a :class:`ConfigProblem` (the kubelet's
  ``CreateContainerConfigError``) unless the reference is ``optional``;
- ``valueFrom.fieldRef`` supports the fields the kubelet supports for env;
- ``command`` and ``args`` expand ``$(VAR)`` against the resolved environment.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ConfigProblem", "Lookup", "command_line", "expand", "resolve_env"]

Lookup = Callable[[str, str], Mapping[str, Any] | None]
"""``lookup(kind, name)``: the Secret or ConfigMap named ``name`` (kind
``"secrets"`` or ``"configmaps"``) of the pod's namespace, or None."""


class ConfigProblem(Exception):
    """The container cannot be configured (the kubelet's
    ``CreateContainerConfigError``): it waits, the pod is not started."""


def expand(text: str, values: Mapping[str, str]) -> str:
    """``text`` with ``$(NAME)`` replaced by ``values[NAME]`` where defined, ``$$``
    by ``$``; everything else (unknown names, an unclosed ``$(``) as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$" or i + 1 >= len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(values[name] if name in values else text[i : end + 1])
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_LABEL_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a ``fieldRef`` the kubelet supports for env variables."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _LABEL_FIELD.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigProblem(f"unsupported fieldRef fieldPath {path!r}")


def _key_ref(kind: str, ref: Mapping[str, Any], lookup: Lookup) -> str | None:
    name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional"))
    obj = lookup(kind, name)
    singular = "secret" if kind == "secrets" else "configmap"
    if obj is None:
        if optional:
            return None
        raise ConfigProblem(f'{singular} "{name}" not found')
    if kind == "secrets":
        encoded = (obj.get("data") or {}).get(key)
        if encoded is None:
            if optional:
                return None
            raise ConfigProblem(f"couldn't find key {key} in Secret {name}")
        try:
            return base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigProblem(f"key {key} of Secret {name} is not valid: {exc}") from exc
    value = (obj.get("data") or {}).get(key)
    if value is None:
        if optional:
            return None
        raise ConfigProblem(f"couldn't find key {key} in ConfigMap {name}")
    return str(value)


def resolve_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup
) -> dict[str, str]:
    """The container's own environment variables, in the kubelet's order and rules."""
    values: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if source is None:
            values[name] = expand(str(item.get("value", "")), values)
            continue
        if "fieldRef" in source:
            values[name] = field_value(pod, source["fieldRef"].get("fieldPath", ""))
        elif "secretKeyRef" in source:
            found = _key_ref("secrets", source["secretKeyRef"], lookup)
            if found is not None:
                values[name] = found
        elif "configMapKeyRef" in source:
            found = _key_ref("configmaps", source["configMapKeyRef"], lookup)
            if found is not None:
                values[name] = found
        else:
            raise ConfigProblem(f"env {name}: unsupported valueFrom {sorted(source)}")
    return values


def command_line(
    container: Mapping[str, Any], entrypoint: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    """What the container runs: its ``command`` (else the image's entrypoint)
    followed by its ``args``, each expanded against ``env``."""
    command = [expand(str(c), env) for c in container.get("command") or []]
    args = [expand(str(a), env) for a in container.get("args") or []]
    return [*(command or list(entrypoint)), *args]
