"""Layering rules: producers and slots never pull in the operator's stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, SUBPROCESS_ENV

pytestmark = pytest.mark.unit

FORBIDDEN = ("kopf", "kubernetes", "apipool.operator")


@pytest.mark.parametrize(
    "module", ["apipool", "apipool.client", "apipool.slot", "apipool.supervisor", "apipool.cli"]
)
def test_runtime_modules_do_not_import_the_operator_stack(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[:2]!r}"
        f" or m.startswith({FORBIDDEN[2]!r}))\n"
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
