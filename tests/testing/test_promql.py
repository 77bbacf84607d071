"""The PromQL checker of apipool.testing.promql: what it accepts, and what it must refuse."""

from __future__ import annotations

import pytest

from apipool.testing.promql import PromQLError, check, tokenize

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("expr", "metrics"),
    [
        ("apipool_slot_busy", {"apipool_slot_busy"}),
        ('sum by (pool) (rate(apipool_calls_total{outcome="dead"}[5m]))', {"apipool_calls_total"}),
        ("sum(x) without (slot)", {"x"}),
        ("sum without (slot) (x)", {"x"}),
        (
            'histogram_quantile(0.95, sum by (pool, le) (rate(q_bucket{le!="+Inf"}[5m])))',
            {"q_bucket"},
        ),
        ("a < 0.8 and on (namespace, pool) b > 0", {"a", "b"}),
        ("a * on (pool) group_left (slot) b", {"a", "b"}),
        ("a / ignoring (slot) group_right b", {"a", "b"}),
        ("(a > 0) or (b > 0) unless c", {"a", "b", "c"}),
        ("max_over_time(x[1h30m] offset 5m)", {"x"}),
        ("rate(x[5m] offset -1h)", {"x"}),
        ("max_over_time(rate(x[1m])[30m:1m])", {"x"}),
        ("delta(x[15m]) > 1e3", {"x"}),
        ("-x + 2 ^ 3 ^ 2", {"x"}),
        ("clamp_min(x, 1) / clamp(y, 0, 1)", {"x", "y"}),
        ('absent(x{a=~"^b$", c!~"d"})', {"x"}),
        ('{__name__="x", pool="p"}', {"x"}),
        ('label_replace(x, "a", "$1", "b", "(.*)")', {"x"}),
        ("topk(3, x)", {"x"}),
        ("time() - x  # seconds since", {"x"}),
        ("job:apipool_calls:rate5m", {"job:apipool_calls:rate5m"}),
    ],
)
def test_accepts_valid_expressions(expr: str, metrics: set[str]) -> None:
    checked = check(expr)
    assert checked.metrics == metrics
    assert checked.variables == frozenset()


def test_types_of_results() -> None:
    assert check("x").type == "vector"
    assert check("1 + 2").type == "scalar"
    assert check("1 < bool 2").type == "scalar"
    assert check("scalar(x) * 2").type == "scalar"


def test_grafana_variables_are_found_where_they_may_stand() -> None:
    expr = (
        'sum by (pool) (rate(x{pool=~"$pool", namespace=~"${namespace:regex}"}'
        "[$__rate_interval])) > ${threshold}"
    )
    checked = check(expr, grafana=True)
    assert checked.variables == {"pool", "namespace", "__rate_interval", "threshold"}
    assert checked.metrics == {"x"}


def test_variables_are_refused_outside_grafana() -> None:
    with pytest.raises(PromQLError, match="template variable"):
        check("rate(x[$__rate_interval])")
    # A $ in a string is a regular expression's anchor, not a variable.
    assert check('x{a=~"b$"}').variables == frozenset()


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("sum(x", "expected"),
        ("x)", "expected 'end'"),
        ("((x)", "expected"),
        ("foo(x)", "unknown function 'foo'"),
        ("rates(x[5m])", "unknown function"),
        ("x[5x]", "bad duration '5x'"),
        ("x[1.5m]", "bad duration"),
        ("x[1h30]", "bad duration"),
        ("rate(x[])", "bad duration"),
        ("x +", "unexpected 'end'"),
        ("x and", "unexpected 'end'"),
        ("x == bool", "unexpected 'end'"),
        ("x and and y", "unexpected 'and'"),
        ("x{a=b}", "not a string"),
        ('x{a~"b"}', "unexpected character '~'"),
        ('x{a=="b"}', "bad matcher operator"),
        ('x{="b"}', "expected 'ident'"),
        ('x{a="b" c="d"}', "expected ','"),
        ('x{a="b"', "expected ','"),
        ("{}", "needs a metric name or a matcher"),
        ("rate(x)", "wants a range"),
        ("sum(x[5m])", "wants a vector"),
        ("x[5m]", "range vector cannot be the result"),
        ("rate((x)[5m])", "not a selector"),
        ("rate(x[5m]) offset 5m", "offset after something not a selector"),
        ("1 < 2", "needs bool"),
        ("x + bool y", "bool after '+'"),
        ("x and 1", "needs vectors"),
        ("1 * on (a) x", "needs vectors"),
        ('"a" + 1', "on a string"),
        ("clamp_min(x)", "takes 2 arguments"),
        ("histogram_quantile(x, 0.5)", "wants a scalar"),
        ("sum by (pool (x)", "expected"),
        ("sum(x) by", "expected '('"),
        ("", "unexpected 'end'"),
        ("@", "unexpected '@'"),
    ],
)
def test_rejects_invalid_expressions(expr: str, message: str) -> None:
    with pytest.raises(PromQLError) as caught:
        check(expr)
    assert message in str(caught.value)


def test_tokens_keep_durations_and_numbers_apart() -> None:
    kinds = [(t.kind, t.text) for t in tokenize("x[1h30m:1m] > 1.5e3")]
    assert kinds == [
        ("ident", "x"),
        ("op", "["),
        ("duration", "1h30m"),
        ("op", ":"),
        ("duration", "1m"),
        ("op", "]"),
        ("op", ">"),
        ("number", "1.5e3"),
        ("end", ""),
    ]
