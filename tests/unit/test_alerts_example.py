"""``examples/alerts/*.yaml`` validate against the operators a Lite worker offers, their
detector and route configs parse (``trace_core.alert_rules``), and the detector's output is the
``alert_events`` dataset's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trace_core.alert_rules import (
    ALERT_EVENTS_SCHEMA,
    ALERT_EVENTS_UNIQUE_KEY,
    routes_from_config,
    rule_from_config,
)
from trace_core.dag import OperatorInfo, validate
from trace_lite import dag_files
from trace_lite.alert_operators import ALERT_OPERATORS, alert_operators
from trace_lite.chain.operators import LITE_OPERATORS
from trace_sdk import BUILTIN_OPERATORS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "alerts").glob("*.yaml"))


def test_the_alert_operator_list_names_what_alert_operators_builds() -> None:
    assert set(alert_operators(None, None, None)) == set(ALERT_OPERATORS)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_validates_and_its_configs_parse(path: Path) -> None:
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *ALERT_OPERATORS]}
    assert dag_files.check_file(path, operators=operators, datasets={}) == []
    doc = yaml.safe_load(path.read_text())
    jobs = doc["jobs"].values()
    detectors = [j for j in jobs if j["operator"] == "alert_detector"]
    routes = [j for j in jobs if j["operator"] == "alert_route"]
    assert detectors and routes
    for job in detectors:
        config = {k: v for k, v in job["config"].items() if k not in ("name", "dataset")}
        rule_from_config(job["config"]["name"], config)
        (out,) = job["outputs"]
        assert out["schema"] == dict(ALERT_EVENTS_SCHEMA)
        assert tuple(out["unique_key"]) == ALERT_EVENTS_UNIQUE_KEY
        assert out["buffered"] and out["multi_writer"]
    for job in routes:
        assert routes_from_config(job["config"]["routes"])


def test_the_monad_detector_and_route_validate_together() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    doc = yaml.safe_load((root / "monad" / "monad.yaml").read_text())
    doc["jobs"] |= yaml.safe_load((root / "alerts" / "monad" / "route.yaml").read_text())["jobs"]
    names = [*BUILTIN_OPERATORS, *LITE_OPERATORS, *ALERT_OPERATORS]
    problems = validate(doc, operators={n: OperatorInfo(n) for n in names}, datasets={})
    assert problems == []
    detector = doc["jobs"]["gas_spikes"]
    config = {k: v for k, v in detector["config"].items() if k != "name"}
    rule_from_config(detector["config"]["name"], config)
    (out,) = detector["outputs"]
    assert out["schema"] == dict(ALERT_EVENTS_SCHEMA)
    assert tuple(out["unique_key"]) == ALERT_EVENTS_UNIQUE_KEY
    assert {"job": "gas_spikes", "output": 0, "dataset": "alert_events"} in doc["publish"]
    assert routes_from_config(doc["jobs"]["alert_route"]["config"]["routes"])
