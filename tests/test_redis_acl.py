"""Each role's Redis ACL, exactly as docs/operations.md writes it, against real components.

The ``ACL SETUSER`` lines are read out of the doc's "Redis requirements" section
and run on the test's redis-server for this test's pool; then real producers,
slots, ``apipool up`` and the operator's Redis steps work as those users, and
``ACL LOG`` must hold no refusal for them (a refusal the code swallows, such as
``INFO`` for the eviction check, counts too). A user that lacks a permission it
needs must get a clear error, not a hang.

In this module ``redis_url`` is the slot user's URL, so the ``start_slot``
fixture starts slots as that user; ``admin`` is the unrestricted client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from apipool import Client, RedisUnavailable
from apipool.layout import PoolKeys
from apipool.ledger import read_ledger
from apipool.operator import redis_ops
from apipool.protocol import PoolProtocol
from apipool.stats import read_stats, write_pool_config
from apipool.testing.redis_server import RedisServer

from .conftest import ROOT, SUBPROCESS_ENV, SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]

DOC = ROOT / "docs" / "operations.md"
ROLES = ("producer", "slot", "operator")
USER_PREFIX = "apipool-POOL-"


def doc_acl_lines() -> list[str]:
    """The ``ACL SETUSER`` lines of the doc's "Redis requirements" section, in order."""
    text = DOC.read_text()
    assert "\n## Redis requirements\n" in text
    section = text.split("\n## Redis requirements\n", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("ACL SETUSER ")]


def role_of(line: str) -> str:
    user = line.split()[2]
    assert user.startswith(USER_PREFIX), line
    return user.removeprefix(USER_PREFIX)


def base_lines() -> dict[str, str]:
    """The line that creates each role's user (it starts with ``reset``)."""
    return {role_of(line): line for line in doc_acl_lines() if line.split()[3] == "reset"}


def extra_lines() -> list[str]:
    """Lines that add to a user (``apipool up``'s ``+hset``)."""
    return [line for line in doc_acl_lines() if line.split()[3] != "reset"]


@dataclass
class AclUsers:
    """The doc's users, created on the test's redis-server for pool ``pool``."""

    admin: redis.Redis
    port: int
    pool: str
    passwords: dict[str, str] = field(
        default_factory=lambda: {role: os.urandom(12).hex() for role in ROLES}
    )

    def name(self, role: str) -> str:
        return f"apipool-{self.pool}-{role}"

    def url(self, role: str) -> str:
        return f"redis://{self.name(role)}:{self.passwords[role]}@127.0.0.1:{self.port}/0"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(role), socket_timeout=10)

    def apply(self, line: str, *, without: tuple[str, ...] = ()) -> None:
        """Run one doc line for this pool, with its own password, less ``without``."""
        role = role_of(line)
        text = line.replace("{POOL}", "{" + self.pool + "}")
        text = text.replace(USER_PREFIX, f"apipool-{self.pool}-")
        assert "POOL" not in text, text
        tokens = [f">{self.passwords[role]}" if t.startswith(">") else t for t in text.split()]
        missing = [t for t in without if t not in tokens]
        assert not missing, f"{missing} not in the doc's {role} line"
        self.admin.execute_command(*[t for t in tokens if t not in without])

    def denials(self) -> list[dict[str, Any]]:
        """ACL LOG entries of this pool's users (redis-py's optional CLIENT SETINFO aside)."""
        ours = {self.name(role) for role in ROLES}
        return [
            entry
            for entry in self.admin.acl_log(count=1000)
            if entry.get("username") in ours and entry.get("object") != "client|setinfo"
        ]


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def acl(admin: redis.Redis, redis_server: RedisServer, pool: str) -> Iterator[AclUsers]:
    users = AclUsers(admin, redis_server.port, pool)
    lines = base_lines()
    for role in ROLES:
        users.apply(lines[role])
    yield users
    admin.acl_deluser(*[users.name(role) for role in ROLES])


@pytest.fixture
def redis_url(acl: AclUsers) -> str:
    """Slots started by ``start_slot`` connect as the slot user."""
    return acl.url("slot")


def ready(slot: SlotProcess) -> None:
    wait_for(lambda: slot.status("/readyz") == 200, 20, what="slot ready")


def readyz(slot: SlotProcess) -> tuple[int, str]:
    """/readyz status and reason (also when it answers 503)."""
    try:
        with urllib.request.urlopen(slot.base + "/readyz", timeout=1) as response:
            return int(response.status), json.loads(response.read())["reason"]
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())["reason"]
    except OSError:
        return 0, ""


def envelope(job_id: str, attempt: int = 1) -> bytes:
    doc = {"id": job_id, "payload": {"n": job_id}, "submitted_at": time.time(), "attempt": attempt}
    return json.dumps(doc).encode()


# -- the doc ------------------------------------------------------------------------------

KEY_RULE = re.compile(r"^(%R~|%W~|%RW~|~)(?P<pattern>\S+)$")


def test_the_doc_gives_each_role_one_user_limited_to_the_pool() -> None:
    lines = base_lines()
    assert sorted(lines) == sorted(ROLES)
    for role, line in lines.items():
        tokens = line.split()
        assert tokens[:5] == ["ACL", "SETUSER", f"{USER_PREFIX}{role}", "reset", "on"], line
        assert tokens[5].startswith(">"), "a password, never nopass"
        assert "resetchannels" in tokens
        rules = tokens[6:]
        keys = [KEY_RULE.match(t) for t in rules if "~" in t]
        assert keys, f"{role}: no key pattern"
        for match in keys:
            assert match is not None
            assert match["pattern"].startswith("apipool:{POOL}:"), (role, match["pattern"])
        commands = [t for t in rules if t.startswith(("+", "-"))]
        assert commands, f"{role}: no command granted"
        assert all(re.fullmatch(r"\+[a-z]+", t) for t in commands), (role, commands)
        forbidden = {"allkeys", "allcommands", "allchannels", "nopass", "+@all", "~*"}
        assert not forbidden & set(tokens), (role, forbidden & set(tokens))
    assert extra_lines() == [f"ACL SETUSER {USER_PREFIX}slot +hset"]


# -- the roles at work ---------------------------------------------------------------------


def test_a_producer_and_a_slot_serve_jobs_as_their_users(
    acl: AclUsers, start_slot: StartSlot, pool: str
) -> None:
    operator = acl.client("operator")
    write_pool_config(operator, pool, slots=1, max_queue_length=100)  # the submit script reads it
    slot = start_slot()
    ready(slot)
    with Client(acl.url("producer"), pool) as client:
        first = client.wait(client.submit({"n": 1}), 15)
        assert first.status == "ok"
        assert first.result["echo"] == {"n": 1}
        assert client.call({"n": 2}, timeout=15)["echo"] == {"n": 2}
        ids = client.submit_many([{"n": n} for n in range(3, 6)])
        assert [client.result(i, timeout=15)["echo"]["n"] for i in ids] == [3, 4, 5]
        assert client.max_queue_length() == 100
    stats = read_stats(acl.client("producer"), pool)  # what ``apipool stats`` reads
    assert stats.counters["ok"] == 5
    assert stats.slots == 1
    for role in ("producer", "operator"):  # ``apipool report``, the operator's status
        wait_for(
            lambda role=role: read_ledger(acl.client(role), pool, seconds=120).states["calling"],
            10,
            what="the slot's calls in its ledger",
        )
    assert acl.denials() == []
    assert slot.status("/readyz") == 200


def test_throttled_jobs_pause_and_adapt_the_pool_under_the_slot_user(
    acl: AclUsers, start_slot: StartSlot, pool: str, tmp_path: Path
) -> None:
    """THROTTLE and SIGNALS touch only what the slot's ACL grants: a job the API
    told to wait (Retry-After: a pause) and one it refused without it (the
    effective concurrency lowered) both end ok, with no ACL denial."""
    write_pool_config(acl.client("operator"), pool, slots=2)
    slot = start_slot(handler="tests.handlers:slow_down")
    ready(slot)
    log = tmp_path / "calls.log"
    with Client(acl.url("producer"), pool) as client:
        paused = client.submit({"log": str(log), "times": 1, "retry_after": 0.3})
        adapted = client.submit({"log": str(log), "times": 1})
        assert client.wait(paused, 15).status == "ok"
        assert client.wait(adapted, 15).status == "ok"
    keys = PoolKeys(pool)
    assert acl.admin.hget(keys.stats, "throttled") == b"2"
    assert acl.admin.get(keys.effective) in (b"1", None)  # lowered, or back to N by now
    assert acl.denials() == []


def test_each_user_is_kept_to_what_its_role_touches(acl: AclUsers, pool: str) -> None:
    """The ACL can fail: a producer cannot forge a lease or empty the dead letters,
    and no user reaches another pool's keys."""
    keys, other = PoolKeys(pool), PoolKeys(f"{pool}-other")
    producer, slot = acl.client("producer"), acl.client("slot")
    with pytest.raises(NoPermissionError):
        producer.set(keys.lease(0), "forged/1")
    with pytest.raises(NoPermissionError):
        producer.delete(keys.dead)
    with pytest.raises(NoPermissionError):
        producer.lpush(keys.inflight(0), envelope("stolen"))
    with pytest.raises(NoPermissionError):
        slot.llen(other.queue)
    with pytest.raises(NoPermissionError):
        acl.client("operator").hset(other.config, "slots", 9)
    assert producer.lpush(keys.queue, envelope("fine")) == 1
    assert len(acl.denials()) == 5


def test_malformed_and_oversized_envelopes_are_dead_lettered_under_the_acl(
    acl: AclUsers, start_slot: StartSlot, pool: str
) -> None:
    """No step passes a script an empty key name (that is what a key-restricted ACL
    refused), whichever way a bad envelope goes: TAKE in Redis, WAIT, the slot's check."""
    keys = PoolKeys(pool)
    producer = acl.client("producer")
    big = b'{"id":"big","payload":"' + b"x" * 65536 + b'","submitted_at":1,"attempt":1}'
    producer.lpush(keys.queue, big)  # taken by TAKE: dead-lettered inside Redis
    slot = start_slot(extra=("--max-envelope-bytes", "4096"))
    ready(slot)
    pid = slot.proc.pid
    producer.lpush(keys.queue, b"not json at all")  # no id: no result key at all
    producer.lpush(keys.queue, b'{"id":"x"}')  # id readable: a dead result record
    producer.lpush(keys.queue, big)  # likely while the slot waits in BLMOVE
    wait_for(lambda: producer.llen(keys.dead) == 4, 20, what="four dead letters")
    with Client(acl.url("producer"), pool) as client:
        record = client.wait("x", 5)
        assert record.status == "dead"
        assert "lacks required field" in (record.error or "")
        assert client.call({"after": "bad input"}, timeout=15)["echo"] == {"after": "bad input"}
    assert producer.llen(keys.inflight(0)) == 0
    assert acl.denials() == []
    assert slot.proc.poll() is None
    assert slot.proc.pid == pid
    assert slot.status("/readyz") == 200


def test_the_operator_reaps_a_removed_slot_as_its_user(
    acl: AclUsers, admin: redis.Redis, pool: str
) -> None:
    keys = PoolKeys(pool)
    admin.lpush(keys.inflight(3), envelope("j1", attempt=1), envelope("j3", attempt=3), b"junk")
    operator = acl.client("operator")
    proto = PoolProtocol(pool)
    write_pool_config(operator, pool, slots=2)
    assert redis_ops.orphaned_slots(operator, proto, {0, 1}) == [3]
    assert redis_ops.reap(operator, proto, 3, max_attempts=3, result_ttl_seconds=60) == 3
    assert admin.llen(keys.inflight(3)) == 0
    [requeued] = [json.loads(x) for x in admin.lrange(keys.queue, 0, -1)]
    assert (requeued["id"], requeued["attempt"]) == ("j1", 2)
    dead = [json.loads(x) for x in admin.lrange(keys.dead, 0, -1)]
    assert sorted(str(entry["id"]) for entry in dead) == ["None", "j3"]
    stats = read_stats(operator, pool, slots=2)
    assert (stats.counters["recovered"], stats.counters["dead"]) == (1, 2)
    assert redis_ops.read_eviction_risk(operator) is None
    assert acl.denials() == []


def start_up(acl: AclUsers, pool: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "apipool", "up",
        "--pool", pool, "--slots", "1",
        "--handler", "tests.handlers:echo",
        "--heartbeat-interval", "0.2", "--take-block", "0.2",
    ]  # fmt: skip
    env = dict(SUBPROCESS_ENV, APIPOOL_REDIS_URL=acl.url("slot"))
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_apipool_up_serves_as_the_slot_user_with_hset(
    acl: AclUsers, admin: redis.Redis, pool: str, tmp_path: Path
) -> None:
    for line in extra_lines():
        acl.apply(line)
    proc = start_up(acl, pool, tmp_path / "up.log")
    try:
        with Client(acl.url("producer"), pool) as client:
            assert client.call({"up": 1}, timeout=30)["echo"] == {"up": 1}
        assert admin.hget(PoolKeys(pool).config, "slots") == b"1"
    finally:
        stop(proc)
    assert acl.denials() == []


# -- a missing permission ---------------------------------------------------------------------


PRODUCER_STEPS: dict[str, Callable[[Client], object]] = {
    "submit": lambda client: client.submit({"n": 1}),
    "wait": lambda client: client.wait("some-job", 30),
    "bound": lambda client: client.max_queue_length(),
}
REFUSED = re.compile(r"no permissions|can't run this command")
"""What Redis answers a refused command: directly, or from inside a script (where the
reply does not name the command; ACL LOG does)."""


@pytest.mark.parametrize(
    ("without", "step"),
    [(("+evalsha", "+eval"), "submit"), (("+blmove",), "wait"), (("+hget",), "bound")],
)
def test_a_producer_without_a_needed_permission_fails_at_once(
    acl: AclUsers, pool: str, without: tuple[str, ...], step: str
) -> None:
    acl.apply(base_lines()["producer"], without=without)
    started = time.monotonic()
    with Client(acl.url("producer"), pool) as client, pytest.raises(RedisUnavailable) as error:
        PRODUCER_STEPS[step](client)
    assert "no permissions" in str(error.value)
    assert time.monotonic() - started < 5  # refused, not waited out


def refusal_on_readyz(slot: SlotProcess) -> tuple[int, str] | None:
    status, reason = readyz(slot)
    return (status, reason) if status == 503 and REFUSED.search(reason) else None


@pytest.mark.parametrize("without", [("+set",), ("+blmove",), ("+evalsha", "+eval"), ("+lrange",)])
def test_a_slot_without_a_needed_permission_says_why_on_readyz(
    acl: AclUsers, start_slot: StartSlot, without: tuple[str, ...]
) -> None:
    acl.apply(base_lines()["slot"], without=without)
    slot = start_slot()
    refusal = wait_for(lambda: refusal_on_readyz(slot), 20, what="/readyz: refused")
    assert refusal is not None
    status, reason = refusal
    assert status == 503
    assert reason.startswith("redis refused"), reason
    assert slot.proc.poll() is None  # up, not crash-looping: a restart would not help
    assert slot.status("/healthz") == 200
    refused = {str(entry["object"]) for entry in acl.denials()}
    assert refused & {name.lstrip("+") for name in without}, refused


def test_the_operator_without_a_needed_permission_fails_at_once(acl: AclUsers, pool: str) -> None:
    line = base_lines()["operator"]
    proto = PoolProtocol(pool)
    acl.apply(line, without=("+scan",))
    with pytest.raises(NoPermissionError):
        redis_ops.orphaned_slots(acl.client("operator"), proto, set())
    acl.apply(line, without=("+hset",))
    with pytest.raises(RedisUnavailable, match="no permissions"):
        write_pool_config(acl.client("operator"), pool, slots=1)


def test_apipool_up_without_hset_exits_with_the_redis_error(
    acl: AclUsers, pool: str, tmp_path: Path
) -> None:
    log = tmp_path / "up.log"
    proc = start_up(acl, pool, log)
    try:
        code = proc.wait(30)
    finally:
        stop(proc)
    assert code == 3, log.read_text(errors="replace")
    assert "no permissions" in log.read_text(errors="replace")
