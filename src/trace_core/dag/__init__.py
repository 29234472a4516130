"""The DAG spec: records, validation that reports every problem at once, and the diff.

A DAG file (``docs/specs/dag.md``) is a mapping of jobs wired by index: each job names an
``operator``, reads ``inputs`` (``from: {job, output}`` inside the DAG, or ``from: {dataset}``
for another DAG's published dataset, optionally filtered by a structured ``where`` map) and
declares ``outputs`` (storage, ``update_strategy``, ``unique_key``, ``schema``). A top-level
``publish`` list names outputs as datasets (metadata only); ``worker_pools`` are named arrays
of slots, each with its ``env`` and ``secret_env`` (secret names in the org's namespace).

Theory of operation:

* ``validate(doc, operators=..., datasets=...)`` walks the plain document (what a YAML or JSON
  loader returns) and returns *every* ``Problem`` found, each with a dotted path
  (``jobs.decode.inputs[0].from.job``), a message and a hint. Nothing raises on bad input.
  Structural problems (unknown keys, wrong types, bad values) come first, in document order;
  then the graph rules (references, cycles, publish, operators, datasets), checked on whatever
  parsed. A value that failed to parse is left out of the graph rules, so one mistake is
  reported once.
* ``parse(doc)`` returns the ``Dag`` record, or raises ``ValidationFailed`` naming the first
  structural problem; it does not check operators or the registry.
* ``to_doc(dag)`` writes a ``Dag`` back as a plain document with the defaults spelled out
  (``parse(to_doc(d)) == d``); ``digest(dag)`` hashes that canonically, so two files that mean
  the same DAG have the same digest.
* ``diff(old, new)`` lists ``Change``s, each classified by ``CHANGE_KINDS`` (a table, also in
  the docs): materialization-affecting changes rebuild the job and its transitive downstream
  (``affected_jobs``); execution-only and metadata changes rebuild nothing.

Modules: ``_records`` (constants, enums, records), ``_reader`` (the structural reader) over
``_values`` (plain values read, problems collected), ``_graph`` (consumers, cycles,
downstream), ``_validate`` (``validate``, ``parse``), ``_doc`` (``to_doc``, ``digest``),
``_diff`` (``diff``, ``affected_jobs``), ``_where`` (``where`` on an event:
``event_matches``), ``_words`` (small helpers).
The package is pure: no I/O, no clock, no YAML. Dataset and DAG names follow the registry's
rule (``trace_core.wire``); secret names follow ``trace_core.secret_names``; cron syntax is
``trace_core.cron``.
"""

from __future__ import annotations

from trace_core.cron import cron_problem
from trace_core.dag._diff import CHANGE_KINDS, Change, ChangeKind, affected_jobs, diff
from trace_core.dag._doc import digest, to_doc
from trace_core.dag._graph import consumers, cycles, downstream, topological_order
from trace_core.dag._records import (
    COLUMN_RE,
    COLUMN_TYPES,
    DAG_KEYS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    ENV_RE,
    INPUT_KEYS,
    JOB_KEYS,
    MAX_ATTEMPTS_LIMIT,
    MAX_CONCURRENCY_LIMIT,
    MAX_IN_VALUES,
    MAX_JOBS,
    MAX_PATH,
    MAX_PROBLEMS,
    MAX_SLOTS,
    MAX_TIMEOUT_S,
    NAME_RE,
    OUTPUT_KEYS,
    PUBLISH_KEYS,
    RESERVED_ENV_PREFIX,
    SCALING_KEYS,
    SLOT_KEYS,
    TRIGGER_KEYS,
    WHERE_OPERATORS,
    Condition,
    Dag,
    DatasetFacts,
    DatasetRef,
    Input,
    Job,
    JobRef,
    OperatorInfo,
    Output,
    Problem,
    Publish,
    Runtime,
    Scaling,
    Slot,
    Storage,
    Trigger,
    TriggerType,
    UpdateStrategy,
)
from trace_core.dag._validate import cap_problems, parse, registry_problem, validate
from trace_core.dag._where import event_matches, where_conditions
from trace_core.dag._words import duration_s

__all__ = [
    "CHANGE_KINDS",
    "COLUMN_RE",
    "COLUMN_TYPES",
    "DAG_KEYS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_S",
    "ENV_RE",
    "INPUT_KEYS",
    "JOB_KEYS",
    "MAX_ATTEMPTS_LIMIT",
    "MAX_CONCURRENCY_LIMIT",
    "MAX_IN_VALUES",
    "MAX_JOBS",
    "MAX_PATH",
    "MAX_PROBLEMS",
    "MAX_SLOTS",
    "MAX_TIMEOUT_S",
    "NAME_RE",
    "OUTPUT_KEYS",
    "PUBLISH_KEYS",
    "RESERVED_ENV_PREFIX",
    "SCALING_KEYS",
    "SLOT_KEYS",
    "TRIGGER_KEYS",
    "WHERE_OPERATORS",
    "Change",
    "ChangeKind",
    "Condition",
    "Dag",
    "DatasetFacts",
    "DatasetRef",
    "Input",
    "Job",
    "JobRef",
    "OperatorInfo",
    "Output",
    "Problem",
    "Publish",
    "Runtime",
    "Scaling",
    "Slot",
    "Storage",
    "Trigger",
    "TriggerType",
    "UpdateStrategy",
    "affected_jobs",
    "cap_problems",
    "consumers",
    "cron_problem",
    "cycles",
    "diff",
    "digest",
    "downstream",
    "duration_s",
    "event_matches",
    "parse",
    "registry_problem",
    "to_doc",
    "topological_order",
    "validate",
    "where_conditions",
]
