"""A small PromQL syntax checker for tests: alert rules and dashboard queries.

No promtool or PromQL library is at hand, so this is a tokenizer and a
recursive-descent parser for the subset apipool's chart uses: selectors with
label matchers, range vectors and subqueries, ``offset``, aggregations with
``by``/``without``, a table of functions with their argument types, binary
operators with ``bool``, ``on``/``ignoring`` and ``group_left``/``group_right``,
numbers, strings and durations. With ``grafana=True`` it also accepts Grafana's
template variables (``$pool``, ``${pool}``, ``${pool:regex}``,
``[$__rate_interval]``) where a duration or a number may stand.

:func:`check` returns the metric names and the variables an expression uses, or
raises :class:`PromQLError` saying where it went wrong. It checks syntax and
value types (a range vector where ``rate`` needs one, no arithmetic on range
vectors), not what the metrics mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Type = Literal["scalar", "vector", "range", "string"]

AGGREGATIONS: dict[str, tuple[Type, ...]] = {
    **{name: ("vector",) for name in ("sum", "min", "max", "avg", "count", "group", "stddev")},
    **{name: ("scalar", "vector") for name in ("topk", "bottomk", "quantile")},
}
"""Aggregation operators and the types of their parameters."""

_OVER_TIME = ("avg", "min", "max", "sum", "count", "last", "stddev")
FUNCTIONS: dict[str, tuple[tuple[Type, ...], int]] = {
    **{name: (("range",), 1) for name in ("rate", "irate", "increase", "delta", "idelta")},
    **{name: (("range",), 1) for name in ("deriv", "changes", "resets", "absent_over_time")},
    **{f"{name}_over_time": (("range",), 1) for name in _OVER_TIME},
    "quantile_over_time": (("scalar", "range"), 2),
    **{name: (("vector",), 1) for name in ("abs", "ceil", "floor", "sqrt", "exp", "ln")},
    **{name: (("vector",), 1) for name in ("absent", "sort", "sort_desc", "timestamp")},
    "round": (("vector", "scalar"), 1),
    "clamp_min": (("vector", "scalar"), 2),
    "clamp_max": (("vector", "scalar"), 2),
    "clamp": (("vector", "scalar", "scalar"), 3),
    "histogram_quantile": (("scalar", "vector"), 2),
    "scalar": (("vector",), 1),
    "vector": (("scalar",), 1),
    "time": ((), 0),
    "label_replace": (("vector", "string", "string", "string", "string"), 5),
}
"""Functions: the types of their arguments and how many are required."""

RETURNS_SCALAR = {"scalar", "time"}
SET_OPERATORS = {"and", "or", "unless"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
RESERVED = KEYWORDS | SET_OPERATORS | {"atan2"}
"""Words that cannot name a metric."""
COMPARISONS = {"==", "!=", "<", ">", "<=", ">="}
PRECEDENCE: list[set[str]] = [
    {"or"},
    {"and", "unless"},
    COMPARISONS,
    {"+", "-"},
    {"*", "/", "%", "atan2"},
    {"^"},
]
"""Binary operators from the loosest to the tightest binding."""

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
NUMBER = re.compile(_NUMBER)
DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")
_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
    |(?P<variable>\$\{\w+(?::\w+)?\}|\$\w+)
    |(?P<number>"""
    + _NUMBER
    + r"""(?:[a-zA-Z][a-zA-Z0-9]*)?)
    |(?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){}\[\],:@])""",
    re.VERBOSE,
)


class PromQLError(ValueError):
    """An expression that is not valid PromQL (of the subset checked here)."""


@dataclass(frozen=True)
class Token:
    """One token: ``kind`` is space-free (string, variable, number, duration,
    ident, op or end), ``pos`` its offset in the expression."""

    kind: str
    text: str
    pos: int


@dataclass(frozen=True)
class Checked:
    """What a valid expression refers to."""

    type: Type
    metrics: frozenset[str]
    variables: frozenset[str]


@dataclass(frozen=True)
class _Value:
    """A parsed operand: its type, and whether it is a bare selector (which
    alone may take a range)."""

    type: Type
    selector: bool = False


def tokenize(expr: str) -> list[Token]:
    """The tokens of ``expr``; a number with a unit must be a whole duration."""
    tokens = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLError(f"unexpected character {expr[pos]!r} at {pos}")
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "number" and not NUMBER.fullmatch(text):
            if not DURATION.fullmatch(text):
                raise PromQLError(f"bad duration {text!r} at {pos}")
            kind = "duration"
        if kind != "space":
            tokens.append(Token(kind, text, pos))
        pos = match.end()
    tokens.append(Token("end", "", pos))
    return tokens


def check(expr: str, *, grafana: bool = False) -> Checked:
    """Parse ``expr``; raise :class:`PromQLError` unless it is valid PromQL."""
    parser = _Parser(tokenize(expr), grafana=grafana)
    result = parser.expression()
    parser.expect("end")
    if result.type == "range":
        raise PromQLError("a range vector cannot be the result of an expression")
    return Checked(result.type, frozenset(parser.metrics), frozenset(parser.variables))


class _Parser:
    def __init__(self, tokens: list[Token], *, grafana: bool) -> None:
        self.tokens = tokens
        self.i = 0
        self.grafana = grafana
        self.metrics: set[str] = set()
        self.variables: set[str] = set()

    # -- tokens

    @property
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, text: str) -> bool:
        if self.peek.text == text and self.peek.kind in {"op", "ident"}:
            self.i += 1
            return True
        return False

    def expect(self, what: str) -> Token:
        token = self.take()
        if what not in {token.text, token.kind} or token.kind == "string":
            shown = token.text or "the end"
            raise PromQLError(f"expected {what!r}, found {shown!r} at {token.pos}")
        return token

    def variable(self, token: Token) -> None:
        if not self.grafana:
            raise PromQLError(f"template variable {token.text!r} at {token.pos}")
        found = VARIABLE.fullmatch(token.text)
        assert found is not None
        self.variables.add(found.group(1) or found.group(2))

    # -- binary operators, loosest first

    def expression(self, level: int = 0) -> _Value:
        if level == len(PRECEDENCE):
            return self.unary()
        left = self.expression(level + 1)
        while self.peek.kind in {"op", "ident"} and self.peek.text in PRECEDENCE[level]:
            op = self.take()
            is_bool = self.accept("bool")
            if is_bool and op.text not in COMPARISONS:
                raise PromQLError(f"bool after {op.text!r} at {op.pos}")
            matching = self.matching()
            # ^ is right-associative: its right side may hold another ^.
            right = self.expression(level if op.text == "^" else level + 1)
            left = self.combine(op, left, right, is_bool=is_bool, matching=matching)
        return left

    def matching(self) -> bool:
        """on/ignoring(labels) and group_left/group_right(labels); True if any."""
        if not (self.accept("on") or self.accept("ignoring")):
            return False
        self.labels()
        grouped = self.accept("group_left") or self.accept("group_right")
        if grouped and self.peek.text == "(":
            self.labels()
        return True

    def combine(
        self, op: Token, left: _Value, right: _Value, *, is_bool: bool, matching: bool
    ) -> _Value:
        for side in (left, right):
            if side.type not in {"scalar", "vector"}:
                raise PromQLError(f"{op.text!r} at {op.pos} on a {side.type}")
        vectors = left.type == right.type == "vector"
        if (op.text in SET_OPERATORS or matching) and not vectors:
            raise PromQLError(f"{op.text!r} at {op.pos} needs vectors on both sides")
        if op.text in COMPARISONS and "vector" not in {left.type, right.type} and not is_bool:
            raise PromQLError(f"comparing scalars at {op.pos} needs bool")
        kind: Type = "vector" if "vector" in {left.type, right.type} else "scalar"
        return _Value(kind)

    def unary(self) -> _Value:
        if self.peek.text in {"-", "+"} and self.peek.kind == "op":
            self.take()
            operand = self.unary()
            if operand.type not in {"scalar", "vector"}:
                raise PromQLError(f"sign before a {operand.type}")
            return operand
        return self.postfix(self.primary())

    # -- ranges, subqueries and offsets

    def postfix(self, value: _Value) -> _Value:
        start = self.peek
        if self.accept("["):
            self.duration()
            if self.accept(":"):
                if self.peek.text != "]":
                    self.duration()
                if value.type != "vector":
                    raise PromQLError(f"subquery of a {value.type} at {start.pos}")
            elif not value.selector:
                raise PromQLError(f"range of something not a selector at {start.pos}")
            self.expect("]")
            value = _Value("range", selector=True)
        if self.peek.text == "offset":
            if not value.selector:
                raise PromQLError(f"offset after something not a selector at {self.peek.pos}")
            self.take()
            self.accept("-")
            self.duration()
        return value

    def duration(self) -> None:
        token = self.take()
        if token.kind == "variable":
            self.variable(token)
        elif token.kind != "duration":
            raise PromQLError(f"bad duration {token.text or 'the end'!r} at {token.pos}")

    # -- operands

    def primary(self) -> _Value:
        token = self.peek
        if token.kind == "number":
            self.take()
            return _Value("scalar")
        if token.kind == "string":
            self.take()
            return _Value("string")
        if token.kind == "variable":
            self.take()
            self.variable(token)
            return _Value("scalar")
        if self.accept("("):
            inner = self.expression()
            self.expect(")")
            return _Value(inner.type)  # (x)[5m] is not a range
        if token.kind == "ident" and token.text in AGGREGATIONS:
            return self.aggregation()
        if token.kind == "ident" and self.tokens[self.i + 1].text == "(":
            return self.function()
        if token.text == "{" or (token.kind == "ident" and token.text not in RESERVED):
            return self.selector()
        raise PromQLError(f"unexpected {token.text or 'end'!r} at {token.pos}")

    def arguments(self, name: Token, types: tuple[Type, ...], required: int) -> None:
        self.expect("(")
        got: list[_Value] = []
        while self.peek.text != ")" or self.peek.kind == "string":
            if got:
                self.expect(",")
            got.append(self.expression())
        self.expect(")")
        if not required <= len(got) <= len(types):
            raise PromQLError(f"{name.text} at {name.pos} takes {len(types)} arguments")
        for want, arg in zip(types, got, strict=False):
            if arg.type != want:
                raise PromQLError(f"{name.text} at {name.pos} wants a {want}, got a {arg.type}")

    def function(self) -> _Value:
        name = self.take()
        if name.text not in FUNCTIONS:
            raise PromQLError(f"unknown function {name.text!r} at {name.pos}")
        types, required = FUNCTIONS[name.text]
        self.arguments(name, types, required)
        return _Value("scalar" if name.text in RETURNS_SCALAR else "vector")

    def aggregation(self) -> _Value:
        name = self.take()
        grouped = self.grouping()
        types = AGGREGATIONS[name.text]
        self.arguments(name, types, len(types))
        if not grouped:
            self.grouping()
        return _Value("vector")

    def grouping(self) -> bool:
        if self.accept("by") or self.accept("without"):
            self.labels()
            return True
        return False

    def labels(self) -> None:
        self.expect("(")
        while not self.accept(")"):
            self.expect("ident")
            if self.peek.text != ")":
                self.expect(",")

    def selector(self) -> _Value:
        start = self.peek
        named = start.kind == "ident"
        if named:
            self.metrics.add(self.take().text)
        matchers = 0
        if self.accept("{"):
            while not self.accept("}"):
                self.matcher()
                matchers += 1
                if self.peek.text != "}":
                    self.expect(",")
        if not (named or matchers):
            raise PromQLError(f"a selector needs a metric name or a matcher at {start.pos}")
        return _Value("vector", selector=True)

    def matcher(self) -> None:
        label = self.expect("ident")
        op = self.take()
        if op.text not in {"=", "!=", "=~", "!~"} or op.kind != "op":
            raise PromQLError(f"bad matcher operator {op.text!r} at {op.pos}")
        value = self.take()
        if value.kind != "string":
            raise PromQLError(f"matcher value {value.text!r} at {value.pos} is not a string")
        if self.grafana:  # elsewhere a $ in a string is a regular expression's
            for found in VARIABLE.finditer(value.text):
                self.variable(Token("variable", found.group(), value.pos))
        if label.text == "__name__":
            self.metrics.add(value.text[1:-1])
