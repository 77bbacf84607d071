"""The stand-in's pure parts: the accounting of connections, and HTTP on the wire."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apipool.testing.standin.accounting import Accounting
from apipool.testing.standin.wire import (
    MAX_BODY,
    BadRequest,
    Head,
    header_value_ok,
    parse_head,
    response,
    seconds,
)

from .standin_client import assert_stats

pytestmark = pytest.mark.unit


# -- accounting ------------------------------------------------------------------


def test_a_connection_over_the_limit_is_rejected_and_opens_an_event() -> None:
    acct = Accounting(limit=1)
    assert acct.request(new_connection=True)[0] == 1
    n, started, refusal = acct.request(new_connection=True)
    assert (n, started) == (2, None)
    assert refusal == (429, {"error": "over limit", "active": 2, "limit": 1}, None)
    n, started, _ = acct.request(new_connection=True)  # a third widens the same event
    assert (n, started) == (3, None)
    stats = acct.snapshot(include_samples=True)
    assert_stats(
        stats,
        active=3,
        max_concurrency=3,
        in_flight=1,
        max_in_flight=1,
        connections_total=3,
        requests_total=3,
        rejected_total=2,
    )
    assert len(stats.over_limit_events) == 1
    assert stats.over_limit_events[0]["peak"] == 3
    assert stats.over_limit_events[0]["end"] is None
    acct.leave(counted=True, in_flight=False)
    assert acct.snapshot(False).over_limit_events[0]["end"] is None  # 2 > 1: still over
    acct.leave(counted=True, in_flight=False)
    event = acct.snapshot(False).over_limit_events[0]
    assert event["end"] is not None
    assert event["end"] >= event["start"]
    assert [s[1:] for s in acct.snapshot(True).samples] == [
        (0, 0),
        (1, 1),
        (2, 1),
        (3, 1),
        (2, 1),
        (1, 1),
    ]


def test_a_further_request_on_a_counted_connection_does_not_count_it_again() -> None:
    acct = Accounting(limit=2)
    n, started, _ = acct.request(new_connection=True)
    assert n == 1
    assert started is not None
    acct.done(started, 200, 5.0)
    n, started, _ = acct.request(new_connection=False)
    assert n == 1
    assert started is not None
    acct.done(started, 404, 0.0)
    assert_stats(
        acct.snapshot(False),
        active=1,
        connections_total=1,
        requests_total=2,
        ok_total=1,
        in_flight=0,
        nominal_seconds=pytest.approx(0.005),
    )
    assert len(acct.ok_spans) == 1


def test_leaving_mid_request_drops_it_from_flight_without_an_answer() -> None:
    acct = Accounting(limit=1)
    acct.request(new_connection=True)
    acct.leave(counted=True, in_flight=True)
    assert_stats(acct.snapshot(False), active=0, in_flight=0, ok_total=0, useful_seconds=0.0)


def test_reset_keeps_what_is_open_and_restarts_the_rest() -> None:
    acct = Accounting(limit=1)
    acct.request(new_connection=True)
    acct.request(new_connection=True)
    acct.reset()
    stats = acct.snapshot(include_samples=True)
    assert_stats(
        stats,
        active=2,
        in_flight=1,
        max_concurrency=2,
        max_in_flight=1,
        connections_total=0,
        requests_total=0,
        rejected_total=0,
        over_limit_events=[{"start": 0.0, "end": None, "peak": 2}],
    )
    assert stats.samples[0] == (0.0, 2, 1)


def test_useful_between_clips_each_span_to_the_window() -> None:
    acct = Accounting(limit=1)
    acct.ok_spans.extend([(0.0, 1.0), (1.5, 2.5), (3.0, 3.25)])
    assert acct.useful_between(0.0, 10.0) == pytest.approx(2.25)
    assert acct.useful_between(0.5, 2.0) == pytest.approx(1.0)
    assert acct.useful_between(2.6, 2.9) == 0.0


@pytest.mark.parametrize(
    ("limit", "elapsed", "busy", "utilisation"),
    [(2, 10.0, 5.0, 0.25), (2, 0.0, 0.0, 0.0)],
)
def test_utilisation(limit: int, elapsed: float, busy: float, utilisation: float) -> None:
    stats = replace(Accounting(limit).snapshot(False), elapsed_seconds=elapsed, busy_seconds=busy)
    assert stats.utilisation == utilisation


def test_stats_to_dict_is_json() -> None:
    acct = Accounting(limit=1)
    acct.request(new_connection=True)
    doc = acct.snapshot(include_samples=True).to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["samples"][-1][1:] == [1, 1]
    assert "utilisation" not in doc


# -- pushing back: the shared limit and forced answers against a model --------------

Action = tuple[str, int | None]
"""``("new", _)`` / ``("again", _)``: a /work request on a new / a counted connection;
``("other", _)``: a request for another path; ``("done", _)``: the oldest call in
flight is answered; ``("shared", limit)``; ``("force", count)``."""

ACTIONS = st.one_of(
    st.tuples(st.sampled_from(["new", "again", "other", "done"]), st.none()),
    st.tuples(st.just("shared"), st.none() | st.integers(0, 4)),
    st.tuples(st.just("force"), st.integers(0, 3)),
)


@given(limit=st.integers(1, 4), actions=st.lists(ACTIONS, max_size=60))
@settings(max_examples=300, deadline=None)
def test_admission_follows_the_rules_in_their_order(limit: int, actions: list[Action]) -> None:
    """Forced answers first (/work only), then the hard limit on connections, then
    the shared limit on calls in flight: checked against a plain model."""
    acct = Accounting(limit)
    active = 0
    flight: list[float] = []
    shared: int | None = None
    forced = 0
    counts = {"rejected": 0, "shared": 0, "forced": 0}
    for kind, value in actions:
        if kind == "shared":
            shared = value
            acct.set_shared_limit(value)
        elif kind == "force":
            forced = value or 0
            acct.throttle_next(forced, 503, None)
        elif kind == "done":
            if flight:
                acct.done(flight.pop(0), 200, 0.0)
        else:
            new = kind == "new" or active == 0
            work = kind != "other"
            active += new
            got = acct.request(new_connection=new, work=work)
            if work and forced:
                forced -= 1
                want: str | None = "throttled"
            elif active > limit:
                want = "over limit"
            elif shared is not None and len(flight) >= shared:
                want = "shared limit"
            else:
                want = None
            assert got.active == active
            assert (got.refusal and got.refusal.payload["error"]) == want
            assert (got.started is None) == (want is not None)
            if got.started is not None:
                flight.append(got.started)
                assert shared is None or len(flight) <= shared
            else:
                counts["rejected"] += 1
                counts["shared"] += want == "shared limit"
                counts["forced"] += want == "throttled"
    stats = acct.snapshot(include_samples=True)
    assert_stats(
        stats,
        in_flight=len(flight),
        rejected_total=counts["rejected"],
        shared_rejected_total=counts["shared"],
        forced_total=counts["forced"],
        shared_limit=shared,
    )
    assert len(stats.rejected_at) == counts["rejected"]
    assert stats.rejected_at == sorted(stats.rejected_at)
    changes = [value for kind, value in actions if kind == "shared"]
    assert [s for _, s in stats.shared_limits] == [None, *changes]


def test_a_refusal_carries_the_retry_after_in_force_when_it_was_decided() -> None:
    acct = Accounting(limit=1, shared_limit=0, retry_after="3")
    assert acct.request(new_connection=True).refusal == (
        429,
        {"error": "shared limit", "in_flight": 0, "limit": 0},
        "3",
    )
    acct.set_retry_after(None)
    assert acct.request(new_connection=False).refusal == (
        429,
        {"error": "shared limit", "in_flight": 0, "limit": 0},
        None,
    )
    acct.throttle_next(1, 503, "Wed, 21 Oct 2015 07:28:00 GMT")
    refusal = acct.request(new_connection=False, work=True).refusal
    assert refusal == (503, {"error": "throttled"}, "Wed, 21 Oct 2015 07:28:00 GMT")


# -- the wire --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"), [(60.0, "60"), (0.25, "0.25"), (0.2, "0.2"), (1.0004, "1")]
)
def test_seconds(value: float, text: str) -> None:
    assert seconds(value) == text


@pytest.mark.parametrize(
    ("keep_alive", "connection"),
    [
        (None, b"Connection: close\r\n"),
        (60.0, b"Connection: keep-alive\r\nKeep-Alive: timeout=60\r\n"),
        (float("inf"), b"Connection: keep-alive\r\n"),
    ],
)
def test_response_bytes(keep_alive: float | None, connection: bytes) -> None:
    assert response(429, {"error": "over limit", "active": 3}, keep_alive) == (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 33\r\n" + connection + b"\r\n"
        b'{"error":"over limit","active":3}'
    )


def test_response_with_retry_after() -> None:
    assert response(503, {}, None, retry_after="120") == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: close\r\n"
        b"Retry-After: 120\r\n\r\n{}"
    )


@pytest.mark.parametrize(
    ("value", "ok"),
    [("", True), ("120", True), ("a\tb ~", True), ("1\r\n", False), ("\x7f", False), ("é", False)],
)
def test_header_value_ok(value: str, ok: bool) -> None:
    assert header_value_ok(value) is ok


@pytest.mark.parametrize(
    ("head", "parsed"),
    [
        (b"GET /work?ms=1 HTTP/1.1", Head("GET", "/work?ms=1", 0, True)),
        (b"POST /work HTTP/1.1\r\ncontent-length:  12 ", Head("POST", "/work", 12, True)),
        (b"GET / HTTP/1.1\r\nConnection: Keep-Alive, Close", Head("GET", "/", 0, False)),
        (b"GET / HTTP/1.0", Head("GET", "/", 0, False)),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive", Head("GET", "/", 0, True)),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: identity", Head("GET", "/", 0, True)),
        (b"GET / HTTP/1.1\r\nX-Odd: a:b", Head("GET", "/", 0, True)),
    ],
)
def test_parse_head(head: bytes, parsed: Head) -> None:
    assert parse_head(head) == parsed


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"garbage", "malformed request line"),
        (b"GET /work", "malformed request line"),
        (b"GET work HTTP/1.1", "malformed request line"),
        (b"G3T /work HTTP/1.1", "malformed request line"),
        (b"GET /work HTTP/2", "malformed request line"),
        (b"GET /work HTTP/1.1\r\nno colon here", "malformed header line"),
        (b"POST /work HTTP/1.1\r\nContent-Length: -3", "bad Content-Length"),
        (b"POST /work HTTP/1.1\r\nContent-Length: x", "bad Content-Length"),
        (b"POST /w HTTP/1.1\r\nContent-Length: %d" % (MAX_BODY + 1), "bad Content-Length"),
        (b"POST /work HTTP/1.1\r\nTransfer-Encoding: chunked", "Transfer-Encoding"),
    ],
)
def test_parse_head_rejects(head: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_head(head)
