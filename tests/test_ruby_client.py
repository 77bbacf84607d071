"""The Ruby gem in clients/ruby: its minitest files, run by a real Ruby against a
real redis-server and real slot processes, and its copies of the wire format's
scripts and limits, compared with the Python ones byte for byte.

Skipped when `ruby` or its `redis` gem is missing here, failed when `CI=true`
(CI installs Debian's ruby and ruby-redis).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import redis

from apipool import defaults, layout, protocol
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer

from .conftest import ROOT, SlotProcess
from .test_redis_acl import AclUsers, base_lines
from .test_ruby_producer import _ruby_missing

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

GEM = ROOT / "clients" / "ruby"
GEM_LIB = GEM / "lib"
MINITEST_LINE = re.compile(r"^\w+#(test_\w+) = [\d.]+ s = (\S)$", re.MULTILINE)


def require(what: str, why: str | None) -> None:
    """Skip the test when `why` says something is missing; fail it under CI=true."""
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(f"{what}: {why}")


def require_ruby() -> str:
    require("ruby", _ruby_missing())
    return str(shutil.which("ruby"))


@pytest.fixture(scope="module")
def ruby() -> str:
    return require_ruby()


def gem_env(**variables: str) -> dict[str, str]:
    """The environment of a Ruby process that loads the gem from this tree."""
    lib = os.pathsep.join(filter(None, [str(GEM_LIB), os.environ.get("RUBYLIB")]))
    return dict(os.environ, RUBYLIB=lib, **variables)


def ruby_eval(ruby: str, code: str, stdin: str = "", env: Mapping[str, str] | None = None) -> str:
    """What `code`, run with the gem loaded (and `stdin` on its input), prints."""
    proc = subprocess.run(
        [ruby, "-e", f'require "apipool"; {code}'],
        input=stdin.encode(),
        env=env or gem_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def run_minitest(ruby: str, test_file: Path, env: Mapping[str, str]) -> None:
    """Run a minitest file verbosely; assert that every test it defines ran and passed."""
    defined = set(re.findall(r"^\s*def (test_\w+)", test_file.read_text(), re.MULTILINE))
    proc = subprocess.run(
        [ruby, str(test_file), "-v"],
        env=gem_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=GEM,
        check=False,
    )
    report = f"{proc.stdout}\n{proc.stderr}"
    outcomes = dict(MINITEST_LINE.findall(proc.stdout))
    assert proc.returncode == 0, report
    assert len(defined) >= 5, report
    assert outcomes == dict.fromkeys(defined, "."), report


def test_gem_against_a_real_pool(
    ruby: str,
    start_slot: Callable[..., SlotProcess],
    redis_server: RedisServer,
    redis_url: str,
    pool: str,
) -> None:
    handlers = ("--handler", "fail=tests.handlers:permanent_failure")
    handlers += ("--handler", "sleep=tests.handlers:sleep")
    slots = [start_slot(i, handler="echo=tests.handlers:echo", extra=handlers) for i in (0, 1)]
    wait_for(lambda: all(s.status("/readyz") == 200 for s in slots), 20, what="slots ready")
    # The client connects as the producer user of docs/operations.md (the tests' own
    # set-up, such as writing a malformed record, as an unrestricted user).
    users = AclUsers(redis.Redis.from_url(redis_url), redis_server.port, pool)
    users.apply(base_lines()["producer"])
    env = {"APIPOOL_REDIS_URL": redis_url, "APIPOOL_CLIENT_URL": users.url("producer")}
    run_minitest(ruby, GEM / "test" / "client_test.rb", {**env, "APIPOOL_POOL": pool})
    assert all(s.proc.poll() is None for s in slots), [s.output()[-2000:] for s in slots]
    assert users.denials() == []
    users.admin.close()


def test_gem_submit_refusals_and_backpressure(ruby: str, redis_url: str) -> None:
    run_minitest(ruby, GEM / "test" / "queue_test.rb", {"APIPOOL_REDIS_URL": redis_url})


def test_gem_scripts_and_limits_are_the_python_ones(ruby: str) -> None:
    """Byte for byte: the gem's scripts share the Python client's SHA-1s."""
    scripts = json.loads(
        ruby_eval(ruby, "print JSON.generate(Apipool::Scripts.constants.to_h { |n| "
                  "[n, Apipool::Scripts.const_get(n)] })")
    )  # fmt: skip
    assert scripts == {"SUBMIT": protocol.SUBMIT.source, "CANCEL": protocol.CANCEL.source}
    limits = json.loads(
        ruby_eval(
            ruby,
            "print JSON.generate([Apipool::MAX_ENVELOPE_BYTES, Apipool::MAX_JSON_DEPTH, "
            "Apipool::MAX_SUBMIT_BATCH, Apipool::CANCEL_SCAN])",
        )
    )
    assert limits == [
        defaults.MAX_ENVELOPE_BYTES,
        defaults.MAX_JSON_DEPTH,
        defaults.MAX_SUBMIT_BATCH,
        layout.CANCEL_SCAN,
    ]


def test_gem_builds_with_its_files(ruby: str, tmp_path: Path) -> None:
    gem = shutil.which("gem")
    assert gem is not None
    out = tmp_path / "apipool.gem"
    subprocess.run(
        [gem, "build", "apipool.gemspec", "--output", str(out)],
        cwd=GEM,
        capture_output=True,
        timeout=60,
        check=True,
    )
    spec = json.loads(
        ruby_eval(
            ruby,
            f"require 'rubygems/package'; spec = Gem::Package.new({json.dumps(str(out))}).spec; "
            "print JSON.generate(files: spec.files, dependencies: spec.dependencies.map(&:name))",
        )
    )
    for path in ("lib/apipool.rb", "lib/apipool/client.rb", "lib/apipool/scripts.rb", "README.md"):
        assert path in spec["files"], spec
    assert spec["dependencies"] == ["redis"], spec
