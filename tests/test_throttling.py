"""When the API says "slow down", the pure parts: Retry-After, back-off, what a
slot hears of its pool (throttling.py), and the envelope's fields for it."""

from __future__ import annotations

import json
import random
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apipool.envelope import make_envelope, parse_envelope
from apipool.errors import EnvelopeError, RetryAfter
from apipool.protocol import Signals
from apipool.throttling import (
    BACKOFF_BASE,
    MAX_BACKOFF,
    MAX_RETRY_AFTER_CHARS,
    PoolSignals,
    backoff,
    parse_retry_after,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (formatdate(NOW + 60, usegmt=True), 60.0),
        (formatdate(NOW - 60, usegmt=True), 0.0),  # a date in the past: now
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("1e400", None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone: not an HTTP date
        ("9" * (MAX_RETRY_AFTER_CHARS + 1), None),
        ("\u00b2", None),  # a digit to str.isdigit(), not to int(): found by hypothesis
        ("\u0663", None),  # an Arabic-Indic three: float() reads it, HTTP does not
        ("1_0", None),  # float() reads it, HTTP does not
        ("+5", None),
        (" 7 ", 7.0),
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@given(st.text(max_size=200) | st.from_regex(r"\s*[\d.,eE+-]{1,12}\s*", fullmatch=True))
def test_any_retry_after_text_gives_a_wait_or_none(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or (seconds >= 0 and seconds == seconds)


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for k in range(12):
        ceiling = min(MAX_BACKOFF, BACKOFF_BASE * 2**k)
        waits = [backoff(k, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 4  # jitter: not one value
    assert backoff(10_000, rng) <= MAX_BACKOFF


def test_a_slot_is_parked_at_or_above_the_effective_concurrency() -> None:
    third = PoolSignals(slot=2)
    assert not third.parked  # nothing heard: in use
    third.heard(Signals(effective=2, pause_ms=0, slots=4), now=NOW)
    assert third.parked
    third.heard(Signals(effective=3, pause_ms=0, slots=4), now=NOW)
    assert not third.parked
    third.heard(Signals(effective=0, pause_ms=0, slots=0), now=NOW)  # N unknown
    assert not third.parked


def test_a_pause_heard_is_kept_until_its_end_and_never_shortened() -> None:
    signals = PoolSignals(slot=0)
    signals.heard(Signals(effective=4, pause_ms=3000), now=NOW)
    assert signals.pause_left(NOW + 1) == pytest.approx(2.0)
    signals.heard(Signals(effective=4, pause_ms=500), now=NOW + 1)  # shorter: kept
    assert signals.pause_left(NOW + 1) == pytest.approx(2.0)
    assert signals.pause_left(NOW + 5) == 0.0


def test_retry_after_refuses_a_negative_wait() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        RetryAfter(-1)
    with pytest.raises(ValueError, match=">= 0"):
        RetryAfter(float("nan"))
    assert RetryAfter().seconds is None
    assert "Retry-After 2 s" in str(RetryAfter(2))


def test_a_throttled_envelope_keeps_its_attempt_and_round_trips() -> None:
    env = make_envelope({"x": 1}, now=NOW)
    again = env.throttled_again(NOW + 1.23456)
    assert again.attempt == env.attempt
    assert again.throttled == 1
    assert again.not_before == pytest.approx(NOW + 1.235)
    read = parse_envelope(again.to_json(), max_bytes=1 << 20)
    assert read == again
    assert read.wait_before_call(NOW) == pytest.approx(1.235)
    assert read.next_attempt().not_before is None  # a failed attempt: no wait
    assert read.next_attempt().throttled == 1
    assert "not_before" not in env.to_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [("not_before", -1), ("not_before", "soon"), ("throttled", -1), ("throttled", 1.5),
     ("throttled", True)],
)  # fmt: skip
def test_bad_throttle_fields_are_refused(field: str, value: object) -> None:
    doc = {"id": "a", "payload": None, "submitted_at": NOW, "attempt": 1, field: value}
    with pytest.raises(EnvelopeError, match=field):
        parse_envelope(json.dumps(doc), max_bytes=1 << 20)
