"""The command line as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest

from apipool import __version__
from apipool.testing.redis_server import free_port

from .conftest import ROOT, SUBPROCESS_ENV, wait_for

pytestmark = pytest.mark.timeout(60)


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "apipool", "--version"],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.stdout.strip() == f"apipool {__version__}"


def test_standin_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apipool", "standin", "--limit", "2", "--port", str(port)],
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:

        def answers() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/work?ms=1", timeout=1) as r:
                    return bytes(r.read())
            except OSError:
                return None

        body = wait_for(answers, 15, interval=0.1, what="the stand-in to answer")
        assert b'"ok":true' in body  # type: ignore[operator]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
