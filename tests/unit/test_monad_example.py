"""``examples/monad/monad.yaml`` validates against the operators a Lite worker offers (the
built-in ones and ``trace_lite.chain.operators``), its ingest outputs line up with
``cryo_ingest``'s datatypes, and its transforms read the datasets they are wired to."""

from __future__ import annotations

from pathlib import Path

import yaml

from trace_core.dag import OperatorInfo
from trace_lite import dag_files
from trace_lite.alert_operators import ALERT_OPERATORS
from trace_lite.chain.operators import LITE_OPERATORS, lite_operators
from trace_sdk import BUILTIN_OPERATORS
from trace_sdk.ingest import DATATYPES

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"


def test_the_monad_example_validates() -> None:
    operators = {
        n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *LITE_OPERATORS, *ALERT_OPERATORS]
    }
    assert dag_files.check_file(EXAMPLE, operators=operators, datasets={}) == []


def test_the_lite_operator_list_names_what_lite_operators_builds() -> None:
    assert set(lite_operators(None, None)) == set(LITE_OPERATORS)  # type: ignore[arg-type]


def test_output_i_is_the_i_th_datatype_of_cryo_ingest() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    named = doc["jobs"]["ingest"]["config"]["datasets"]
    datasets = [named[d] for d in DATATYPES if d in named]
    published = {p["output"]: p["dataset"] for p in doc["publish"] if p["job"] == "ingest"}
    assert [published[i] for i in range(len(datasets))] == datasets
    logs = datasets.index("monad_logs")
    # windows and transfers fold the logs output; block_stats reads transactions and logs
    assert doc["jobs"]["windows"]["inputs"][0]["from"]["output"] == logs
    assert doc["jobs"]["transfers"]["inputs"][0]["from"]["output"] == logs
    stats = doc["jobs"]["block_stats"]
    read = [published[i["from"]["output"]] for i in stats["inputs"]]
    assert read == [stats["config"]["transactions"], stats["config"]["logs"]]
    # each transform writes the dataset its output is published as
    for job in ("transfers", "block_stats"):
        (out,) = [p["dataset"] for p in doc["publish"] if p["job"] == job]
        assert doc["jobs"][job]["config"]["dataset"] == out
