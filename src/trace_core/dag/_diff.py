"""The diff of two DAG versions, each change classified by ``CHANGE_KINDS``."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import attrs
import cattrs

from trace_core.dag._graph import downstream
from trace_core.dag._records import Dag, Job, Output


class ChangeKind(enum.StrEnum):
    #: Rebuilds the job and its transitive downstream with new dataset versions.
    MATERIALIZATION = "materialization"
    #: How or when the job runs; data already built stays valid.
    EXECUTION = "execution"
    #: Names and descriptions only (publishing is metadata-only).
    METADATA = "metadata"


#: How each job field's change is classified (``docs/specs/dag.md`` prints this table).
CHANGE_KINDS: Final[Mapping[str, ChangeKind]] = {
    "operator": ChangeKind.MATERIALIZATION,
    "config": ChangeKind.MATERIALIZATION,
    "inputs": ChangeKind.MATERIALIZATION,
    "inputs[].from": ChangeKind.MATERIALIZATION,
    "inputs[].where": ChangeKind.MATERIALIZATION,
    "outputs": ChangeKind.MATERIALIZATION,
    "outputs[].storage": ChangeKind.MATERIALIZATION,
    "outputs[].update_strategy": ChangeKind.MATERIALIZATION,
    "outputs[].unique_key": ChangeKind.MATERIALIZATION,
    "outputs[].schema": ChangeKind.MATERIALIZATION,
    "outputs[].buffered": ChangeKind.MATERIALIZATION,
    "outputs[].multi_writer": ChangeKind.MATERIALIZATION,
    "job added": ChangeKind.MATERIALIZATION,
    "job removed": ChangeKind.MATERIALIZATION,
    "runtime": ChangeKind.EXECUTION,
    "worker_pool": ChangeKind.EXECUTION,
    "scaling.max_concurrency": ChangeKind.EXECUTION,
    "timeout": ChangeKind.EXECUTION,
    "max_attempts": ChangeKind.EXECUTION,
    "triggers": ChangeKind.EXECUTION,
    "worker_pools.{pool}": ChangeKind.EXECUTION,
    "description": ChangeKind.METADATA,
    "publish": ChangeKind.METADATA,
    "name": ChangeKind.METADATA,
}


@attrs.frozen
class Change:
    """One difference between two versions of a DAG."""

    #: Dotted path in the new file's terms: ``jobs.decode.inputs[0].where``.
    path: str
    kind: ChangeKind
    #: The job it belongs to (None for DAG-level changes).
    job: str | None
    #: Plain (JSON-ready) old and new values; None where absent.
    old: Any = None
    new: Any = None


_plain = cattrs.Converter()


def _value(x: object) -> Any:
    return _plain.unstructure(x)


def _job_changes(name: str, old: Job, new: Job) -> Iterator[Change]:
    path = f"jobs.{name}"

    def change(rule: str, sub: str, a: object, b: object) -> Iterator[Change]:
        if a != b:
            yield Change(f"{path}.{sub}", CHANGE_KINDS[rule], name, _value(a), _value(b))

    yield from change("operator", "operator", old.operator, new.operator)
    yield from change("config", "config", old.config, new.config)
    if len(old.inputs) != len(new.inputs):
        yield from change("inputs", "inputs", old.inputs, new.inputs)
    else:
        for i, (a, b) in enumerate(zip(old.inputs, new.inputs, strict=True)):
            yield from change("inputs[].from", f"inputs[{i}].from", a.source, b.source)
            yield from change("inputs[].where", f"inputs[{i}].where", a.where, b.where)
    if len(old.outputs) != len(new.outputs):
        yield from change("outputs", "outputs", old.outputs, new.outputs)
    else:
        for i, (oa, ob) in enumerate(zip(old.outputs, new.outputs, strict=True)):
            for field in attrs.fields(Output):
                yield from change(
                    f"outputs[].{field.name}",
                    f"outputs[{i}].{field.name}",
                    getattr(oa, field.name),
                    getattr(ob, field.name),
                )
    yield from change("runtime", "runtime", old.runtime, new.runtime)
    yield from change("worker_pool", "worker_pool", old.worker_pool, new.worker_pool)
    yield from change(
        "scaling.max_concurrency",
        "scaling.max_concurrency",
        old.scaling.max_concurrency,
        new.scaling.max_concurrency,
    )
    yield from change("timeout", "timeout", old.timeout_s, new.timeout_s)
    yield from change("max_attempts", "max_attempts", old.max_attempts, new.max_attempts)
    yield from change("triggers", "triggers", old.triggers, new.triggers)
    yield from change("description", "description", old.description, new.description)


def diff(old: Dag, new: Dag) -> list[Change]:
    """What changed from ``old`` to ``new``, each change classified by ``CHANGE_KINDS``.

    Jobs are matched by name (a renamed job is one removed and one added); inputs and outputs by
    index. ``scaling.mode`` is ignored, so changing it is no change. Never raises.
    """
    out: list[Change] = []
    if old.name != new.name:
        out.append(Change("name", ChangeKind.METADATA, None, old.name, new.name))
    if old.description != new.description:
        out.append(
            Change("description", ChangeKind.METADATA, None, old.description, new.description)
        )
    for name in old.jobs.keys() - new.jobs.keys():
        out.append(
            Change(f"jobs.{name}", CHANGE_KINDS["job removed"], name, _value(old.jobs[name]), None)
        )
    for name, job in new.jobs.items():
        if name not in old.jobs:
            out.append(Change(f"jobs.{name}", CHANGE_KINDS["job added"], name, None, _value(job)))
        else:
            out.extend(_job_changes(name, old.jobs[name], job))
    old_pub = {(p.dataset, p.job, p.output) for p in old.publish}
    new_pub = {(p.dataset, p.job, p.output) for p in new.publish}
    for dataset, pjob, output in sorted(old_pub - new_pub):
        out.append(
            Change(
                f"publish.{dataset}",
                ChangeKind.METADATA,
                None,
                {"job": pjob, "output": output},
                None,
            )
        )
    for dataset, pjob, output in sorted(new_pub - old_pub):
        out.append(
            Change(
                f"publish.{dataset}",
                ChangeKind.METADATA,
                None,
                None,
                {"job": pjob, "output": output},
            )
        )
    for pool in sorted(old.worker_pools.keys() | new.worker_pools.keys()):
        a, b = old.worker_pools.get(pool), new.worker_pools.get(pool)
        if a != b:
            out.append(
                Change(
                    f"worker_pools.{pool}",
                    CHANGE_KINDS["worker_pools.{pool}"],
                    None,
                    _value(a),
                    _value(b),
                )
            )
    return sorted(out, key=lambda c: (c.path.startswith("jobs.") is False, c.path))


def affected_jobs(dag: Dag, changes: Iterable[Change]) -> set[str]:
    """The jobs of ``dag`` to rebuild for ``changes``: every job with a materialization-affecting
    change and their transitive downstream. Jobs no longer in ``dag`` are left out."""
    edited = {c.job for c in changes if c.kind is ChangeKind.MATERIALIZATION and c.job is not None}
    return downstream(dag, edited)
