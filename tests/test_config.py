"""Configuration: every spelling parses, every mistake names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonmesh.config import ConfigError, RoutingStrategy, load_config, parse_config


def test_yaml(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.yaml"
    path.write_text("""
endpoint: llm
listen: 127.0.0.1:9001
variants:
  - name: a
    weight: 3
    routing_strategy: least_outstanding_requests
    models: [generate]
    instances: ["127.0.0.1:8001", "127.0.0.1:8011"]
  - name: b
    local_workers: {count: 2}
""")
    config = load_config(path)
    assert config.name == "llm" and config.listen == "127.0.0.1:9001"
    a, b = config.variants
    assert a.routing_strategy is RoutingStrategy.LEAST_OUTSTANDING_REQUESTS
    assert a.weight == 3 and a.models == frozenset({"generate"}) and len(a.instances) == 2
    assert b.routing_strategy is RoutingStrategy.RANDOM  # SageMaker's default
    assert b.local_workers is not None and b.local_workers.count == 2


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.toml"
    path.write_text("""
[[variants]]
name = "AllTraffic"
routing_strategy = "POWER_OF_TWO_CHOICES"
instances = ["localhost:8001"]
""")
    assert load_config(path).variants[0].routing_strategy is RoutingStrategy.POWER_OF_TWO_CHOICES


def test_sagemaker_create_endpoint_config_json(tmp_path: Path) -> None:
    path = tmp_path / "sm.json"
    path.write_text(json.dumps({
        "EndpointConfigName": "codegen",
        "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": "codegen2-7b",
            "InitialInstanceCount": 5, "InstanceType": "ml.g5.2xlarge",
            "InitialVariantWeight": 1.0,
            "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
        }],
    }))
    config = load_config(path)
    (variant,) = config.variants
    assert config.name == "codegen" and variant.name == "AllTraffic"
    assert variant.routing_strategy is RoutingStrategy.LEAST_OUTSTANDING_REQUESTS
    assert variant.local_workers is not None and variant.local_workers.count == 5


@pytest.mark.parametrize(("doc", "message"), [
    ({}, "variants: at least one"),
    ({"variants": [{"name": "a"}]}, "variants[0].instances: a variant needs"),
    ({"variants": [{"name": "a", "instances": ["x"]}]},
     "variants[0].instances[0]: expected HOST:PORT"),
    ({"variants": [{"name": "a", "instances": ["h:1"], "routing_strategy": "FASTEST"}]},
     "variants[0].routing_strategy: unknown strategy 'FASTEST'"),
    ({"variants": [{"name": "a", "instances": ["h:1"], "weight": 0}]},
     "variants[0].weight: must be a positive number"),
    ({"variants": [{"name": "a", "instances": ["h:1"], "wieght": 2}]},
     "variants[0].wieght: unknown key"),
    ({"variants": [{"name": "a", "instances": ["h:1"]}, {"name": "a", "instances": ["h:2"]}]},
     "variants[1].name: duplicate"),
    ({"variants": [{"name": "a", "local_workers": {"count": 0}}]},
     "variants[0].local_workers.count: must be at least 1"),
    ({"listen": "nowhere", "variants": [{"name": "a", "instances": ["h:1"]}]},
     "listen: expected HOST:PORT"),
    ({"ProductionVariants": [{"InitialInstanceCount": 1}]},
     "ProductionVariants[0].VariantName: required"),
])
def test_errors_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert message in str(info.value)


def test_unparseable_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("variants: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)


def test_work_hints() -> None:
    from tritonmesh.config import WorkHint

    config = parse_config({
        "variants": [{"name": "a", "instances": ["h:1"],
                      "routing_strategy": "least_outstanding_work"}],
        "work_hints": {"generate": {"input": "MAX_TOKENS", "base": 32},
                       "chat": {"parameter": "max_tokens"}},
    })
    assert config.variants[0].routing_strategy is RoutingStrategy.LEAST_OUTSTANDING_WORK
    assert config.work_hints == {"generate": WorkHint(input="MAX_TOKENS", base=32.0),
                                 "chat": WorkHint(parameter="max_tokens")}


@pytest.mark.parametrize(("hints", "message"), [
    ({"g": {}}, "work_hints.g: give exactly one of input or parameter"),
    ({"g": {"input": "A", "parameter": "b"}}, "give exactly one"),
    ({"g": {"input": ""}}, "work_hints.g.input: must not be empty"),
    ({"g": {"input": "A", "base": -1}}, "work_hints.g.base: must be a finite number >= 0"),
    ({"g": {"input": "A", "scale": 2}}, "work_hints.g.scale: unknown key"),
    ({"g": "MAX_TOKENS"}, "work_hints.g: expected a mapping"),
])
def test_work_hint_errors_name_the_key(hints: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"variants": [{"name": "a", "instances": ["h:1"]}], "work_hints": hints})


def test_retries() -> None:
    from tritonmesh.config import RetryConfig

    base = {"variants": [{"name": "a", "instances": ["h:1"]}]}
    assert parse_config(base).retries == RetryConfig()
    config = parse_config({**base, "retries": {"max_per_request": 1, "budget_ratio": 0.1,
                                               "min_per_s": 0, "ttl_s": 30}})
    assert config.retries == RetryConfig(max_per_request=1, budget_ratio=0.1, min_per_s=0.0,
                                         ttl_s=30.0)
    for bad, message in (
        ({"max_per_request": -1}, "retries.max_per_request: must be >= 0"),
        ({"budget_ratio": -0.5}, "retries.budget_ratio: must be a finite number >= 0"),
        ({"ttl_s": 0}, "retries.ttl_s: must be a positive number"),
        ({"ratio": 0.2}, "retries.ratio: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "retries": bad})


def test_queue_order() -> None:
    from tritonmesh.config import QueueOrder

    base = {"name": "a", "instances": ["h:1"], "routing_strategy": "LEAST_OUTSTANDING_WORK",
            "max_concurrency_per_instance": 1}
    config = parse_config({"variants": [{**base, "queue_order": "least_slack",
                                         "default_deadline_s": 30}]})
    assert config.variants[0].queue_order is QueueOrder.LEAST_SLACK
    assert config.variants[0].default_deadline_s == 30.0
    assert parse_config({"variants": [base]}).variants[0].queue_order is QueueOrder.FIFO
    for bad, message in (
        ({**base, "queue_order": "LIFO"}, "variants\\[0\\].queue_order: unknown order 'LIFO'"),
        ({**base, "queue_order": "LEAST_SLACK", "routing_strategy": "RANDOM"},
         "needs routing_strategy LEAST_OUTSTANDING_WORK and max_concurrency_per_instance"),
        ({**base, "queue_order": "LEAST_SLACK", "max_concurrency_per_instance": None},
         "needs routing_strategy"),
        ({**base, "default_deadline_s": 0}, "default_deadline_s: must be a positive number"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"variants": [bad]})


def test_dispatch_ahead() -> None:
    base = {"name": "a", "instances": ["h:1"], "routing_strategy": "LEAST_OUTSTANDING_WORK",
            "max_concurrency_per_instance": 1, "dispatch_ahead_s": 0.004}
    assert parse_config({"variants": [base]}).variants[0].dispatch_ahead_s == 0.004
    assert parse_config({"variants": [{**base, "dispatch_ahead_s": 0}]}).variants[0] \
        .dispatch_ahead_s == 0.0
    needs = "dispatch_ahead_s: .* needs routing_strategy LEAST_OUTSTANDING_WORK and " \
        "max_concurrency_per_instance: 1"
    for bad, message in (
        ({**base, "routing_strategy": "LEAST_OUTSTANDING_REQUESTS"}, needs),
        ({**base, "max_concurrency_per_instance": 2}, needs),
        ({**base, "max_concurrency_per_instance": None}, needs),
        ({**base, "dispatch_ahead_s": -1}, "dispatch_ahead_s: must be a finite number >= 0"),
        ({**base, "dispatch_ahead_s": "soon"}, "dispatch_ahead_s"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"variants": [bad]})


def test_priority_keys() -> None:
    base = {"name": "v", "instances": ["127.0.0.1:1"]}
    variant = parse_config({"variants": [base]}).variants[0]
    assert (variant.default_priority, variant.priority_aging_s) == (1, 1.0)
    variant = parse_config({"variants": [{**base, "default_priority": 3,
                                          "priority_aging_s": 0.5}]}).variants[0]
    assert (variant.default_priority, variant.priority_aging_s) == (3, 0.5)
    for key, value in (("default_priority", 0), ("default_priority", 1.5),
                       ("priority_aging_s", 0), ("priority_aging_s", "soon")):
        with pytest.raises(ConfigError, match=f"variants\\[0\\].{key}"):
            parse_config({"variants": [{**base, key: value}]})
