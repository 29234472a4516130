"""The DAG spec (``trace_core.dag``, ``trace_lite.dag_files``): a table of invalid files, each
with the path and message it must report; valid examples (also against the JSON Schema); every
problem at once; the diff classification table; ``affected_jobs``; properties with hypothesis."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_core import dag, errors
from trace_core.dag import ChangeKind, DatasetFacts, OperatorInfo
from trace_lite import dag_files

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "dags").glob("*.yaml"))
OPERATORS = {
    n: OperatorInfo(n) for n in ("noop", "emit_events", "stage_output", "range_aggregator")
}
M, E, D = ChangeKind.MATERIALIZATION, ChangeKind.EXECUTION, ChangeKind.METADATA

#: A source job with a declared schema, for the cases to read from.
INGEST = (
    "ingest: {operator: emit_events, triggers: [{type: manual}], outputs: "
    "[{storage: object_store, update_strategy: append, schema: {start: uint64, end: uint64, "
    "ok: bool, meta: json}}]}"
)


def dag_text(*jobs: str, extra: str = "", name: str = "d") -> str:
    """A DAG file: ``jobs`` are one-line ``name: {...}`` flow mappings."""
    lines = [f"name: {name}", "jobs:"] + [f"  {j}" for j in jobs]
    return "\n".join(lines) + "\n" + extra


def reader(body: str, name: str = "b") -> str:
    """A job ``name`` reading ingest's output 0, with ``body`` added to its mapping."""
    return f"{name}: {{operator: noop, inputs: [{{from: {{job: ingest, output: 0}}}}]{body}}}"


REGISTRY = {
    "prices": DatasetFacts("prices", producer_dag="other", schema={"symbol": "string"}),
    "alerts": DatasetFacts("alerts", producer_dag="other", multi_writer=True),
}

#: (id, file text, expected path, message fragment, kwargs for validate)
INVALID: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("not_a_mapping", "- a\n- b\n", "", "a DAG file must be a mapping", {}),
    ("yaml_syntax", "name: d\njobs: {a: [1\n", "", "not valid YAML", {}),
    ("missing_name", "jobs:\n  " + INGEST + "\n", "name", "'name' is required", {}),
    ("bad_dag_name", dag_text(INGEST, name="Bad-Name"), "name", "must match", {}),
    ("unknown_top_key", dag_text(INGEST) + "jobz: {}\n", "jobz", "unknown key 'jobz'", {}),
    ("no_jobs", "name: d\njobs: {}\n", "jobs", "at least one job", {}),
    ("jobs_not_mapping", "name: d\njobs: [a]\n", "jobs", "jobs must be a mapping", {}),
    ("bad_job_name", dag_text("Ingest: {operator: noop}"), "jobs.Ingest", "job name", {}),
    (
        "missing_operator",
        dag_text("a: {triggers: [{type: manual}]}"),
        "jobs.a.operator",
        "'operator' is required",
        {},
    ),
    (
        "unknown_operator",
        dag_text(INGEST.replace("emit_events", "emit_event")),
        "jobs.ingest.operator",
        "unknown operator 'emit_event'",
        {},
    ),
    (
        "unknown_job_key",
        dag_text(INGEST, reader(", timout: 5")),
        "jobs.b.timout",
        "unknown key 'timout'",
        {},
    ),
    (
        "bad_runtime",
        dag_text(INGEST, reader(", runtime: ecs")),
        "jobs.b.runtime",
        "must be one of worker, lambda",
        {},
    ),
    (
        "bulk",
        dag_text(INGEST, reader(", execution_strategy: Bulk")),
        "jobs.b.execution_strategy",
        "Bulk is not supported",
        {},
    ),
    (
        "other_strategy",
        dag_text(INGEST, reader(", execution_strategy: batch")),
        "jobs.b.execution_strategy",
        "must be per_event",
        {},
    ),
    (
        "timeout_over_900",
        dag_text(INGEST, reader(", timeout: 901")),
        "jobs.b.timeout",
        "outside 1..900",
        {},
    ),
    (
        "timeout_16m",
        dag_text(INGEST, reader(", timeout: 16m")),
        "jobs.b.timeout",
        "timeout 960 s is outside",
        {},
    ),
    (
        "timeout_text",
        dag_text(INGEST, reader(", timeout: soon")),
        "jobs.b.timeout",
        "is not a duration",
        {},
    ),
    (
        "max_attempts_zero",
        dag_text(INGEST, reader(", max_attempts: 0")),
        "jobs.b.max_attempts",
        "outside 1..25",
        {},
    ),
    (
        "max_attempts_string",
        dag_text(INGEST, reader(", max_attempts: '3'")),
        "jobs.b.max_attempts",
        "must be an integer",
        {},
    ),
    (
        "concurrency_zero",
        dag_text(INGEST, reader(", scaling: {max_concurrency: 0}")),
        "jobs.b.scaling.max_concurrency",
        "outside 1..10000",
        {},
    ),
    (
        "scaling_unknown_key",
        dag_text(INGEST, reader(", scaling: {min: 1}")),
        "jobs.b.scaling.min",
        "unknown key 'min'",
        {},
    ),
    (
        "input_unknown_job",
        dag_text(INGEST, "b: {operator: noop, inputs: [{from: {job: ingst, output: 0}}]}"),
        "jobs.b.inputs[0].from.job",
        "no job named 'ingst'",
        {},
    ),
    (
        "input_output_index",
        dag_text(INGEST, "b: {operator: noop, inputs: [{from: {job: ingest, output: 3}}]}"),
        "jobs.b.inputs[0].from.output",
        "index 3 does not exist",
        {},
    ),
    (
        "input_job_and_dataset",
        dag_text(INGEST, "b: {operator: noop, inputs: [{from: {job: ingest, dataset: x}}]}"),
        "jobs.b.inputs[0].from",
        "not both",
        {},
    ),
    (
        "input_without_from",
        dag_text(INGEST, "b: {operator: noop, inputs: [{where: {}}]}"),
        "jobs.b.inputs[0].from",
        "'from' is required",
        {},
    ),
    (
        "input_bad_dataset_name",
        dag_text(INGEST, "b: {operator: noop, inputs: [{from: {dataset: Prices}}]}"),
        "jobs.b.inputs[0].from.dataset",
        "must match",
        {},
    ),
    (
        "input_unknown_dataset",
        dag_text(INGEST, "b: {operator: noop, inputs: [{from: {dataset: pricez}}]}"),
        "jobs.b.inputs[0].from.dataset",
        "no dataset named 'pricez'",
        {"datasets": REGISTRY},
    ),
    (
        "input_reads_own_published",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {dataset: mine}}]}",
            extra="publish: [{job: ingest, output: 0, dataset: mine}]\n",
        ),
        "jobs.b.inputs[0].from.dataset",
        "published by this DAG",
        {},
    ),
    (
        "where_sql_text",
        dag_text(
            INGEST, "b: {operator: noop, inputs: [{from: {job: ingest}, where: 'start > 5'}]}"
        ),
        "jobs.b.inputs[0].where",
        "not SQL text",
        {},
    ),
    (
        "where_unknown_op",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {like: '1%'}}}]}",
        ),
        "jobs.b.inputs[0].where.start.like",
        "unknown where operator 'like'",
        {},
    ),
    (
        "where_unknown_field",
        dag_text(
            INGEST, "b: {operator: noop, inputs: [{from: {job: ingest}, where: {strat: {gte: 1}}}]}"
        ),
        "jobs.b.inputs[0].where.strat",
        "no column 'strat'",
        {},
    ),
    (
        "where_type_mismatch",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {gte: 'ten'}}}]}",
        ),
        "jobs.b.inputs[0].where.start.gte",
        "does not fit",
        {},
    ),
    (
        "where_ordering_on_bool",
        dag_text(
            INGEST, "b: {operator: noop, inputs: [{from: {job: ingest}, where: {ok: {lt: true}}}]}"
        ),
        "jobs.b.inputs[0].where.ok.lt",
        "does not apply to a bool",
        {},
    ),
    (
        "where_on_json",
        dag_text(
            INGEST, "b: {operator: noop, inputs: [{from: {job: ingest}, where: {meta: {eq: 'x'}}}]}"
        ),
        "jobs.b.inputs[0].where.meta.eq",
        "json column",
        {},
    ),
    (
        "where_in_empty",
        dag_text(
            INGEST, "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {in: []}}}]}"
        ),
        "jobs.b.inputs[0].where.start.in",
        "non-empty list",
        {},
    ),
    (
        "where_is_null_not_bool",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {is_null: 1}}}]}",
        ),
        "jobs.b.inputs[0].where.start.is_null",
        "true or false",
        {},
    ),
    (
        "where_eq_null",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {eq: null}}}]}",
        ),
        "jobs.b.inputs[0].where.start.eq",
        "eq takes a string, number or boolean, not null",
        {},
    ),
    (
        "where_without_schema",
        dag_text(
            "a: {operator: noop, triggers: [{type: manual}], outputs: "
            "[{storage: object_store, update_strategy: replace}]}",
            "b: {operator: noop, inputs: [{from: {job: a}, where: {x: {eq: 1}}}]}",
        ),
        "jobs.b.inputs[0].where",
        "needs the input's schema",
        {},
    ),
    (
        "where_on_dataset_field",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {dataset: prices}, where: {price: {gt: 1}}}]}",
        ),
        "jobs.b.inputs[0].where.price",
        "no column 'price'",
        {"datasets": REGISTRY},
    ),
    (
        "cycle",
        dag_text(
            INGEST,
            "a: {operator: noop, inputs: [{from: {job: b}}], outputs: "
            "[{storage: object_store, update_strategy: replace}]}",
            "b: {operator: noop, inputs: [{from: {job: a}}], outputs: "
            "[{storage: object_store, update_strategy: replace}]}",
        ),
        "jobs.a.inputs",
        "cycle: a -> b -> a",
        {},
    ),
    (
        "self_cycle",
        dag_text(
            INGEST,
            "b: {operator: noop, inputs: [{from: {job: b}}], outputs: "
            "[{storage: object_store, update_strategy: replace}]}",
        ),
        "jobs.b.inputs",
        "cycle: b -> b",
        {},
    ),
    (
        "output_bad_storage",
        dag_text(INGEST, reader(", outputs: [{storage: s3, update_strategy: replace}]")),
        "jobs.b.outputs[0].storage",
        "must be one of object_store, postgres_table",
        {},
    ),
    (
        "output_missing_strategy",
        dag_text(INGEST, reader(", outputs: [{storage: object_store}]")),
        "jobs.b.outputs[0].update_strategy",
        "'update_strategy' is required",
        {},
    ),
    (
        "table_without_schema",
        dag_text(
            INGEST, reader(", outputs: [{storage: postgres_table, update_strategy: replace}]")
        ),
        "jobs.b.outputs[0].schema",
        "needs a schema",
        {},
    ),
    (
        "append_table_without_key",
        dag_text(
            INGEST,
            reader(
                ", outputs: [{storage: postgres_table, update_strategy: append, "
                "schema: {id: string}}]"
            ),
        ),
        "jobs.b.outputs[0].unique_key",
        "needs a unique_key",
        {},
    ),
    (
        "table_empty_schema",
        dag_text(
            INGEST,
            reader(", outputs: [{storage: postgres_table, update_strategy: replace, schema: {}}]"),
        ),
        "jobs.b.outputs[0].schema",
        "needs a schema",
        {},
    ),
    (
        "append_table_empty_key",
        dag_text(
            INGEST,
            reader(
                ", outputs: [{storage: postgres_table, update_strategy: append, "
                "schema: {id: string}, unique_key: []}]"
            ),
        ),
        "jobs.b.outputs[0].unique_key",
        "needs a unique_key",
        {},
    ),
    (
        "unique_key_not_in_schema",
        dag_text(
            INGEST,
            reader(
                ", outputs: [{storage: postgres_table, update_strategy: append, "
                "schema: {id: string}, unique_key: [idd]}]"
            ),
        ),
        "jobs.b.outputs[0].unique_key[0]",
        "not in the schema",
        {},
    ),
    (
        "unknown_column_type",
        dag_text(
            INGEST,
            reader(
                ", outputs: [{storage: object_store, update_strategy: replace, schema: {n: int}}]"
            ),
        ),
        "jobs.b.outputs[0].schema.n",
        "unknown column type 'int'",
        {},
    ),
    (
        "buffered_object_store",
        dag_text(
            INGEST,
            reader(", outputs: [{storage: object_store, update_strategy: append, buffered: true}]"),
        ),
        "jobs.b.outputs[0].buffered",
        "only a postgres_table",
        {},
    ),
    (
        "multi_writer_unbuffered",
        dag_text(
            INGEST,
            reader(
                ", outputs: [{storage: postgres_table, update_strategy: append, "
                "schema: {id: string}, unique_key: id, multi_writer: true}]"
            ),
        ),
        "jobs.b.outputs[0].multi_writer",
        "buffered append",
        {},
    ),
    (
        "publish_unknown_job",
        dag_text(INGEST, extra="publish: [{job: ingst, dataset: x}]\n"),
        "publish[0].job",
        "no job named 'ingst'",
        {},
    ),
    (
        "publish_output_index",
        dag_text(INGEST, extra="publish: [{job: ingest, output: 1, dataset: x}]\n"),
        "publish[0].output",
        "index 1 does not exist",
        {},
    ),
    (
        "publish_bad_dataset_name",
        dag_text(INGEST, extra="publish: [{job: ingest, dataset: 9lives}]\n"),
        "publish[0].dataset",
        "must match",
        {},
    ),
    (
        "publish_missing_dataset",
        dag_text(INGEST, extra="publish: [{job: ingest}]\n"),
        "publish[0].dataset",
        "'dataset' is required",
        {},
    ),
    (
        "publish_twice_one_dataset",
        dag_text(
            INGEST,
            reader(", outputs: [{storage: object_store, update_strategy: append}]"),
            extra="publish: [{job: ingest, dataset: x}, {job: b, dataset: x}]\n",
        ),
        "publish[1].dataset",
        "already published by ingest.outputs[0]",
        {},
    ),
    (
        "dataset_of_another_dag",
        dag_text(INGEST, extra="publish: [{job: ingest, dataset: prices}]\n"),
        "publish[0].dataset",
        "produced by DAG 'other'",
        {"datasets": REGISTRY},
    ),
    (
        "pool_undeclared",
        dag_text(INGEST, reader(", worker_pool: rpc")),
        "jobs.b.worker_pool",
        "no worker pool named 'rpc'",
        {},
    ),
    (
        "pool_on_lambda",
        dag_text(
            INGEST,
            reader(", runtime: lambda, worker_pool: rpc"),
            extra="worker_pools: {rpc: [{env: {A: b}}]}\n",
        ),
        "jobs.b.worker_pool",
        "a lambda job cannot use one",
        {},
    ),
    (
        "pool_empty",
        dag_text(INGEST, extra="worker_pools: {rpc: []}\n"),
        "worker_pools.rpc",
        "at least one slot",
        {},
    ),
    (
        "pool_not_list",
        dag_text(INGEST, extra="worker_pools: {rpc: {env: {}}}\n"),
        "worker_pools.rpc",
        "must be a list",
        {},
    ),
    (
        "slot_reserved_env",
        dag_text(INGEST, extra="worker_pools: {rpc: [{env: {TRACE_X: y}}]}\n"),
        "worker_pools.rpc[0].env.TRACE_X",
        "are the platform's",
        {},
    ),
    (
        "slot_env_not_string",
        dag_text(INGEST, extra="worker_pools: {rpc: [{env: {PORT: 80}}]}\n"),
        "worker_pools.rpc[0].env.PORT",
        "must be a string",
        {},
    ),
    (
        "slot_bad_env_name",
        dag_text(INGEST, extra="worker_pools: {rpc: [{env: {1X: y}}]}\n"),
        "worker_pools.rpc[0].env.1X",
        "not an environment variable name",
        {},
    ),
    (
        "secret_full_name",
        dag_text(INGEST, extra="worker_pools: {rpc: [{secret_env: {KEY: trace/org/o1/k}}]}\n"),
        "worker_pools.rpc[0].secret_env.KEY",
        "relative to the org's namespace",
        {},
    ),
    (
        "secret_bad_segment",
        dag_text(INGEST, extra="worker_pools: {rpc: [{secret_env: {KEY: 'rpc/../k'}}]}\n"),
        "worker_pools.rpc[0].secret_env.KEY",
        "invalid secret name segment",
        {},
    ),
    (
        "env_and_secret_env",
        dag_text(INGEST, extra="worker_pools: {rpc: [{env: {KEY: a}, secret_env: {KEY: k}}]}\n"),
        "worker_pools.rpc[0].secret_env.KEY",
        "both env and secret_env",
        {},
    ),
    (
        "source_without_trigger",
        dag_text("a: {operator: noop}"),
        "jobs.a.triggers",
        "needs a trigger",
        {},
    ),
    (
        "trigger_on_consumer",
        dag_text(INGEST, reader(", triggers: [{type: manual}]")),
        "jobs.b.triggers",
        "only source jobs",
        {},
    ),
    (
        "cron_fields",
        dag_text("a: {operator: noop, triggers: [{type: cron, schedule: '* * *'}]}"),
        "jobs.a.triggers[0].schedule",
        "5 fields",
        {},
    ),
    (
        "cron_minute_60",
        dag_text("a: {operator: noop, triggers: [{type: cron, schedule: '60 * * * *'}]}"),
        "jobs.a.triggers[0].schedule",
        "outside 0-59",
        {},
    ),
    (
        "trigger_type",
        dag_text("a: {operator: noop, triggers: [{type: webhook}]}"),
        "jobs.a.triggers[0].type",
        "must be one of manual, cron, interval",
        {},
    ),
    (
        "interval_without_every",
        dag_text("a: {operator: noop, triggers: [{type: interval}]}"),
        "jobs.a.triggers[0].every",
        "'every' is required",
        {},
    ),
    (
        "interval_zero",
        dag_text("a: {operator: noop, triggers: [{type: interval, every: 0s}]}"),
        "jobs.a.triggers[0].every",
        "not a positive duration",
        {},
    ),
    (
        "trigger_extra_key",
        dag_text("a: {operator: noop, triggers: [{type: manual, schedule: '@daily'}]}"),
        "jobs.a.triggers[0].schedule",
        "unknown key 'schedule'",
        {},
    ),
    (
        "duplicate_key",
        dag_text(INGEST, "b: {operator: noop, operator: emit_events}"),
        "jobs.b.operator",
        "appears twice",
        {},
    ),
    (
        "config_date",
        dag_text(INGEST, reader(", config: {since: 2024-01-01}")),
        "jobs.b.config.since",
        "not JSON",
        {},
    ),
    (
        "yaml_boolean_key",
        dag_text(INGEST, reader(", yes: 1")),
        "jobs.b.True",
        "is not a string",
        {},
    ),
    (
        "description_not_string",
        dag_text(INGEST) + "description: [a]\n",
        "description",
        "must be a string",
        {},
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "fragment", "kwargs"),
    [pytest.param(t, p, f, k, id=i) for i, t, p, f, k in INVALID],
)
def test_invalid_file_reports_path_and_message(
    text: str, path: str, fragment: str, kwargs: dict[str, Any]
) -> None:
    problems = dag_files.check_text(text, operators=OPERATORS, **kwargs)
    matching = [p for p in problems if p.path == path and fragment in p.message]
    assert matching, f"no problem at {path!r} with {fragment!r}; got {problems}"
    # every problem of a file that loaded points at a line of it
    assert all(p.line is not None and p.line >= 1 for p in problems), problems


def test_the_table_is_big_and_its_cases_distinct() -> None:
    assert len(INVALID) >= 30
    assert len({i for i, *_ in INVALID}) == len(INVALID)
    assert len({t for _, t, *_ in INVALID}) == len(INVALID)


def test_every_invalid_case_is_valid_without_its_mistake() -> None:
    # Guards the table: the base the cases are built from is itself valid, so each case fails
    # for its own reason.
    assert dag_files.check_text(dag_text(INGEST, reader("")), operators=OPERATORS) == []


def test_bulk_hint_points_at_range_aggregator() -> None:
    text = dag_text(INGEST, reader(", execution_strategy: Bulk"))
    (p,) = [p for p in dag_files.check_text(text) if p.path.endswith("execution_strategy")]
    assert "range_aggregator" in p.hint


def test_hints_suggest_close_names() -> None:
    text = dag_text(INGEST.replace("emit_events", "emit_event"), reader(", timout: 5"))
    hints = {p.path: p.hint for p in dag_files.check_text(text, operators=OPERATORS)}
    assert hints["jobs.ingest.operator"] == "did you mean 'emit_events'?"
    assert hints["jobs.b.timout"] == "did you mean 'timeout'?"


def test_every_problem_at_once_each_reported_once() -> None:
    text = "\n".join(
        [
            "name: d",
            "jobs:",
            "  " + INGEST.replace("storage: object_store", "storage: s3"),
            "  b: {operator: nope, inputs: [{from: {job: ingest}}], timeout: 1000}",
            "  c: {operator: noop, inputs: [{from: {job: b, output: 0}}], runtime: ecs}",
            "publish: [{job: ingest, dataset: Bad}]",
            "",
        ]
    )
    problems = dag_files.check_text(text, operators=OPERATORS)
    assert [(p.path, p.line) for p in problems] == [
        ("jobs.ingest.outputs[0].storage", 3),
        ("jobs.b.timeout", 4),
        ("jobs.c.runtime", 5),
        ("publish[0].dataset", 6),
        ("jobs.b.operator", 4),
        ("jobs.c.inputs[0].from.output", 5),
    ]
    # ingest did not parse: b's reference to it is not reported as "no job named 'ingest'"


def test_duplicate_key_line_is_the_value_yaml_keeps() -> None:
    text = "name: d\njobs:\n  a: {operator: noop, triggers: [{type: manual}]}\n  a: {}\n"
    problems = dag_files.check_text(text)
    assert [(p.path, p.line) for p in problems] == [("jobs.a", 4), ("jobs.a.operator", 4)]


def test_offline_validation_leaves_registry_rules_to_deploy() -> None:
    text = dag_text(
        INGEST,
        "b: {operator: noop, inputs: [{from: {dataset: prices}, where: {price: {gt: 1}}}]}",
        extra="publish: [{job: ingest, dataset: prices}]\n".replace("prices", "prices2"),
    )
    assert dag_files.check_text(text, operators=OPERATORS) == []
    online = dag_files.check_text(text, operators=OPERATORS, datasets=REGISTRY)
    assert [p.path for p in online] == ["jobs.b.inputs[0].where.price"]


# --- valid examples ------------------------------------------------------------------------------

VALID = {
    "lambda_and_cron": dag_text(
        "src: {operator: noop, runtime: lambda, timeout: 15m, max_attempts: 1, "
        "triggers: [{type: cron, schedule: '*/5 * * * mon-fri'}, {type: cron, schedule: '@daily'},"
        " {type: interval, every: 90}], outputs: [{storage: object_store, "
        "update_strategy: replace}]}"
    ),
    "multi_writer_alert_events": dag_text(
        INGEST,
        reader(
            ", outputs: [{storage: postgres_table, update_strategy: append, buffered: true, "
            "multi_writer: true, schema: {alert_id: string, at: timestamp}, "
            "unique_key: [alert_id]}]",
            name="detect_a",
        ),
        reader(
            ", outputs: [{storage: postgres_table, update_strategy: append, buffered: true, "
            "multi_writer: true, schema: {alert_id: string, at: timestamp}, "
            "unique_key: alert_id}]",
            name="detect_b",
        ),
        extra="publish: [{job: detect_a, dataset: alerts}, {job: detect_b, dataset: alerts}]\n",
    ),
    "reads_registry_dataset": dag_text(
        "b: {operator: noop, inputs: [{from: {dataset: prices}, "
        "where: {symbol: {in: [ETH, BTC]}}}]}"
    ),
    "where_every_operator": dag_text(
        INGEST,
        "b: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {gte: 1, lt: 10, "
        "ne: 5, not_in: [7]}, end: {is_null: false, lte: 99, gt: 0, eq: 50}, ok: {eq: true}}}]}",
    ),
    "pools_and_scaling": dag_text(
        INGEST.replace(
            "operator: emit_events,",
            "operator: emit_events, worker_pool: rpc, "
            "scaling: {max_concurrency: 8, mode: anything},",
        ),
        extra="worker_pools:\n  rpc:\n    - {env: {RPC_URL: 'http://x'}, secret_env: "
        "{RPC_KEY: rpc/key-1}}\n    - {secret_env: {RPC_KEY: rpc/key-2}}\n",
    ),
}


def _valid_docs() -> list[tuple[str, str]]:
    return [(p.name, p.read_text()) for p in EXAMPLES] + sorted(VALID.items())


def test_the_examples_directory_has_a_dag() -> None:
    assert EXAMPLES, "examples/dags/*.yaml"


@pytest.mark.parametrize(("name", "text"), _valid_docs(), ids=[n for n, _ in _valid_docs()])
def test_valid_files_validate_parse_and_match_the_json_schema(name: str, text: str) -> None:
    datasets = {**REGISTRY, "alerts": DatasetFacts("alerts", producer_dag="d", multi_writer=True)}
    assert dag_files.check_text(text, operators=OPERATORS, datasets=datasets) == []
    doc = yaml.safe_load(text)
    parsed = dag.parse(doc)
    assert parsed.name == doc["name"] and list(parsed.jobs) == list(doc["jobs"])
    jsonschema.validate(doc, dag_files.json_schema(), cls=jsonschema.Draft202012Validator)


def test_examples_use_only_builtin_operators() -> None:
    from trace_sdk import BUILTIN_OPERATORS

    builtin = {n: OperatorInfo(n) for n in BUILTIN_OPERATORS}
    for path in EXAMPLES:
        assert dag_files.check_file(path, operators=builtin) == [], path


def test_parsed_fields() -> None:
    d = dag.parse(yaml.safe_load(VALID["lambda_and_cron"]))
    src = d.jobs["src"]
    assert (src.runtime, src.timeout_s, src.max_attempts) == (dag.Runtime.LAMBDA, 900, 1)
    assert [t.type for t in src.triggers] == ["cron", "cron", "interval"]
    assert src.triggers[2].every_s == 90 and src.is_source
    pools = dag.parse(yaml.safe_load(VALID["pools_and_scaling"]))
    assert pools.jobs["ingest"].scaling == dag.Scaling(8)
    assert pools.worker_pools["rpc"][1] == dag.Slot(secret_env={"RPC_KEY": "rpc/key-2"})


def test_parse_raises_validation_failed_with_every_problem() -> None:
    doc = yaml.safe_load(dag_text("a: {operator: noop, timeout: 5000, runtime: x}"))
    with pytest.raises(errors.ValidationFailed) as info:
        dag.parse(doc)
    assert info.value.field == "jobs.a.runtime"
    assert [p["path"] for p in info.value.details["problems"]] == [
        "jobs.a.runtime",
        "jobs.a.timeout",
    ]


# --- the JSON Schema -----------------------------------------------------------------------------


def test_schema_is_valid_and_lists_the_kernels_keys() -> None:
    schema = dag_files.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    defs = schema["$defs"]
    assert set(schema["properties"]) == dag.DAG_KEYS
    assert set(defs["job"]["properties"]) == dag.JOB_KEYS
    assert set(defs["input"]["properties"]) == dag.INPUT_KEYS
    assert set(defs["output"]["properties"]) == dag.OUTPUT_KEYS
    assert set(defs["publish"]["properties"]) == dag.PUBLISH_KEYS
    assert set(defs["slot"]["properties"]) == dag.SLOT_KEYS
    assert set(defs["job"]["properties"]["scaling"]["properties"]) == dag.SCALING_KEYS
    assert set(defs["where"]["additionalProperties"]["properties"]) == dag.WHERE_OPERATORS
    assert set(defs["output"]["properties"]["schema"]["additionalProperties"]["enum"]) == (
        dag.COLUMN_TYPES
    )


SCHEMA_REJECTS = [
    "unknown_top_key", "missing_name", "bad_dag_name", "no_jobs", "bad_runtime",
    "bulk", "timeout_text", "max_attempts_string", "output_bad_storage",
    "output_missing_strategy", "where_sql_text", "where_unknown_op", "trigger_type",
    "interval_without_every", "slot_reserved_env", "unknown_column_type", "trigger_extra_key",
    "table_without_schema", "table_empty_schema", "append_table_empty_key",
]  # fmt: skip


@pytest.mark.parametrize("case", SCHEMA_REJECTS)
def test_schema_rejects_structural_mistakes(case: str) -> None:
    (text,) = [t for i, t, *_ in INVALID if i == case]
    validator = jsonschema.Draft202012Validator(dag_files.json_schema())
    assert list(validator.iter_errors(yaml.safe_load(text)))


# --- diff ----------------------------------------------------------------------------------------

BASE = yaml.safe_load(
    dag_text(
        INGEST,
        "decode: {operator: noop, inputs: [{from: {job: ingest}, where: {start: {gte: 0}}}], "
        "outputs: [{storage: object_store, update_strategy: replace, schema: {x: int64}}], "
        "worker_pool: rpc, scaling: {max_concurrency: 2, mode: a}, timeout: 30, max_attempts: 3}",
        "store: {operator: noop, inputs: [{from: {job: decode}}], config: {k: 1}, "
        "outputs: [{storage: object_store, update_strategy: append}]}",
        "side: {operator: noop, inputs: [{from: {job: ingest}}]}",
        extra="publish: [{job: store, dataset: stored}]\n"
        "worker_pools: {rpc: [{env: {A: a}}], spare: [{env: {B: b}}]}\n",
    )
)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return edit


def _drop_job(doc: dict[str, Any]) -> None:
    del doc["jobs"]["side"]


#: (edit, expected [(path, kind)], expected affected jobs) -- the classification table.
DIFF_CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[tuple[str, ChangeKind]], set[str]]] = [
    ("operator", _set("jobs.decode.operator", "stage_output"), [("jobs.decode.operator", M)], {"decode", "store"}),
    ("config", _set("jobs.store.config", {"k": 2}), [("jobs.store.config", M)], {"store"}),
    ("where", _set("jobs.decode.inputs.0.where", {"start": {"gte": 5}}), [("jobs.decode.inputs[0].where", M)], {"decode", "store"}),
    ("from", _set("jobs.store.inputs.0.from", {"job": "ingest"}), [("jobs.store.inputs[0].from", M)], {"store"}),
    ("inputs_added", _set("jobs.side.inputs", [{"from": {"job": "ingest"}}, {"from": {"job": "decode"}}]), [("jobs.side.inputs", M)], {"side"}),
    ("output_schema", _set("jobs.decode.outputs.0.schema", {"x": "int32"}), [("jobs.decode.outputs[0].schema", M)], {"decode", "store"}),
    ("output_strategy", _set("jobs.ingest.outputs.0.update_strategy", "replace"), [("jobs.ingest.outputs[0].update_strategy", M)], {"ingest", "decode", "store", "side"}),
    ("runtime", _set("jobs.store.runtime", "lambda"), [("jobs.store.runtime", E)], set()),
    ("timeout", _set("jobs.decode.timeout", "5m"), [("jobs.decode.timeout", E)], set()),
    ("max_attempts", _set("jobs.decode.max_attempts", 5), [("jobs.decode.max_attempts", E)], set()),
    ("pool", _set("jobs.decode.worker_pool", "spare"), [("jobs.decode.worker_pool", E)], set()),
    ("concurrency", _set("jobs.decode.scaling", {"max_concurrency": 4, "mode": "a"}), [("jobs.decode.scaling.max_concurrency", E)], set()),
    ("scaling_mode_ignored", _set("jobs.decode.scaling", {"max_concurrency": 2, "mode": "b"}), [], set()),
    ("triggers", _set("jobs.ingest.triggers", [{"type": "interval", "every": "1m"}]), [("jobs.ingest.triggers", E)], set()),
    ("slot_env", _set("worker_pools.rpc", [{"env": {"A": "b"}}]), [("worker_pools.rpc", E)], set()),
    ("description", _set("jobs.store.description", "stores"), [("jobs.store.description", D)], set()),
    ("publish_renamed", _set("publish", [{"job": "store", "dataset": "kept"}]), [("publish.kept", D), ("publish.stored", D)], set()),
    ("job_added", _set("jobs.extra", {"operator": "noop", "inputs": [{"from": {"job": "store"}}]}), [("jobs.extra", M)], {"extra"}),
    ("job_removed", _drop_job, [("jobs.side", M)], set()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "expected", "rebuild"),
    [pytest.param(e, x, r, id=i) for i, e, x, r in DIFF_CASES],
)
def test_diff_classification(
    edit: Callable[[dict[str, Any]], None],
    expected: list[tuple[str, ChangeKind]],
    rebuild: set[str],
) -> None:
    new_doc = copy.deepcopy(BASE)
    edit(new_doc)
    assert dag_files.check_text(yaml.safe_dump(new_doc), operators=OPERATORS) == []
    old, new = dag.parse(BASE), dag.parse(new_doc)
    changes = dag.diff(old, new)
    assert sorted((c.path, c.kind) for c in changes) == sorted(expected)
    assert dag.affected_jobs(new, changes) == rebuild


def test_diff_of_a_dag_with_itself_is_empty() -> None:
    assert dag.diff(dag.parse(BASE), dag.parse(copy.deepcopy(BASE))) == []


def test_reordering_a_where_map_is_no_change() -> None:
    def with_where(where: str) -> dag.Dag:
        job = f"b: {{operator: noop, inputs: [{{from: {{job: ingest}}, where: {where}}}]}}"
        return dag.parse(yaml.safe_load(dag_text(INGEST, job)))

    a = with_where("{start: {gte: 1, lt: 5}, end: {eq: 3}}")
    b = with_where("{end: {eq: 3}, start: {lt: 5, gte: 1}}")
    assert dag.diff(a, b) == []
    assert dag.diff(a, with_where("{end: {eq: 3}, start: {lt: 6, gte: 1}}")) != []


def test_every_change_kind_rule_is_in_the_docs_table() -> None:
    doc = (ROOT / "docs" / "specs" / "dag.md").read_text()
    for rule, kind in dag.CHANGE_KINDS.items():
        assert re.search(rf"^\| `{re.escape(rule)}` \| {kind.value} \|", doc, re.M), rule


def test_changes_carry_plain_values() -> None:
    new_doc = copy.deepcopy(BASE)
    new_doc["jobs"]["decode"]["inputs"][0]["where"] = {"start": {"in": [1, 2]}}
    (change,) = dag.diff(dag.parse(BASE), dag.parse(new_doc))
    assert change.old == [{"field": "start", "op": "gte", "value": 0}]
    assert change.new == [{"field": "start", "op": "in", "value": [1, 2]}]


# --- graph properties ----------------------------------------------------------------------------


@st.composite
def random_dags(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """A valid DAG document of n jobs whose edges only go from lower to higher index."""
    n = draw(st.integers(1, 8))
    edges = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] < e[1]),
            unique=True,
            max_size=14,
        )
    )
    out = {"storage": "object_store", "update_strategy": "replace"}
    jobs: dict[str, Any] = {}
    for i in range(n):
        ups = [a for a, b in edges if b == i]
        job: dict[str, Any] = {"operator": "noop", "outputs": [out]}
        if ups:
            job["inputs"] = [{"from": {"job": f"j{a}"}} for a in ups]
        else:
            job["triggers"] = [{"type": "manual"}]
        jobs[f"j{i}"] = job
    return {"name": "g", "jobs": jobs}, edges


def _reach(edges: list[tuple[int, int]], start: int) -> set[int]:
    seen = {start}
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if a in seen and b not in seen:
                seen.add(b)
                changed = True
    return seen


@settings(max_examples=150, suppress_health_check=[HealthCheck.filter_too_much])
@given(random_dags(), st.data())
def test_affected_jobs_is_the_edited_job_and_its_downstream(
    drawn: tuple[dict[str, Any], list[tuple[int, int]]], data: st.DataObject
) -> None:
    doc, edges = drawn
    assert dag.validate(doc, operators=OPERATORS) == []
    edited = data.draw(st.integers(0, len(doc["jobs"]) - 1))
    new_doc = copy.deepcopy(doc)
    new_doc["jobs"][f"j{edited}"]["config"] = {"v": 2}
    old, new = dag.parse(doc), dag.parse(new_doc)
    assert dag.affected_jobs(new, dag.diff(old, new)) == {f"j{i}" for i in _reach(edges, edited)}
    order = dag.topological_order(new)
    assert all(order.index(f"j{a}") < order.index(f"j{b}") for a, b in edges)
    # an execution-only edit rebuilds nothing
    exec_doc = copy.deepcopy(doc)
    exec_doc["jobs"][f"j{edited}"]["timeout"] = 120
    assert dag.affected_jobs(new, dag.diff(old, dag.parse(exec_doc))) == set()


@settings(max_examples=150, suppress_health_check=[HealthCheck.filter_too_much])
@given(random_dags(), st.data())
def test_a_back_edge_is_reported_as_a_cycle_through_its_jobs(
    drawn: tuple[dict[str, Any], list[tuple[int, int]]], data: st.DataObject
) -> None:
    doc, edges = drawn
    if not edges:
        return
    a, b = data.draw(st.sampled_from(edges))
    doc["jobs"][f"j{a}"].setdefault("inputs", []).append({"from": {"job": f"j{b}"}})
    doc["jobs"][f"j{a}"].pop("triggers", None)
    cycles = [p for p in dag.validate(doc) if p.message.startswith("cycle: ")]
    assert len(cycles) == 1
    names = cycles[0].message.removeprefix("cycle: ").split(" -> ")
    assert names[0] == names[-1] and {f"j{a}", f"j{b}"} <= set(names)
    for x, y in itertools.pairwise(names):  # each step is a real edge x -> y
        producers = [i["from"]["job"] for i in doc["jobs"][y].get("inputs", [])]
        assert x in producers
    with pytest.raises(errors.ValidationFailed):
        dag.topological_order(dag.parse(doc))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.floats(),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(["name", "jobs", "a", "operator", "inputs", "from", "job", "where",
                         "outputs", "storage", "publish", "worker_pools", "triggers", "type"]),
        inner,
        max_size=4,
    ),
    max_leaves=25,
)  # fmt: skip


@settings(max_examples=300)
@given(json_values)
def test_validate_never_raises(doc: Any) -> None:
    problems = dag.validate(doc, operators=OPERATORS, datasets=REGISTRY)
    assert all(isinstance(p, dag.Problem) for p in problems)
    if not problems:
        dag.parse(doc)


# --- cron and durations --------------------------------------------------------------------------

cron_items = st.one_of(
    st.just("*"),
    st.builds(lambda s: f"*/{s}", st.integers(0, 70)),
    st.builds(str, st.integers(0, 70)),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 70), st.integers(0, 70)),
    st.builds(lambda a, b, s: f"{a}-{b}/{s}", st.integers(0, 40), st.integers(0, 70),
              st.integers(1, 20)),
    st.sampled_from(["jan", "dec", "mon", "sun", "fri-sat", "xyz"]),
)  # fmt: skip
cron_fields = st.lists(cron_items, min_size=1, max_size=3).map(",".join)


@settings(max_examples=400)
@given(st.lists(cron_fields, min_size=5, max_size=5).map(" ".join))
def test_every_cron_expression_accepted_is_accepted_by_croniter(expr: str) -> None:
    if dag.cron_problem(expr) is None:
        assert croniter.is_valid(expr), expr


@pytest.mark.parametrize(
    "expr",
    ["* * * * *", "*/15 0-6 1,15 jan-mar mon-fri", "0 0 * * 7", "@hourly", "5 4 * * sun",
     "0 12 1-31/2 * *"],
)  # fmt: skip
def test_cron_accepts(expr: str) -> None:
    assert dag.cron_problem(expr) is None
    assert croniter.is_valid(expr)


@pytest.mark.parametrize(
    "expr",
    ["* * * *", "* * * * * *", "61 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *",
     "* * * * 8", "*/0 * * * *", "5/2 * * * *", "10-5 * * * *", "@every", "a b c d e"],
)  # fmt: skip
def test_cron_refuses(expr: str) -> None:
    assert dag.cron_problem(expr) is not None


def test_durations() -> None:
    assert [dag.duration_s(v) for v in (90, "90s", "15m", "2h", "1d", True, "x", 1.5)] == [
        90,
        90,
        900,
        7200,
        None,
        None,
        None,
        None,
    ]


def test_the_specs_complete_example_is_valid() -> None:
    doc = (ROOT / "docs" / "specs" / "dag.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", doc, re.S)
    assert example is not None
    assert dag_files.check_text(example.group(1)) == []
    jsonschema.validate(
        yaml.safe_load(example.group(1)),
        dag_files.json_schema(),
        cls=jsonschema.Draft202012Validator,
    )


def test_a_file_without_a_valid_name_still_gets_the_graph_rules() -> None:
    text = "jobs:\n  a: {operator: nope, triggers: [{type: manual}]}\n"
    problems = dag_files.check_text(text, operators=OPERATORS)
    assert [p.path for p in problems] == ["name", "jobs.a.operator"]


def test_a_malformed_pool_is_reported_once() -> None:
    text = dag_text(INGEST, reader(", worker_pool: rpc"), extra="worker_pools: {rpc: []}\n")
    problems = dag_files.check_text(text, operators=OPERATORS)
    assert [p.path for p in problems] == ["worker_pools.rpc"]


# --- back to a document --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), _valid_docs(), ids=[n for n, _ in _valid_docs()])
def test_to_doc_round_trips_and_stays_valid(name: str, text: str) -> None:
    parsed = dag.parse(yaml.safe_load(text))
    doc = dag.to_doc(parsed)
    assert dag.parse(doc) == parsed
    assert dag.parse(yaml.safe_load(yaml.safe_dump(doc))) == parsed
    jsonschema.validate(doc, dag_files.json_schema(), cls=jsonschema.Draft202012Validator)
    assert dag.digest(dag.parse(doc)) == dag.digest(parsed)


@settings(max_examples=100, suppress_health_check=[HealthCheck.filter_too_much])
@given(random_dags())
def test_to_doc_round_trips_random_dags(
    drawn: tuple[dict[str, Any], list[tuple[int, int]]],
) -> None:
    parsed = dag.parse(drawn[0])
    assert dag.parse(dag.to_doc(parsed)) == parsed


def test_digest_ignores_spelling_and_sees_meaning() -> None:
    flow = dag_text(INGEST, reader(", timeout: 60"))
    block = (
        "jobs:\n"
        "  b:\n"
        "    inputs:\n"
        "      - from: {job: ingest}\n"
        "    operator: noop\n"
        "    max_attempts: 5\n"
        "  " + INGEST + "\n"
        "name: d  # the same DAG, written differently\n"
    )
    a, b = dag.parse(yaml.safe_load(flow)), dag.parse(yaml.safe_load(block))
    assert dag.digest(a) == dag.digest(b)
    changed = dag.parse(yaml.safe_load(dag_text(INGEST, reader(", timeout: 61"))))
    assert dag.digest(changed) != dag.digest(a)
    assert re.fullmatch(r"[0-9a-f]{64}", dag.digest(a))


def test_problems_are_bounded_in_number_and_size() -> None:
    huge = "k" * 100_000
    doc: dict[str, Any] = {huge: 1, "name": "d", "jobs": {"a": {"operator": "noop"}}}
    doc.update({f"x{i}": i for i in range(2000)})
    problems = dag.validate(doc)
    assert len(problems) == dag.MAX_PROBLEMS
    # 2001 unknown keys + the job without a trigger
    assert problems[-1].message == f"{2002 - (dag.MAX_PROBLEMS - 1)} more problems not shown"
    assert len(problems[0].path) == dag.MAX_PATH and len(problems[0].message) < 120
    assert dag.cron_problem("* " * 1000) == "a cron expression is at most 200 characters"


def test_alias_bombs_and_deep_nesting_are_refused_not_expanded() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)
    ]
    bomb = "name: d\njobs:\n  j:\n    operator: noop\n    config:\n" + "".join(
        f"      {line}\n" for line in levels
    )
    problems = dag_files.check_text(bomb)
    assert [p.message for p in problems] == [
        f"the file expands to more than {dag_files.MAX_VALUES} values (YAML aliases?)"
    ]
    deep = "name: d\njobs: " + "[" * 5000 + "]" * 5000 + "\n"
    assert [p.message for p in dag_files.check_text(deep)] == ["the file nests too deeply"]


def test_many_repeated_keys_are_each_reported() -> None:
    text = "name: d\njobs:\n  a: {operator: noop, triggers: [{type: manual}]}\n" + "name: d\n" * 3
    problems = dag_files.check_text(text)
    assert [(p.path, p.line) for p in problems] == [("name", 4), ("name", 5), ("name", 6)]


def test_validate_survives_deep_nesting() -> None:
    deep: list[Any] = []
    for _ in range(20_000):
        deep = [deep]
    doc = {"name": "d", "jobs": {"a": {"operator": "noop", "config": {"x": deep}}}}
    assert [p.message for p in dag.validate(doc)] == ["the document nests too deeply"]
    with pytest.raises(errors.ValidationFailed, match="nests too deeply"):
        dag.parse(doc)
