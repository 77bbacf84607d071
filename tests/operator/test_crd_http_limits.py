"""The pool's limits and http policy in the CRD and in parse_spec: the patterns
are spec.py's, every fault is named, and the deploy README's pools are valid."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from apipool.operator.spec import (
    ALLOW_URL,
    HEADER_NAME,
    KIND,
    MAX_LIST_ITEMS,
    InvalidSpec,
    parse_spec,
)
from apipool.settings import HttpPolicy

from .test_crd import (
    CRD_PATH,
    FULL,
    MINIMAL,
    ROOT,
    apply_defaults,
    changed,
    cr,
    load_all,
    to_json_schema,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def spec_schema() -> dict[str, Any]:
    (crd,) = load_all(CRD_PATH)
    (version,) = crd["spec"]["versions"]
    spec: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    (crd,) = load_all(CRD_PATH)
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft4Validator(to_json_schema(version["schema"]["openAPIV3Schema"]))


def test_full_spec_is_parsed_into_every_field() -> None:
    parsed = parse_spec("billing", FULL)
    assert (
        parsed.max_envelope_bytes,
        parsed.max_result_bytes,
        parsed.max_response_bytes,
        parsed.max_dead_letters,
    ) == (65536, 32768, 1 << 20, 500)
    assert parsed.http == HttpPolicy(
        allow_urls=("https://api.example.com/v2/", "http://billing.team-a.svc:8080/"),
        follow_redirects=True,
        redact_headers=("X-Billing-Token",),
    )
    assert parsed.allow_redis_eviction is True


URL_SAMPLES = [
    ("https://api.example.com/", True),
    ("http://billing.team-a.svc:8080/v1/", True),
    ("https://10.0.0.5", True),
    ("http://[fd00::1]:80/", True),
    ("", False),
    ("https://", False),
    ("api.example.com", False),
    ("ftp://files.example.com/", False),
    ("HTTPS://api.example.com/", False),
    ("https://api.example.com/a b", False),
    (" https://api.example.com/", False),
]
HEADER_SAMPLES = [
    ("X-Api-Token", True),
    ("x_billing.key", True),
    ("Authorization", True),
    ("", False),
    ("X Api", False),
    ("X-Api:", False),
    ("Zähler", False),
]


def test_http_patterns_are_spec_patterns(spec_schema: dict[str, Any]) -> None:
    http = spec_schema["properties"]["http"]["properties"]
    url_pattern = http["allowUrls"]["items"]["pattern"]
    header_pattern = http["redactHeaders"]["items"]["pattern"]
    assert url_pattern == ALLOW_URL.pattern
    assert header_pattern == HEADER_NAME.pattern
    crd_url, crd_header = re.compile(url_pattern, re.ASCII), re.compile(header_pattern, re.ASCII)
    for sample, ok in URL_SAMPLES:
        assert bool(crd_url.search(sample)) == bool(ALLOW_URL.fullmatch(sample)) == ok, sample
        if ok:  # what the CRD lets through, the slot accepts
            assert HttpPolicy(allow_urls=(sample,)).allow_urls == (sample,)
    for sample, ok in HEADER_SAMPLES:
        assert bool(crd_header.search(sample)) == bool(HEADER_NAME.fullmatch(sample)) == ok, sample


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("maxEnvelopeBytes", 100, r"^spec\.maxEnvelopeBytes must be >= 256, not 100$"),
        ("maxResultBytes", 1 << 30, r"^spec\.maxResultBytes must be <= 536870912 \(512 MiB\)"),
        ("maxDeadLetters", -1, r"^spec\.maxDeadLetters must be >= 0, not -1$"),
        ("maxResponseBytes", True, r"^spec\.maxResponseBytes must be an integer, not True$"),
        (
            "http.allowUrls",
            ["https://ok.example/", "file:///etc/passwd"],
            r"^spec\.http\.allowUrls\[1\] 'file:///etc/passwd' must be a URL prefix starting "
            r"with http:// or https://",
        ),
        ("http.allowUrls", "https://x/", r"^spec\.http\.allowUrls must be a list of strings"),
        (
            "http.allowUrls",
            ["http://x/"] * (MAX_LIST_ITEMS + 1),
            rf"^spec\.http\.allowUrls may have at most {MAX_LIST_ITEMS} entries$",
        ),
        ("http.redactHeaders", [7], r"^spec\.http\.redactHeaders\[0\] 7 is not an HTTP header"),
        ("http.followRedirects", "no", r"^spec\.http\.followRedirects must be true or false"),
        ("http.allowedUrls", [], r"^unknown field\(s\) in spec\.http: allowedUrls$"),
        ("http", [], r"^spec\.http must be an object, not \[\]$"),
        ("allowRedisEviction", "yes", r"^spec\.allowRedisEviction must be true or false"),
    ],
)
def test_limit_and_http_faults_are_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse_spec("billing", changed(MINIMAL, path, value))


def readme_yaml(path: Path) -> list[dict[str, Any]]:
    """The documents of every ```yaml block of a Markdown file."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", path.read_text(), re.MULTILINE | re.DOTALL)
    docs: list[dict[str, Any]] = []
    for indent, block in blocks:
        text = "\n".join(line[len(indent) :] for line in block.splitlines())
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def test_the_deploy_readmes_pools_are_valid(
    validator: jsonschema.Draft4Validator, spec_schema: dict[str, Any]
) -> None:
    """Pools and spec snippets of deploy/README.md pass the schema and parse_spec."""
    docs = readme_yaml(ROOT / "deploy" / "README.md")
    pools = [d for d in docs if d.get("kind") == KIND]
    snippets = [cr({**MINIMAL, **d["spec"]}) for d in docs if set(d) == {"spec"}]
    assert pools
    assert snippets
    for doc in pools + snippets:
        validator.validate(doc)
        parse_spec(doc["metadata"]["name"], apply_defaults(spec_schema, doc["spec"]))
