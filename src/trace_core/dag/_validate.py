"""Validation entry points: ``validate`` (every problem) and ``parse`` (the records or a
``ValidationFailed``), with the graph rules checked on whatever parsed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import attrs

from trace_core import errors, udf
from trace_core.dag._graph import cycles
from trace_core.dag._reader import Reader
from trace_core.dag._records import (
    MAX_PROBLEMS,
    NUMERIC_TYPES,
    ORDERING_OPERATORS,
    TEXT_TYPES,
    Condition,
    Dag,
    DatasetFacts,
    JobRef,
    OperatorInfo,
    Output,
    Problem,
    Publish,
    Runtime,
)
from trace_core.dag._words import close_hint, show


def graph_problems(
    dag: Dag,
    operators: Mapping[str, OperatorInfo] | None,
    datasets: Mapping[str, DatasetFacts] | None,
    broken: Reader,
) -> Iterator[Problem]:
    """The graph rules on what parsed; references to jobs and pools present in the file but
    not parsed (already reported, ``broken``) are skipped."""
    published = {p.dataset for p in dag.publish}
    for job in dag.jobs.values():
        path = f"jobs.{job.name}"
        if job.runtime is Runtime.LAMBDA and "bundle" in job.config:  # a UDF bundle
            try:
                udf.parse_ref(job.config.get("bundle"), f"{path}.config.bundle")
            except errors.ValidationFailed as exc:
                yield Problem(
                    exc.field or f"{path}.config.bundle",
                    exc.message,
                    "config.bundle: {name, digest} as printed by trace udf deploy",
                )
        elif operators is not None and job.operator not in operators:
            yield Problem(
                f"{path}.operator",
                f"unknown operator {show(job.operator)}",
                close_hint(job.operator, operators)
                or f"available: {', '.join(sorted(operators)) or 'none'}",
            )
        if (
            job.worker_pool is not None
            and job.worker_pool not in dag.worker_pools
            and job.worker_pool not in broken.broken_pools
        ):
            yield Problem(
                f"{path}.worker_pool",
                f"no worker pool named {show(job.worker_pool)}",
                close_hint(job.worker_pool, dag.worker_pools) or "declare it under worker_pools",
            )
        if job.is_source and not job.triggers:
            yield Problem(
                f"{path}.triggers",
                "a job without inputs needs a trigger: nothing else would run it",
                "add triggers: [{type: manual}] (or cron / interval)",
            )
        if not job.is_source and job.triggers:
            yield Problem(
                f"{path}.triggers",
                "only source jobs (no inputs) take triggers: this job runs on its inputs' events",
                "remove triggers, or move them to the source job",
            )
        for i, inp in enumerate(job.inputs):
            ipath = f"{path}.inputs[{i}]"
            columns: Mapping[str, str] | None = None
            checkable = True
            if isinstance(inp.source, JobRef):
                ref = inp.source
                producer = dag.jobs.get(ref.job)
                if producer is None:
                    if ref.job in broken.broken_jobs:
                        continue
                    yield Problem(
                        f"{ipath}.from.job",
                        f"no job named {show(ref.job)}",
                        close_hint(ref.job, dag.jobs) or "name a job of this DAG",
                    )
                    continue
                if ref.output >= len(producer.outputs):
                    yield Problem(
                        f"{ipath}.from.output",
                        f"job {show(ref.job)} has {len(producer.outputs)} output(s); "
                        f"index {ref.output} does not exist",
                        "outputs are numbered from 0",
                    )
                    continue
                columns = producer.outputs[ref.output].schema
                where_hint = f"declare jobs.{ref.job}.outputs[{ref.output}].schema"
            else:
                name = inp.source.dataset
                where_hint = f"dataset {show(name)} declares no schema"
                if name in published:
                    yield Problem(
                        f"{ipath}.from.dataset",
                        f"dataset {show(name)} is published by this DAG",
                        "wire it by index: from: {job, output}",
                    )
                    continue
                if datasets is not None:
                    facts = datasets.get(name)
                    if facts is None:
                        yield Problem(
                            f"{ipath}.from.dataset",
                            f"no dataset named {show(name)} in this org",
                            close_hint(name, datasets) or "publish it from its DAG first",
                        )
                        continue
                    columns = facts.schema
                else:
                    checkable = False  # offline: the registry checks at deploy
            if inp.where and checkable:
                yield from where_problems(inp.where, columns or {}, f"{ipath}.where", where_hint)
    for c in cycles(dag):
        yield Problem(
            f"jobs.{c[0]}.inputs",
            "cycle: " + " -> ".join(c),
            "a DAG has no cycles: break one of these inputs",
        )
    seen: dict[str, Publish] = {}
    for i, p in enumerate(dag.publish):
        ppath = f"publish[{i}]"
        pub_job = dag.jobs.get(p.job)
        if pub_job is None:
            if p.job in broken.broken_jobs:
                continue
            yield Problem(
                f"{ppath}.job", f"no job named {show(p.job)}", close_hint(p.job, dag.jobs)
            )
            continue
        if p.output >= len(pub_job.outputs):
            yield Problem(
                f"{ppath}.output",
                f"job {show(p.job)} has {len(pub_job.outputs)} output(s); index {p.output} does not exist",
                "outputs are numbered from 0",
            )
            continue
        out = pub_job.outputs[p.output]
        if (first := seen.get(p.dataset)) is not None:
            first_out = dag.jobs[first.job].outputs[first.output]
            if (first.job, first.output) == (p.job, p.output):
                yield Problem(f"{ppath}.dataset", f"{show(p.dataset)} is published twice")
            elif not (out.multi_writer and first_out.multi_writer):
                yield Problem(
                    f"{ppath}.dataset",
                    f"dataset {show(p.dataset)} is already published by "
                    f"{first.job}.outputs[{first.output}]",
                    "one output per dataset, unless every writer is a buffered multi_writer output",
                )
        else:
            seen[p.dataset] = p
        facts = datasets.get(p.dataset) if datasets is not None else None
        if (problem := registry_problem(dag.name, i, p, out, facts)) is not None:
            yield problem


def registry_problem(
    dag_name: str, index: int, pub: Publish, out: Output, facts: DatasetFacts | None
) -> Problem | None:
    """Whether DAG ``dag_name`` may publish output ``out`` as ``publish[index]`` (``pub``), given
    what the registry knows of the dataset (``facts``; None: a new name); None when it may.

    A dataset has one owning DAG (the first to register it). Another DAG may also write it only
    when the dataset and its output are both buffered ``multi_writer`` outputs with the same
    schema and unique_key (it is registered as a writer, ADR 0037); while other DAGs write it, the
    owner keeps it ``multi_writer`` and keeps its schema and unique_key. Deploy checks this twice:
    in ``validate`` with the registry, and under the registry rows' locks
    (``trace_lite.dag_registry``)."""
    if facts is None or facts.producer_dag is None:
        return None
    name = show(pub.dataset)
    opath = f"jobs.{pub.job}.outputs[{pub.output}]"
    if facts.producer_dag != dag_name:
        owner = show(facts.producer_dag)
        if not (facts.multi_writer and out.multi_writer):
            return Problem(
                f"publish[{index}].dataset",
                f"dataset {name} is produced by DAG {owner}: a dataset has one producing DAG"
                + ("" if facts.multi_writer else " (it is not multi_writer there)"),
                f"declare {opath} multi_writer: true (buffered append), as DAG {owner} does"
                if facts.multi_writer
                else "publish under another name, or read it with from: {dataset: ...}",
            )
        mismatch = _shape_mismatch(out, facts)
        if mismatch is None:
            return None
        return Problem(
            f"{opath}.{mismatch}",
            f"dataset {name} is written by DAG {owner} with another {mismatch}: every writer "
            "of a multi_writer dataset declares the same schema and unique_key",
            f"copy the {mismatch} of the output DAG {owner} publishes",
        )
    others = sorted(facts.writer_dags - {dag_name})
    if not others:
        return None
    writers = ", ".join(show(w) for w in others)
    hint = "remove it from their publish lists first"
    if not out.multi_writer:
        return Problem(
            f"{opath}.multi_writer",
            f"dataset {name} is also written by DAG(s) {writers}: it stays multi_writer while "
            "they write it",
            hint,
        )
    if (mismatch := _shape_mismatch(out, facts)) is not None:
        return Problem(
            f"{opath}.{mismatch}",
            f"dataset {name} is also written by DAG(s) {writers}: its {mismatch} cannot change "
            "while they write it",
            hint,
        )
    return None


def _shape_mismatch(out: Output, facts: DatasetFacts) -> str | None:
    """``"schema"`` or ``"unique_key"`` when ``out`` declares another one than the registry's
    (an unknown one is not compared); None when they match."""
    if facts.schema is not None and dict(out.schema) != dict(facts.schema):
        return "schema"
    if facts.unique_key is not None and tuple(out.unique_key) != tuple(facts.unique_key):
        return "unique_key"
    return None


def where_problems(
    where: Sequence[Condition], columns: Mapping[str, str], path: str, hint: str
) -> Iterator[Problem]:
    if not columns:
        yield Problem(path, "where needs the input's schema to check its fields", hint)
        return
    for cond in where:
        cpath = f"{path}.{cond.field}.{cond.op}"
        typ = columns.get(cond.field)
        if typ is None:
            yield Problem(
                f"{path}.{cond.field}",
                f"the input has no column {show(cond.field)}",
                close_hint(cond.field, columns) or f"columns: {', '.join(columns)}",
            )
            continue
        if typ == "json" and cond.op != "is_null":
            yield Problem(cpath, "a json column can only be tested with is_null")
            continue
        if cond.op in ORDERING_OPERATORS and typ == "bool":
            yield Problem(cpath, f"{cond.op} does not apply to a bool column", "use eq")
            continue
        values = cond.value if isinstance(cond.value, tuple) else (cond.value,)
        if cond.op != "is_null" and not all(fits(v, typ) for v in values):
            yield Problem(
                cpath, f"column {show(cond.field)} is {typ}: {show(cond.value)} does not fit"
            )


def fits(value: object, typ: str) -> bool:
    if typ == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if typ in NUMERIC_TYPES:
        return isinstance(value, int | float) or (
            typ in ("uint256", "decimal") and isinstance(value, str)
        )
    return typ in TEXT_TYPES and isinstance(value, str)


# --- public entry points -------------------------------------------------------------------------


def validate(
    doc: object,
    *,
    operators: Mapping[str, OperatorInfo] | None = None,
    datasets: Mapping[str, DatasetFacts] | None = None,
) -> list[Problem]:
    """Every problem of the DAG document ``doc`` (a plain mapping); empty when it is valid.

    ``operators``: the operators available (None: not checked). ``datasets``: the org's
    registry (None: offline -- ``from: {dataset}`` names and the single-producer rule are
    checked at deploy, against the registry). Never raises.
    """
    reader = Reader()
    try:
        dag = reader.dag(doc)
        problems = list(reader.problems)
        if dag is not None:
            problems.extend(graph_problems(dag, operators, datasets, reader))
    except RecursionError:
        return [Problem("", "the document nests too deeply")]
    return cap_problems(problems)


def cap_problems(problems: list[Problem]) -> list[Problem]:
    """``problems`` cut to ``MAX_PROBLEMS``, the last one saying how many more there were."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - (MAX_PROBLEMS - 1)
    return [*problems[: MAX_PROBLEMS - 1], Problem("", f"{more} more problems not shown")]


def parse(doc: object) -> Dag:
    """The ``Dag`` record of a structurally valid document.

    Raises ``ValidationFailed`` (``field`` = the first problem's path, ``details.problems`` =
    all of them) when the document has structural problems. Operators and datasets are not
    checked: call ``validate`` for those.
    """
    reader = Reader()
    try:
        dag = reader.dag(doc)
    except RecursionError:
        raise errors.ValidationFailed("the document nests too deeply", field="") from None
    if reader.problems or dag is None:
        first = reader.problems[0] if reader.problems else Problem("", "not a DAG")
        raise errors.ValidationFailed(
            f"{first.path or '<top>'}: {first.message}",
            field=first.path,
            details={"problems": [attrs.asdict(p) for p in cap_problems(reader.problems)]},
        )
    return dag
