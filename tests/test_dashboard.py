"""deploy/grafana/tritonmesh.json queries only what the router exports: every PromQL
expression in it is parsed, and each metric it names, with each label it matches or
groups by, must be one the collector describes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tritonmesh.balancer import Balancer, Variant
from tritonmesh.config import VariantConfig
from tritonmesh.metrics import AutoscalerCollector, BalancerCollector

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tritonmesh.json"

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<duration>\d+(?:ms|[smhdwy])\b)
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]])
""", re.VERBOSE)
_FUNCTIONS = {"sum", "count", "avg", "max", "min", "rate", "irate", "increase",
              "histogram_quantile", "label_values", "topk", "clamp_min"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_BINARY = {"and", "or", "unless", "bool"}
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Grafana's own variables, as Grafana substitutes them before Prometheus sees the query.
_GRAFANA = {"$__rate_interval": "1m", "$__interval": "1m"}


def _exported() -> dict[str, set[str]]:
    """Every sample name the router exports, with its labels (``le`` for buckets)."""
    balancer = Balancer([Variant(VariantConfig("AllTraffic", models=frozenset({"m"})))])
    exported: dict[str, set[str]] = {}
    collected = [*BalancerCollector(balancer, "e").collect(), *AutoscalerCollector([]).collect()]
    for family in collected:
        labels = {label for sample in family.samples for label in sample.labels}
        labels |= set(getattr(family, "_labelnames", ()))
        for suffix in _SUFFIXES[family.type]:
            exported[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return exported


def _tokens(expr: str) -> list[tuple[str, str]]:
    for variable, value in _GRAFANA.items():
        expr = expr.replace(variable, value)
    tokens, at = [], 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        assert match is not None, f"cannot parse {expr!r} at {expr[at:]!r}"
        assert match.lastgroup is not None
        if match.lastgroup != "ws":
            tokens.append((match.lastgroup, match.group()))
        at = match.end()
    return tokens


def parse(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metrics ``expr`` selects, each with the labels its matchers name, and the labels
    it groups by. Fails on what is not PromQL: unbalanced brackets, unknown functions, a
    matcher that is not ``label op "string"``, a range that is not a duration."""
    tokens = _tokens(expr)
    metrics: dict[str, set[str]] = {}
    grouping: set[str] = set()
    depth: list[str] = []
    i = 0

    def expect(kind: str, text: str | None = None) -> str:
        nonlocal i
        assert i < len(tokens), f"{expr!r} ends early"
        got_kind, got = tokens[i]
        assert got_kind == kind and (text is None or got == text), \
            f"{expr!r}: expected {text or kind} at {got!r}"
        i += 1
        return got

    def peek() -> str:
        assert i < len(tokens), f"{expr!r} ends early"
        return tokens[i][1]

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        i += 1
        if kind == "ident" and text in _GROUPING:
            expect("op", "(")
            while peek() != ")":
                grouping.add(expect("ident"))
                if peek() == ",":
                    i += 1
            expect("op", ")")
        elif kind == "ident" and text in _BINARY:
            continue
        elif kind == "ident" and (following == "(" or following in _GROUPING):
            assert text in _FUNCTIONS, f"{expr!r}: unknown function {text}"
        elif kind == "ident":
            labels = metrics.setdefault(text, set())
            if following == "{":
                expect("op", "{")
                while peek() != "}":
                    labels.add(expect("ident"))
                    assert peek() in {"=", "!=", "=~", "!~"}, f"{expr!r}: bad matcher"
                    i += 1
                    expect("string")
                    if peek() == ",":
                        i += 1
                expect("op", "}")
        elif text == "[":
            expect("duration")
            expect("op", "]")
        elif text == "(":
            depth.append(text)
        elif text == ")":
            assert depth, f"{expr!r}: unbalanced )"
            depth.pop()
        else:
            assert kind in {"number", "op"} and text not in "{}[]", f"{expr!r}: {text!r}"
    assert not depth, f"{expr!r}: unbalanced ("
    return metrics, grouping


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"expr", "definition"} and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_the_parser_refuses_what_prometheus_would() -> None:
    for bad in ("sum(rate(x[5m])", 'x{a="b"', "x[5]", 'x{a=b}', "frobnicate(x)"):
        with pytest.raises(AssertionError):
            parse(bad)
    assert parse('sum by (le, model) (rate(a_bucket{model=~"$model"}[$__rate_interval]))') \
        == ({"a_bucket": {"model"}}, {"le", "model"})


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported()
    # label_values(SELECTOR, LABEL) is Grafana's, around a selector Prometheus answers.
    expressions = [e.removeprefix("label_values(").rpartition(",")[0]
                   if e.startswith("label_values(") else e
                   for e in _expressions(dashboard)]
    assert len(expressions) >= 20
    used = set()
    for expr in expressions:
        metrics, grouping = parse(expr)
        assert metrics, f"{expr!r} selects no metric"
        for name, labels in metrics.items():
            assert name in exported, f"{expr!r}: {name} is not exported"
            assert labels <= exported[name], f"{expr!r}: {name} has no {labels - exported[name]}"
        known = set().union(*(exported[name] for name in metrics))
        assert grouping <= known, f"{expr!r}: groups by {grouping - known}"
        used |= set(metrics)
    # The panels the issue asks for: traffic, latency split, concurrency, queue, errors,
    # instance health, streams.
    for name in ("tritonmesh_model_invocations_total", "tritonmesh_model_latency_seconds_bucket",
                 "tritonmesh_model_overhead_latency_seconds_bucket",
                 "tritonmesh_model_concurrent_requests", "tritonmesh_variant_queued_requests",
                 "tritonmesh_model_queue_wait_seconds_bucket",
                 "tritonmesh_model_invocation_errors_total", "tritonmesh_instance_healthy",
                 "tritonmesh_model_stream_time_to_first_response_seconds_bucket",
                 "tritonmesh_model_stream_time_between_responses_seconds_bucket"):
        assert name in used, name
