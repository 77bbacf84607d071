"""Layering rules: each role imports only what it needs.

- A producer's ``pip install apipool`` brings redis-py alone, and ``import
  apipool`` loads no web server, metrics, terminal UI or Kubernetes library.
- The client never imports kopf; the slot never imports the operator; the
  runtime never imports the test tools (``apipool.testing``).
- Only ``apipool.protocol`` runs the Lua scripts of ``apipool.layout``.

The import rules are checked statically on every module's source (imports
inside functions included), so a lazy import cannot slip past them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from .conftest import ROOT, SUBPROCESS_ENV

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "operator" / "apipool"
ROLE_LIBRARIES = ("aiohttp", "multidict", "prometheus_client", "rich", "kopf", "kubernetes")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _nodes(tree: ast.AST, *, lazy: bool) -> list[ast.AST]:
    """Every node of ``tree``; without ``lazy``, none inside a function body."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if lazy or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            todo.extend(ast.iter_child_nodes(node))
    return found


def imports_of(path: Path, *, lazy: bool = True) -> set[str]:
    """Every module ``path`` imports, relative imports resolved; ``lazy``: with
    the imports inside functions (which run only when the function does)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path)), lazy=lazy):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def offenders(modules: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for module in modules:
        hits = sorted(
            imp for imp in imports_of(MODULES[module]) if any(is_under(imp, f) for f in forbidden)
        )
        if hits:
            bad[module] = hits
    return bad


RUNTIME = [
    m
    for m in MODULES
    if not any(is_under(m, p) for p in ("apipool.testing", "apipool.demo", "apipool.cli"))
]
OPERATOR = [m for m in MODULES if is_under(m, "apipool.operator")]
NOT_OPERATOR = [m for m in RUNTIME if m not in OPERATOR]


def test_the_rules_see_the_modules_they_speak_of() -> None:
    for module in ("apipool.client", "apipool.slot", "apipool.supervisor", "apipool.protocol"):
        assert module in RUNTIME
    assert "apipool.operator" in OPERATOR
    assert imports_of(MODULES["apipool.client"]) >= {"redis", "apipool.protocol"}


def test_the_runtime_never_imports_the_test_tools() -> None:
    assert offenders(RUNTIME, ("apipool.testing",)) == {}


def test_nothing_but_the_operator_imports_kopf_or_kubernetes_or_the_operator() -> None:
    assert offenders(NOT_OPERATOR, ("kopf", "kubernetes", "apipool.operator")) == {}


def test_the_operator_does_not_import_the_slot_or_the_supervisor() -> None:
    forbidden = ("apipool.slot", "apipool.supervisor", "aiohttp")
    assert offenders(OPERATOR, forbidden) == {}


def test_the_client_imports_nothing_a_producer_does_not_install() -> None:
    closure = {"apipool.client"}
    todo = ["apipool.client"]
    while todo:  # the client and every apipool module its import loads
        for imp in imports_of(MODULES[todo.pop()], lazy=False):
            if imp in MODULES and imp not in closure:
                closure.add(imp)
                todo.append(imp)
    assert offenders(sorted(closure), ROLE_LIBRARIES) == {}


def script_uses(path: Path) -> list[str]:
    """Names in ``path``'s code (not its strings) that run or name a Lua script."""
    found: list[str] = []
    previous = ""
    with tokenize.open(path) as source:
        for token in tokenize.generate_tokens(source.readline):
            if token.type == tokenize.NAME and (
                token.string.endswith("_SCRIPT")
                or token.string == "register_script"
                or (previous == "." and token.string in ("eval", "evalsha"))
            ):
                found.append(f"{path.relative_to(ROOT)}:{token.start[0]} {token.string}")
            previous = token.string
    return found


@pytest.mark.parametrize("folder", ["operator/apipool", "bench", "compare", "tests"])
def test_only_the_protocol_runs_lua_scripts(folder: str) -> None:
    allowed = {PACKAGE / "protocol.py", PACKAGE / "layout.py"}
    paths = sorted(p for p in (ROOT / folder).rglob("*.py") if p not in allowed)
    assert [use for path in paths for use in script_uses(path)] == []


@pytest.mark.parametrize("module", ["apipool", "apipool.client", "apipool.cli"])
def test_importing_the_client_loads_no_role_library(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({ROLE_LIBRARIES!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_a_plain_install_requires_redis_alone() -> None:
    requires = importlib.metadata.requires("apipool") or []
    plain = [r for r in requires if "extra ==" not in r]
    assert [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] for r in plain] == ["redis"]
    extras = set(importlib.metadata.metadata("apipool").get_all("Provides-Extra") or [])
    assert {"slot", "operator", "demo", "dev"} <= extras


@pytest.mark.parametrize(
    ("command", "module", "extra"),
    [
        (["slot", "--pool", "p", "--slot", "0"], "aiohttp", "slot"),
        (["up", "--pool", "p", "--slots", "1"], "aiohttp", "slot"),
        (["operator"], "kopf", "operator"),
        (["demo", "--duration", "1"], "rich", "demo"),
        (["report", "--pool", "p"], "rich", "demo"),
    ],
)
def test_a_command_whose_extra_is_missing_says_which_to_install(
    command: list[str], module: str, extra: str
) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"  # as if the extra were not installed
        "from apipool.cli import main\n"
        f"sys.exit(main({['--log-level', 'ERROR', *command]!r}))\n"
    )
    env = dict(SUBPROCESS_ENV, APIPOOL_REDIS_URL="redis://127.0.0.1:1/0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 2, out.stderr
    assert f"pip install 'apipool[{extra}]'" in out.stderr
