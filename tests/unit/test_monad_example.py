"""``examples/monad/monad.yaml`` validates against the operators a worker offers plus
``range_aggregator`` (run by the Lite in-process worker, which has an operator-state store),
and its ingest outputs line up with ``cryo_ingest``'s datatypes."""

from __future__ import annotations

from pathlib import Path

import yaml

from trace_core.dag import OperatorInfo
from trace_lite import dag_files
from trace_sdk import BUILTIN_OPERATORS
from trace_sdk.ingest import DATATYPES

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"


def test_the_monad_example_validates() -> None:
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, "range_aggregator"]}
    assert dag_files.check_file(EXAMPLE, operators=operators, datasets={}) == []


def test_output_i_is_the_i_th_datatype_of_cryo_ingest() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    named = doc["jobs"]["ingest"]["config"]["datasets"]
    datasets = [named[d] for d in DATATYPES if d in named]
    published = {p["output"]: p["dataset"] for p in doc["publish"] if p["job"] == "ingest"}
    assert [published[i] for i in range(len(datasets))] == datasets
    # the windows job folds the logs output
    assert doc["jobs"]["windows"]["inputs"][0]["from"]["output"] == datasets.index("monad_logs")
