"""``trace_core.dag.registry_problem``: whether a DAG may publish an output as a dataset the
registry already knows (ADR 0037), case by case; deploy applies the same rule twice
(``validate`` with the registry, then under the registry rows' locks)."""

from __future__ import annotations

from typing import Any

import pytest

from trace_core import dag
from trace_core.dag import DatasetFacts, registry_problem

SCHEMA = {"alert_key": "string", "value": "int64"}


def publishing(name: str, **output: Any) -> dag.Dag:
    """DAG ``name`` whose job ``detect`` publishes ``alert_events`` from output 0."""
    out: dict[str, Any] = {
        "storage": "postgres_table",
        "update_strategy": "append",
        "buffered": True,
        "multi_writer": True,
        "unique_key": ["alert_key"],
        "schema": dict(SCHEMA),
        **output,
    }
    if out["multi_writer"] is None:
        del out["multi_writer"]
    return dag.parse(
        {
            "name": name,
            "jobs": {"detect": {"operator": "noop", "outputs": [out]}},
            "publish": [{"job": "detect", "output": 0, "dataset": "alert_events"}],
        }
    )


def facts(
    owner: str = "whales", *, multi: bool = True, writers: frozenset[str] = frozenset()
) -> DatasetFacts:
    return DatasetFacts("alert_events", owner, multi, dict(SCHEMA), ("alert_key",), writers)


def problem_of(d: dag.Dag, f: DatasetFacts | None) -> tuple[str, str] | None:
    p = registry_problem(d.name, 0, d.publish[0], d.jobs["detect"].outputs[0], f)
    return None if p is None else (p.path, p.message)


@pytest.mark.parametrize(
    ("d", "f", "path", "words"),
    [
        (publishing("bursts"), None, None, ""),
        (publishing("bursts"), facts(), None, ""),
        (publishing("bursts"), facts(writers=frozenset({"bursts"})), None, ""),
        (publishing("bursts", multi_writer=None), facts(), "publish[0].dataset", "by DAG 'whales'"),
        (publishing("bursts"), facts(multi=False), "publish[0].dataset", "not multi_writer there"),
        (
            publishing("bursts", schema={**SCHEMA, "value": "string"}),
            facts(),
            "jobs.detect.outputs[0].schema",
            "written by DAG 'whales' with another schema",
        ),
        (
            publishing("bursts", unique_key=["value"]),
            facts(),
            "jobs.detect.outputs[0].unique_key",
            "another unique_key",
        ),
        # the owner: free alone, bound while others write it
        (publishing("whales", multi_writer=None), facts(writers=frozenset()), None, ""),
        (publishing("whales", multi_writer=None), facts(writers=frozenset({"whales"})), None, ""),
        (
            publishing("whales", multi_writer=None),
            facts(writers=frozenset({"bursts", "apes"})),
            "jobs.detect.outputs[0].multi_writer",
            "also written by DAG(s) 'apes', 'bursts'",
        ),
        (
            publishing("whales", schema={"alert_key": "string"}),
            facts(writers=frozenset({"bursts"})),
            "jobs.detect.outputs[0].schema",
            "its schema cannot change",
        ),
    ],
)
def test_registry_problem(d: dag.Dag, f: DatasetFacts | None, path: str | None, words: str) -> None:
    found = problem_of(d, f)
    if path is None:
        assert found is None
    else:
        assert found is not None and found[0] == path and words in found[1], found


def test_unknown_shape_facts_are_not_compared() -> None:
    """Facts without a schema or unique_key (a registry that does not know them) compare only
    what they know."""
    unknown = DatasetFacts("alert_events", "whales", True)
    assert (
        problem_of(publishing("bursts", schema={"x": "string"}, unique_key=["x"]), unknown) is None
    )
