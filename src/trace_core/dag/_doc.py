"""A ``Dag`` back to its plain document (defaults written out), and its canonical digest."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, assert_never

from trace_core.dag._records import Dag, Input, Job, JobRef, Output, Slot, Trigger, TriggerType


def to_doc(dag: Dag) -> dict[str, Any]:
    """The plain document of ``dag`` in the file format, defaults written out.

    ``parse(to_doc(d)) == d`` for every parsed ``d``: what a deploy stores and reads back.
    """
    doc: dict[str, Any] = {"name": dag.name}
    if dag.description:
        doc["description"] = dag.description
    doc["jobs"] = {name: _job_doc(job) for name, job in dag.jobs.items()}
    if dag.publish:
        doc["publish"] = [
            {"job": p.job, "output": p.output, "dataset": p.dataset} for p in dag.publish
        ]
    if dag.worker_pools:
        doc["worker_pools"] = {
            name: [_slot_doc(slot) for slot in slots] for name, slots in dag.worker_pools.items()
        }
    return doc


def _slot_doc(slot: Slot) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if slot.env:
        out["env"] = dict(slot.env)
    if slot.secret_env:
        out["secret_env"] = dict(slot.secret_env)
    return out


def _job_doc(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": job.operator, "runtime": job.runtime.value}
    if job.description:
        out["description"] = job.description
    if job.config:
        out["config"] = copy.deepcopy(dict(job.config))
    if job.inputs:
        out["inputs"] = [_input_doc(i) for i in job.inputs]
    if job.outputs:
        out["outputs"] = [_output_doc(o) for o in job.outputs]
    if job.worker_pool is not None:
        out["worker_pool"] = job.worker_pool
    if job.scaling.max_concurrency is not None:
        out["scaling"] = {"max_concurrency": job.scaling.max_concurrency}
    out["timeout"] = job.timeout_s
    out["max_attempts"] = job.max_attempts
    if job.triggers:
        out["triggers"] = [_trigger_doc(t) for t in job.triggers]
    return out


def _input_doc(inp: Input) -> dict[str, Any]:
    source = inp.source
    out: dict[str, Any] = {
        "from": {"job": source.job, "output": source.output}
        if isinstance(source, JobRef)
        else {"dataset": source.dataset}
    }
    if inp.where:
        where: dict[str, dict[str, Any]] = {}
        for c in inp.where:
            value = list(c.value) if isinstance(c.value, tuple) else c.value
            where.setdefault(c.field, {})[c.op] = value
        out["where"] = where
    return out


def _output_doc(out: Output) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "storage": out.storage.value,
        "update_strategy": out.update_strategy.value,
    }
    if out.unique_key:
        doc["unique_key"] = list(out.unique_key)
    if out.schema:
        doc["schema"] = dict(out.schema)
    if out.buffered:
        doc["buffered"] = True
    if out.multi_writer:
        doc["multi_writer"] = True
    return doc


def _trigger_doc(t: Trigger) -> dict[str, Any]:
    match t.type:
        case TriggerType.MANUAL:
            return {"type": t.type.value}
        case TriggerType.CRON:
            return {"type": t.type.value, "schedule": t.schedule}
        case TriggerType.INTERVAL:
            return {"type": t.type.value, "every": t.every_s}
        case _:
            assert_never(t.type)


def digest(dag: Dag) -> str:
    """sha256 (hex) of ``to_doc(dag)`` as canonical JSON: equal for files that parse to the same
    ``Dag`` (key order, comments, defaults spelled out or not)."""
    text = json.dumps(to_doc(dag), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
