"""What the API server does to an object's body before it stores it: the structural
schema of a CustomResourceDefinition (defaulting, pruning, validation) and, for
built-in kinds, validation against the Kubernetes OpenAPI schemas that
kubernetes-validate ships (strict: an unknown field is an error, as with
``kubectl --validate=strict`` and server-side field validation ``Strict``).

A refusal is a :class:`kmock.KubernetesError` with status 422 and reason
``Invalid``, its message shaped like the API server's
(``<Kind>.<group> "<name>" is invalid: <path>: Invalid value: ...``).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "apiconcurrencypool.yaml"

# The root fields the API server handles itself (ObjectMeta is not pruned by the CRD's schema).
_ROOT_OWN = ("apiVersion", "kind", "metadata")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> kmock.KubernetesError:
    """A 422 Invalid naming each (field path, problem)."""
    text = ", ".join(f"{path}: {problem}" for path, problem in causes)
    message = f'{kind} "{name}" is invalid: ' + (f"[{text}]" if len(causes) > 1 else text)
    details = {
        "name": name,
        "kind": kind,
        "causes": [
            {"reason": "FieldValueInvalid", "message": problem, "field": path}
            for path, problem in causes
        ],
    }
    return kmock.KubernetesError(status=422, reason="Invalid", message=message, details=details)


def _field_path(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


# -- custom resources: the structural schema -------------------------------------


def _to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 (structural) schema as a JSON Schema draft 4 one: ``nullable``
    admits null, ``x-kubernetes-int-or-string`` admits an integer or a string,
    vendor extensions and descriptions are dropped. draft 4 reads the boolean
    ``exclusiveMinimum``/``exclusiveMaximum`` of OpenAPI 3.0 as they are meant."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "nullable", "default"):
            continue
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = _to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _default_and_prune(value: Any, schema: Mapping[str, Any], root: bool = False) -> Any:
    """Apply the schema's defaults and drop what it does not know, as the API server
    does before validation (an explicit null of a non-nullable field is dropped, so
    its default applies)."""
    if isinstance(value, list):
        items = schema.get("items")
        return (
            [_default_and_prune(v, items) for v in value] if isinstance(items, Mapping) else value
        )
    if not isinstance(value, dict):
        return value
    props: Mapping[str, Any] = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    out: dict[str, Any] = {}
    for key, item in value.items():
        if root and key in _ROOT_OWN:
            out[key] = item
        elif key in props:
            if item is None and not props[key].get("nullable"):
                continue
            out[key] = _default_and_prune(item, props[key])
        elif isinstance(extra, Mapping):
            out[key] = _default_and_prune(item, extra)
        elif keep_unknown or extra is True:
            out[key] = item
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = _default_and_prune(copy.deepcopy(sub["default"]), sub)
    return out


class StructuralSchema:
    """The schema of one version of a CRD, as the API server applies it."""

    def __init__(self, kind: str, group: str, schema: Mapping[str, Any]) -> None:
        self.kind = f"{kind}.{group}"
        self.schema = schema
        self.validator = jsonschema.Draft4Validator(_to_json_schema(schema))

    @classmethod
    def from_crd(cls, crd: Mapping[str, Any], version: str | None = None) -> StructuralSchema:
        spec = crd["spec"]
        versions = [v for v in spec["versions"] if version in (None, v["name"])]
        if not versions:
            raise LookupError(f"the CRD serves no version {version!r}")
        chosen = next((v for v in versions if v.get("storage")), versions[0])
        return cls(spec["names"]["kind"], spec["group"], chosen["schema"]["openAPIV3Schema"])

    def admit(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The object defaulted and pruned; 422 if it breaks the schema. On an update
        (``old`` given) an error in a value the update leaves as it was is let
        through (the API server's validation ratcheting), so a status write is not
        refused for a spec stored before the schema got stricter."""
        result = _default_and_prune(copy.deepcopy(dict(obj)), self.schema, root=True)
        name = str((result.get("metadata") or {}).get("name") or "")
        errors = [
            e
            for e in self.validator.iter_errors(result)
            if old is None or not _unchanged(old, result, list(e.absolute_path))
        ]
        errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            causes = [
                (
                    _field_path(e.absolute_path),
                    f"Invalid value: {_short(e.instance)}: {e.message}",
                )
                for e in errors
            ]
            raise invalid(self.kind, name, causes)
        return result


_MISSING = object()


def _at(doc: Any, path: list[Any]) -> Any:
    for part in path:
        in_list = isinstance(doc, list) and isinstance(part, int) and part < len(doc)
        if in_list or (isinstance(doc, Mapping) and part in doc):
            doc = doc[part]
        else:
            return _MISSING
    return doc


def _unchanged(old: Any, new: Any, path: list[Any]) -> bool:
    before = _at(old, path)
    return before is not _MISSING and before == _at(new, path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition", f"{path} is not a CRD"
    return dict(crd)


def crd_schemas(path: Path = CRD_PATH) -> dict[kmock.resource, StructuralSchema]:
    """The structural schema of every served version of the CRD in ``path``."""
    crd = load_crd(path)
    spec = crd["spec"]
    return {
        kmock.resource(
            spec["group"], v["name"], spec["names"]["plural"]
        ): StructuralSchema.from_crd(crd, v["name"])
        for v in spec["versions"]
        if v.get("served", True)
    }


# -- built-in kinds: the Kubernetes OpenAPI schemas --------------------------------


def _semantic_problems(kind: str, obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A few of the API server's checks that no OpenAPI schema states."""
    problems: list[tuple[str, str]] = []
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if kind not in ("Event",) and name and not _DNS_SUBDOMAIN.match(name):
        problems.append(
            ("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain")
        )
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append((f"metadata.labels[{key}]", f"Invalid value: {value!r}"))
    if kind == "Pod":
        spec = obj.get("spec") or {}
        if not spec.get("containers"):
            problems.append(("spec.containers", "Required value"))
        seen: set[str] = set()
        for group in ("initContainers", "containers"):
            for i, container in enumerate(spec.get(group) or []):
                cname = str(container.get("name") or "")
                if not _DNS_LABEL.match(cname) or len(cname) > 63:
                    problems.append((f"spec.{group}[{i}].name", f"Invalid value: {cname!r}"))
                elif cname in seen:
                    problems.append((f"spec.{group}[{i}].name", f"Duplicate value: {cname!r}"))
                seen.add(cname)
                if not container.get("image"):
                    problems.append((f"spec.{group}[{i}].image", "Required value"))
    return problems


def validate_builtin(resource: kmock.resource, kind: str, obj: Mapping[str, Any]) -> None:
    """422 if ``obj`` breaks the strict Kubernetes OpenAPI schema of its kind (kinds
    kubernetes-validate has no schema for pass)."""
    import kubernetes_validate

    group_version = "/".join(p for p in (resource.group, resource.version) if p)
    doc = {**obj, "apiVersion": obj.get("apiVersion") or group_version, "kind": kind}
    name = str((doc.get("metadata") or {}).get("name") or "")
    what = f"{kind}.{resource.group}" if resource.group else kind
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return
    except kubernetes_validate.ValidationError as exc:
        raise invalid(what, name, [(_field_path(exc.absolute_path), exc.message)]) from None
    problems = _semantic_problems(kind, doc)
    if problems:
        raise invalid(what, name, problems)
