"""Settings: one command line for a slot, and one set of defaults."""

from __future__ import annotations

import dataclasses

import pytest

from apipool import defaults
from apipool.cli import build_parser, slot_settings
from apipool.settings import ENV_OWNER, ENV_REDIS_URL, HttpPolicy, Limits, SlotSettings, Timings
from apipool.supervisor import SupervisorSettings

pytestmark = pytest.mark.unit

URL = "redis://:s3cret@127.0.0.1:6390/2"


@pytest.mark.parametrize(
    "settings",
    [
        SlotSettings(pool="billing", slot=0, redis_url=URL, owner="o"),
        SlotSettings(
            pool="p-2",
            slot=7,
            redis_url=URL,
            owner="pod-1",
            handlers=("a=tests.handlers:echo", "http"),
            timings=Timings(
                call_timeout=2.5,
                heartbeat_interval=0.25,
                fence_margin=0.5,
                health_grace=0,
                take_block=0.1,
                hang_window=0.4,
            ),
            standby=False,
            max_attempts=5,
            result_ttl=12.5,
            limits=Limits(
                max_envelope_bytes=4096,
                max_result_bytes=2048,
                max_response_bytes=1 << 16,
                max_dead_letters=0,
            ),
            http=HttpPolicy(
                allow_urls=("http://127.0.0.1:8080/", "https://api.example/v1/"),
                follow_redirects=True,
                redact_headers=("x-secret",),
            ),
            allow_eviction=True,
            health_host="0.0.0.0",
            health_port=0,
            parent_pid=4242,
        ),
    ],
    ids=["defaults", "everything set"],
)
def test_the_slot_command_line_runs_exactly_its_settings(
    settings: SlotSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_REDIS_URL, settings.redis_url)
    monkeypatch.setenv(ENV_OWNER, settings.owner)
    argv = settings.to_argv()
    assert argv[0] == "slot"
    assert slot_settings(build_parser().parse_args(argv)) == settings


def test_the_redis_url_never_reaches_a_command_line() -> None:
    settings = SlotSettings(pool="p", slot=0, redis_url=URL, owner="o")
    assert not [arg for arg in settings.to_argv() if "redis" in arg or "s3cret" in arg]


def test_the_command_line_and_the_settings_share_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_REDIS_URL, URL)
    parsed = slot_settings(build_parser().parse_args(["slot", "--pool", "p", "--slot", "0"]))
    assert dataclasses.replace(parsed, owner="o") == SlotSettings(
        pool="p", slot=0, redis_url=URL, owner="o"
    )
    up = build_parser().parse_args(["up", "--pool", "p", "--slots", "2"])
    supervisor = SupervisorSettings(redis_url=URL, pool="p", slots=2)
    assert up.liveness_window == supervisor.liveness_window == defaults.LIVENESS_WINDOW
    assert up.max_queue_length == supervisor.max_queue_length == defaults.MAX_QUEUE_LENGTH
    assert up.max_attempts == supervisor.max_attempts == defaults.MAX_ATTEMPTS
    assert up.result_ttl == supervisor.result_ttl == defaults.RESULT_TTL
    assert up.max_envelope_bytes == supervisor.limits.max_envelope_bytes
    assert supervisor.limits.max_envelope_bytes == defaults.MAX_ENVELOPE_BYTES
    assert up.max_dead_letters == supervisor.limits.max_dead_letters == defaults.MAX_DEAD_LETTERS
    assert up.call_timeout == supervisor.timings.call_timeout == defaults.CALL_TIMEOUT
