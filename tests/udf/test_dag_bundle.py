"""A DAG job runs a UDF bundle with ``runtime: lambda`` and ``config.bundle: {name, digest}``:
the reference is checked when the DAG is validated, and the worker's operator list is not
consulted for it (a lambda job without a bundle keeps the operator check)."""

from __future__ import annotations

from typing import Any

import pytest

from trace_core.dag import OperatorInfo, validate

DIGEST = "sha256:" + "0f" * 32


def _dag(job: dict[str, Any]) -> dict[str, Any]:
    return {"name": "udfs", "jobs": {"double": {"triggers": [{"type": "manual"}], **job}}}


OPERATORS = {"noop": OperatorInfo("noop", "")}


def test_a_lambda_job_names_its_bundle_by_name_and_digest() -> None:
    job = {
        "operator": "udf",
        "runtime": "lambda",
        "config": {"bundle": {"name": "double", "digest": DIGEST}},
    }
    assert validate(_dag(job), operators=OPERATORS) == []


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"bundle": "double"}, "jobs.double.config.bundle"),
        ({"bundle": {"name": "double"}}, "jobs.double.config.bundle.digest"),
        (
            {"bundle": {"name": "double", "digest": "sha256:xyz"}},
            "jobs.double.config.bundle.digest",
        ),
        ({"bundle": {"name": "Double!", "digest": DIGEST}}, "jobs.double.config.bundle.name"),
    ],
)
def test_a_lambda_job_without_a_good_bundle_reference_is_refused(
    config: dict[str, Any], path: str
) -> None:
    problems = validate(_dag({"operator": "udf", "runtime": "lambda", "config": config}))
    assert [p.path for p in problems] == [path]


def test_without_a_bundle_the_operator_is_checked_as_before() -> None:
    problems = validate(_dag({"operator": "udf"}), operators=OPERATORS)
    assert [p.path for p in problems] == ["jobs.double.operator"]
    lambda_job = {"operator": "udf", "runtime": "lambda"}
    problems = validate(_dag(lambda_job), operators=OPERATORS)
    assert [p.path for p in problems] == ["jobs.double.operator"]
