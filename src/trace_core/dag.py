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

The module is pure: no I/O, no clock, no YAML. Dataset and DAG names follow the registry's
rule (``trace_core.wire``); secret names follow ``trace_core.secret_names``; cron syntax is
``trace_core.cron``.
"""

from __future__ import annotations

import copy
import difflib
import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, assert_never

import attrs
import cattrs

from trace_core import errors, secret_names, wire
from trace_core.cron import cron_problem

#: Dataset, DAG, job and pool names: the registry's dataset-name rule.
NAME_RE: Final = wire._DATASET_RE
#: Column names of an output's schema.
COLUMN_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: Environment variable names of a worker-pool slot.
ENV_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Env names reserved for the platform (the worker's own settings and credential).
RESERVED_ENV_PREFIX: Final = "TRACE_"
#: The longest attempt timeout: Lambda's limit, and the capability token's TTL bound.
MAX_TIMEOUT_S: Final = 900
DEFAULT_TIMEOUT_S: Final = 60
DEFAULT_MAX_ATTEMPTS: Final = 5
MAX_ATTEMPTS_LIMIT: Final = 25
MAX_CONCURRENCY_LIMIT: Final = 10_000
MAX_SLOTS: Final = 1_000
MAX_IN_VALUES: Final = 1_000
MAX_JOBS: Final = 1_000
#: At most this many problems are listed (the last one says how many more there were).
MAX_PROBLEMS: Final = 500
MAX_PATH: Final = 300


class Runtime(enum.StrEnum):
    WORKER = "worker"
    LAMBDA = "lambda"


class Storage(enum.StrEnum):
    OBJECT_STORE = "object_store"
    POSTGRES_TABLE = "postgres_table"


class UpdateStrategy(enum.StrEnum):
    REPLACE = "replace"
    APPEND = "append"


class TriggerType(enum.StrEnum):
    MANUAL = "manual"
    CRON = "cron"
    INTERVAL = "interval"


#: Column types an output schema may declare.
COLUMN_TYPES: Final = frozenset(
    {
        "string",
        "bytes",
        "bool",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "uint256",
        "float64",
        "decimal",
        "timestamp",
        "date",
        "json",
    }
)
_NUMERIC = frozenset({"int32", "int64", "uint32", "uint64", "uint256", "float64", "decimal"})
_TEXT = frozenset({"string", "bytes", "timestamp", "date"})

#: ``where`` operators: the allow-list (``docs/specs/dag.md``, "where"). Fields are ANDed; values are JSON scalars.
WHERE_OPERATORS: Final = frozenset(
    {"eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "is_null"}
)
_ORDERING = frozenset({"lt", "lte", "gt", "gte"})

#: The keys each mapping of the file may hold (the JSON Schema lists the same).
DAG_KEYS: Final = frozenset({"name", "description", "jobs", "publish", "worker_pools"})
JOB_KEYS: Final = frozenset(
    {
        "description",
        "operator",
        "runtime",
        "config",
        "inputs",
        "outputs",
        "worker_pool",
        "scaling",
        "timeout",
        "max_attempts",
        "triggers",
        "execution_strategy",
    }
)
INPUT_KEYS: Final = frozenset({"from", "where"})
OUTPUT_KEYS: Final = frozenset(
    {"storage", "update_strategy", "unique_key", "schema", "buffered", "multi_writer"}
)
SCALING_KEYS: Final = frozenset({"max_concurrency", "mode"})
PUBLISH_KEYS: Final = frozenset({"job", "output", "dataset"})
SLOT_KEYS: Final = frozenset({"env", "secret_env"})
TRIGGER_KEYS: Final = {
    TriggerType.MANUAL: frozenset({"type"}),
    TriggerType.CRON: frozenset({"type", "schedule"}),
    TriggerType.INTERVAL: frozenset({"type", "every"}),
}


# --- records -----------------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """One thing wrong with a DAG file."""

    #: Dotted path of the offending value: ``jobs.decode.inputs[0].from.job``.
    path: str
    message: str
    #: What to do about it.
    hint: str = ""
    #: 1-based line in the file, when the loader knows it.
    line: int | None = None

    def render(self, source: str = "") -> str:
        """``source:line: path: message (hint: ...)``."""
        where = ""
        if source:
            where = f"{source}:{self.line}: " if self.line else f"{source}: "
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{self.path or '<top>'}: {self.message}{hint}"


@attrs.frozen
class OperatorInfo:
    """What validation knows about an operator available to the DAG's org."""

    name: str
    summary: str = ""


@attrs.frozen
class DatasetFacts:
    """What the registry knows about an existing dataset of the org."""

    name: str
    #: The name of the DAG producing it (None: no producer yet).
    producer_dag: str | None = None
    #: Declared a multi-writer buffered sink (``alert_events``): several producers may write it.
    multi_writer: bool = False
    #: Column name -> type, when declared; ``where`` on a ``from: {dataset}`` input checks it.
    schema: Mapping[str, str] | None = None


@attrs.frozen
class JobRef:
    """``from: {job, output}``: output ``output`` (0-based) of job ``job`` of this DAG."""

    job: str
    output: int = 0


@attrs.frozen
class DatasetRef:
    """``from: {dataset}``: another DAG's published dataset, by name."""

    dataset: str


@attrs.frozen
class Condition:
    """One ``where`` comparison: ``field op value``."""

    field: str
    op: str
    value: Any


@attrs.frozen
class Input:
    source: JobRef | DatasetRef
    #: Conditions, ANDed, sorted by (field, op) (empty: every event of the input).
    where: tuple[Condition, ...] = ()


@attrs.frozen
class Output:
    storage: Storage
    update_strategy: UpdateStrategy
    unique_key: tuple[str, ...] = ()
    #: Column name -> type, in declaration order.
    schema: Mapping[str, str] = attrs.field(factory=dict)
    #: Written through a buffer and the Sink (``postgres_table`` only).
    buffered: bool = False
    #: Several producers may write the dataset (buffered ``append`` sinks only).
    multi_writer: bool = False


@attrs.frozen
class Scaling:
    max_concurrency: int | None = None


@attrs.frozen
class Trigger:
    type: TriggerType
    #: Cron expression (``cron``).
    schedule: str | None = None
    #: Seconds between runs (``interval``).
    every_s: int | None = None


@attrs.frozen
class Job:
    name: str
    operator: str
    runtime: Runtime = Runtime.WORKER
    config: Mapping[str, Any] = attrs.field(factory=dict)
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    worker_pool: str | None = None
    scaling: Scaling = Scaling()
    timeout_s: int = DEFAULT_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    triggers: tuple[Trigger, ...] = ()
    description: str = ""

    @property
    def is_source(self) -> bool:
        """A source job has no inputs: only its triggers run it."""
        return not self.inputs


@attrs.frozen
class Publish:
    """``{job, output} -> dataset``: metadata only, never a rebuild."""

    job: str
    output: int
    dataset: str


@attrs.frozen
class Slot:
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Env name -> secret name relative to ``trace/org/{org_id}/``.
    secret_env: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Dag:
    name: str
    jobs: Mapping[str, Job] = attrs.field(factory=dict)
    publish: tuple[Publish, ...] = ()
    worker_pools: Mapping[str, tuple[Slot, ...]] = attrs.field(factory=dict)
    description: str = ""

    def triggers(self) -> list[tuple[str, Trigger]]:
        """Every ``(job, trigger)`` pair, in job order."""
        return [(j.name, t) for j in self.jobs.values() for t in j.triggers]


# --- small pure checks ---------------------------------------------------------------------------

_DURATION = re.compile(r"^([0-9]{1,7})(s|m|h)$")
_UNIT = {"s": 1, "m": 60, "h": 3600}


def duration_s(value: object) -> int | None:
    """Whole seconds from ``90`` or ``"90s"`` / ``"15m"`` / ``"2h"``; None if not a duration."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (m := _DURATION.match(value.strip())):
        return int(m.group(1)) * _UNIT[m.group(2)]
    return None


def _close(word: str, options: Iterable[str]) -> str:
    found = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f"did you mean {_show(found[0])}?" if found else ""


def _show(value: object) -> str:
    """``repr(value)``, cut to 80 characters: a problem never echoes a huge value back."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_problem(value: object, path: str) -> tuple[str, str] | None:
    """``(path, message)`` of the first value that is not plain JSON, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return (path, f"key {_show(k)} is not a string")
            if found := _json_problem(v, _join(path, k)):
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if found := _json_problem(v, f"{path}[{i}]"):
                return found
        return None
    return (path, f"{type(value).__name__} value is not JSON (a date? quote it)")


# --- the structural reader -----------------------------------------------------------------------


class _Reader:
    """Turns a plain document into records, collecting problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        #: Jobs that exist in the file but did not parse: references to them are not errors.
        self.broken_jobs: set[str] = set()
        #: Likewise for worker pools.
        self.broken_pools: set[str] = set()

    def problem(self, path: str, message: str, hint: str = "") -> None:
        if len(path) > MAX_PATH:  # a huge key stays in the path only as its beginning
            path = path[: MAX_PATH - 3] + "..."
        self.problems.append(Problem(path, message, hint))

    def mapping(self, value: object, path: str, what: str) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            for k in bad:
                self.problem(
                    _join(path, str(k)),
                    f"key {_show(k)} is not a string",
                    "quote it (YAML reads yes/no/on/off/numbers as other types)",
                )
            return {k: v for k, v in value.items() if isinstance(k, str)}
        self.problem(path, f"{what} must be a mapping, not {_kind(value)}")
        return None

    def keys(
        self,
        m: Mapping[str, Any],
        path: str,
        allowed: frozenset[str],
        required: Iterable[str] = (),
    ) -> None:
        for k in m:
            if k not in allowed:
                hint = _close(k, allowed) or f"allowed keys: {', '.join(sorted(allowed))}"
                self.problem(_join(path, k), f"unknown key {_show(k)}", hint)
        for k in required:
            if k not in m:
                self.problem(_join(path, k), f"{_show(k)} is required")

    def string(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.problem(path, f"must be a non-empty string, not {_kind(value)}")
        return None

    def name(self, value: object, path: str, what: str) -> str | None:
        text = self.string(value, path)
        if text is not None and not NAME_RE.match(text):
            self.problem(
                path,
                f"{what} {_show(text)} must match {NAME_RE.pattern}",
                "lower snake_case, starting with a letter, at most 128 characters",
            )
            return None
        return text

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool):
            self.problem(path, f"must be an integer, not {_kind(value)}")
            return None
        if not low <= value <= high:
            self.problem(path, f"{value} is outside {low}..{high}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        self.problem(path, f"must be true or false, not {_kind(value)}")
        return False

    def choice(self, value: object, path: str, enum_type: type[enum.StrEnum]) -> Any:
        options = [e.value for e in enum_type]
        if isinstance(value, str) and value in options:
            return enum_type(value)
        hint = _close(str(value), options) if isinstance(value, str) else ""
        self.problem(path, f"must be one of {', '.join(options)}, not {_show(value)}", hint)
        return None

    def array(self, value: object, path: str, what: str) -> list[Any] | None:
        if isinstance(value, list):
            return value
        self.problem(path, f"{what} must be a list, not {_kind(value)}")
        return None

    # -- the document --

    def dag(self, doc: object) -> Dag | None:
        top = self.mapping(doc, "", "a DAG file")
        if top is None:
            return None
        self.keys(top, "", DAG_KEYS, required=("name", "jobs"))
        name = self.name(top["name"], "name", "DAG name") if "name" in top else None
        description = self.description(top.get("description"), "description")
        pools: dict[str, tuple[Slot, ...]] = {}
        if "worker_pools" in top and (
            m := self.mapping(top["worker_pools"], "worker_pools", "worker_pools")
        ):
            for pool_name, slots in m.items():
                path = f"worker_pools.{pool_name}"
                if (
                    self.name(pool_name, path, "pool name") is not None
                    and (parsed := self.slots(slots, path)) is not None
                ):
                    pools[pool_name] = parsed
                else:
                    self.broken_pools.add(pool_name)
        jobs: dict[str, Job] = {}
        if "jobs" in top and (m := self.mapping(top["jobs"], "jobs", "jobs")) is not None:
            if not m:
                self.problem("jobs", "a DAG needs at least one job")
            if len(m) > MAX_JOBS:
                self.problem("jobs", f"at most {MAX_JOBS} jobs per DAG")
            for job_name, body in m.items():
                path = f"jobs.{job_name}"
                if self.name(job_name, path, "job name") is None:
                    continue
                if (job := self.job(job_name, body, path)) is not None:
                    jobs[job_name] = job
                else:
                    self.broken_jobs.add(job_name)
        publish: list[Publish] = []
        if (
            "publish" in top
            and (items := self.array(top["publish"], "publish", "publish")) is not None
        ):
            for i, item in enumerate(items):
                if (p := self.publish(item, f"publish[{i}]")) is not None:
                    publish.append(p)
        # A DAG without a valid name still gets the graph rules (its problems are reported).
        return Dag(
            name=name or "",
            jobs=jobs,
            publish=tuple(publish),
            worker_pools=pools,
            description=description,
        )

    def description(self, value: object, path: str) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        self.problem(path, f"must be a string, not {_kind(value)}")
        return ""

    def slots(self, value: object, path: str) -> tuple[Slot, ...] | None:
        items = self.array(value, path, "a worker pool (its slots)")
        if items is None:
            return None
        if not items:
            self.problem(path, "a worker pool needs at least one slot")
            return None
        if len(items) > MAX_SLOTS:
            self.problem(path, f"at most {MAX_SLOTS} slots per pool")
            return None
        out = []
        for i, item in enumerate(items):
            spath = f"{path}[{i}]"
            m = self.mapping(item, spath, "a slot")
            if m is None:
                continue
            self.keys(m, spath, SLOT_KEYS)
            env = self.env(m.get("env", {}), f"{spath}.env", secret=False)
            secret_env = self.env(m.get("secret_env", {}), f"{spath}.secret_env", secret=True)
            for k in sorted(env.keys() & secret_env.keys()):
                self.problem(f"{spath}.secret_env.{k}", f"{k} is set in both env and secret_env")
            out.append(Slot(env=env, secret_env=secret_env))
        return tuple(out)

    def env(self, value: object, path: str, *, secret: bool) -> dict[str, str]:
        m = self.mapping(value, path, "secret_env" if secret else "env")
        out: dict[str, str] = {}
        for k, v in (m or {}).items():
            vpath = f"{path}.{k}"
            if not ENV_RE.match(k):
                self.problem(vpath, f"{_show(k)} is not an environment variable name")
                continue
            if k.startswith(RESERVED_ENV_PREFIX):
                self.problem(
                    vpath,
                    f"{_show(k)}: names starting with {RESERVED_ENV_PREFIX} are the platform's",
                )
                continue
            if not isinstance(v, str):
                self.problem(vpath, f"must be a string, not {_kind(v)}", "quote it")
                continue
            if secret:
                if v.startswith("trace/"):
                    self.problem(
                        vpath,
                        f"secret {_show(v)} must be named relative to the org's namespace",
                        "write 'rpc/key-1' for trace/org/{org_id}/rpc/key-1",
                    )
                    continue
                try:
                    secret_names.org_secret("org", v)
                except errors.ValidationFailed as exc:
                    self.problem(vpath, f"secret name {_show(v)}: {exc.message}")
                    continue
            out[k] = v
        return out

    def job(self, name: str, body: object, path: str) -> Job | None:
        m = self.mapping(body, path, "a job")
        if m is None:
            return None
        self.keys(m, path, JOB_KEYS, required=("operator",))
        ok = True
        operator = self.string(m["operator"], f"{path}.operator") if "operator" in m else None
        runtime = Runtime.WORKER
        if "runtime" in m:
            runtime = self.choice(m["runtime"], f"{path}.runtime", Runtime) or Runtime.WORKER
        if "execution_strategy" in m:
            value = m["execution_strategy"]
            if isinstance(value, str) and value.lower() == "bulk":
                self.problem(
                    f"{path}.execution_strategy",
                    "execution_strategy: Bulk is not supported: one event runs one task",
                    "batch explicitly: put a range_aggregator job before this one "
                    "(and a range_splitter to split ranges back)",
                )
            elif value != "per_event":
                self.problem(
                    f"{path}.execution_strategy",
                    f"must be per_event (the only strategy), not {_show(value)}",
                    "remove the key",
                )
        config: dict[str, Any] = {}
        if (
            "config" in m
            and (c := self.mapping(m["config"], f"{path}.config", "config")) is not None
        ):
            if (found := _json_problem(c, f"{path}.config")) is not None:
                self.problem(found[0], found[1])
                ok = False
            config = dict(c)
        inputs: list[Input] = []
        if (
            "inputs" in m
            and (items := self.array(m["inputs"], f"{path}.inputs", "inputs")) is not None
        ):
            for i, item in enumerate(items):
                if (inp := self.input(item, f"{path}.inputs[{i}]")) is not None:
                    inputs.append(inp)
                else:
                    ok = False
        outputs: list[Output] = []
        if (
            "outputs" in m
            and (items := self.array(m["outputs"], f"{path}.outputs", "outputs")) is not None
        ):
            for i, item in enumerate(items):
                if (out := self.output(item, f"{path}.outputs[{i}]")) is not None:
                    outputs.append(out)
                else:
                    ok = False
        pool = None
        if "worker_pool" in m:
            pool = self.name(m["worker_pool"], f"{path}.worker_pool", "pool name")
            if pool is not None and runtime is Runtime.LAMBDA:
                self.problem(
                    f"{path}.worker_pool",
                    "worker pools are worker slots: a lambda job cannot use one",
                    "use runtime: worker, or remove worker_pool",
                )
        scaling = Scaling()
        if (
            "scaling" in m
            and (s := self.mapping(m["scaling"], f"{path}.scaling", "scaling")) is not None
        ):
            self.keys(s, f"{path}.scaling", SCALING_KEYS)
            if "max_concurrency" in s:
                scaling = Scaling(
                    self.integer(
                        s["max_concurrency"],
                        f"{path}.scaling.max_concurrency",
                        1,
                        MAX_CONCURRENCY_LIMIT,
                    )
                )
            # scaling.mode is accepted and ignored (v1 scales by max_concurrency only).
        timeout = DEFAULT_TIMEOUT_S
        if "timeout" in m:
            seconds = duration_s(m["timeout"])
            if seconds is None:
                self.problem(
                    f"{path}.timeout",
                    f"{_show(m['timeout'])} is not a duration",
                    "seconds as an integer, or '90s', '15m'",
                )
            elif not 1 <= seconds <= MAX_TIMEOUT_S:
                self.problem(
                    f"{path}.timeout",
                    f"timeout {seconds} s is outside 1..{MAX_TIMEOUT_S} s",
                    "split long work into smaller ranges (range_splitter)",
                )
            else:
                timeout = seconds
        max_attempts = DEFAULT_MAX_ATTEMPTS
        if "max_attempts" in m:
            max_attempts = (
                self.integer(m["max_attempts"], f"{path}.max_attempts", 1, MAX_ATTEMPTS_LIMIT)
                or DEFAULT_MAX_ATTEMPTS
            )
        triggers: list[Trigger] = []
        if (
            "triggers" in m
            and (items := self.array(m["triggers"], f"{path}.triggers", "triggers")) is not None
        ):
            for i, item in enumerate(items):
                if (t := self.trigger(item, f"{path}.triggers[{i}]")) is not None:
                    triggers.append(t)
        if operator is None or not ok:
            return None
        return Job(
            name=name,
            operator=operator,
            runtime=runtime,
            config=config,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            worker_pool=pool,
            scaling=scaling,
            timeout_s=timeout,
            max_attempts=max_attempts,
            triggers=tuple(triggers),
            description=self.description(m.get("description"), f"{path}.description"),
        )

    def input(self, value: object, path: str) -> Input | None:
        m = self.mapping(value, path, "an input")
        if m is None:
            return None
        self.keys(m, path, INPUT_KEYS, required=("from",))
        source: JobRef | DatasetRef | None = None
        if "from" in m and (f := self.mapping(m["from"], f"{path}.from", "from")) is not None:
            fpath = f"{path}.from"
            if "dataset" in f and "job" in f:
                self.problem(fpath, "from names a job output or a dataset, not both")
            elif "dataset" in f:
                self.keys(f, fpath, frozenset({"dataset"}))
                if (ds := self.name(f["dataset"], f"{fpath}.dataset", "dataset name")) is not None:
                    source = DatasetRef(ds)
            elif "job" in f:
                self.keys(f, fpath, frozenset({"job", "output"}))
                job = self.name(f["job"], f"{fpath}.job", "job name")
                output = 0
                if "output" in f:
                    output = self.integer(f["output"], f"{fpath}.output", 0, 999) or 0
                if job is not None:
                    source = JobRef(job, output)
            else:
                self.problem(
                    fpath,
                    "from needs {job, output} or {dataset}",
                    "e.g. from: {job: ingest, output: 0}",
                )
        where: tuple[Condition, ...] = ()
        if "where" in m:
            where = self.where(m["where"], f"{path}.where")
        if source is None:
            return None
        return Input(source=source, where=where)

    def where(self, value: object, path: str) -> tuple[Condition, ...]:
        if isinstance(value, str):
            self.problem(
                path,
                "where is a structured map, not SQL text",
                "write {field: {op: value}}, e.g. where: {block_number: {gte: 100}}",
            )
            return ()
        m = self.mapping(value, path, "where")
        out: list[Condition] = []
        for field, ops in (m or {}).items():
            fpath = f"{path}.{field}"
            if not COLUMN_RE.match(field):
                self.problem(fpath, f"{_show(field)} is not a column name")
                continue
            om = self.mapping(ops, fpath, "a where condition ({op: value})")
            if om is None:
                continue
            if not om:
                self.problem(fpath, "a condition needs an operator", "e.g. {eq: 1}")
            for op, operand in om.items():
                opath = f"{fpath}.{op}"
                if op not in WHERE_OPERATORS:
                    self.problem(
                        opath,
                        f"unknown where operator {_show(op)}",
                        _close(op, WHERE_OPERATORS)
                        or f"allowed: {', '.join(sorted(WHERE_OPERATORS))}",
                    )
                    continue
                if (cond := self.condition(field, op, operand, opath)) is not None:
                    out.append(cond)
        # ANDed, so order means nothing: sorted, so reordering a map is no change.
        return tuple(sorted(out, key=lambda c: (c.field, c.op)))

    def condition(self, field: str, op: str, operand: object, path: str) -> Condition | None:
        if op == "is_null":
            if not isinstance(operand, bool):
                self.problem(path, "is_null takes true or false")
                return None
            return Condition(field, op, operand)
        if op in ("in", "not_in"):
            if not isinstance(operand, list) or not operand:
                self.problem(path, f"{op} takes a non-empty list of values")
                return None
            if len(operand) > MAX_IN_VALUES:
                self.problem(path, f"{op} takes at most {MAX_IN_VALUES} values")
                return None
            if any(not _scalar(v) for v in operand):
                self.problem(path, f"{op} values must be strings, numbers or booleans")
                return None
            return Condition(field, op, tuple(operand))
        if not _scalar(operand):
            self.problem(
                path,
                f"{op} takes a string, number or boolean, not {_kind(operand)}",
                "test for null with {is_null: true}" if operand is None else "",
            )
            return None
        return Condition(field, op, operand)

    def output(self, value: object, path: str) -> Output | None:
        m = self.mapping(value, path, "an output")
        if m is None:
            return None
        self.keys(m, path, OUTPUT_KEYS, required=("storage", "update_strategy"))
        storage = self.choice(m["storage"], f"{path}.storage", Storage) if "storage" in m else None
        strategy = (
            self.choice(m["update_strategy"], f"{path}.update_strategy", UpdateStrategy)
            if "update_strategy" in m
            else None
        )
        schema: dict[str, str] = {}
        if (
            "schema" in m
            and (s := self.mapping(m["schema"], f"{path}.schema", "schema")) is not None
        ):
            for col, typ in s.items():
                cpath = f"{path}.schema.{col}"
                if not COLUMN_RE.match(col):
                    self.problem(cpath, f"{_show(col)} is not a column name", "lower snake_case")
                elif typ not in COLUMN_TYPES:
                    self.problem(
                        cpath,
                        f"unknown column type {_show(typ)}",
                        _close(str(typ), COLUMN_TYPES)
                        or f"types: {', '.join(sorted(COLUMN_TYPES))}",
                    )
                else:
                    schema[col] = typ
        unique_key: list[str] = []
        if "unique_key" in m:
            raw = m["unique_key"]
            items = (
                [raw]
                if isinstance(raw, str)
                else self.array(raw, f"{path}.unique_key", "unique_key")
            )
            for i, col in enumerate(items or []):
                kpath = (
                    f"{path}.unique_key[{i}]" if not isinstance(raw, str) else f"{path}.unique_key"
                )
                if not isinstance(col, str) or not COLUMN_RE.match(col):
                    self.problem(kpath, f"{_show(col)} is not a column name")
                elif "schema" in m and col not in schema:
                    self.problem(kpath, f"unique_key column {_show(col)} is not in the schema")
                else:
                    unique_key.append(col)
            if unique_key and "schema" not in m:
                self.problem(
                    f"{path}.unique_key", "unique_key needs a schema", "declare the output's schema"
                )
        buffered = self.boolean(m["buffered"], f"{path}.buffered") if "buffered" in m else False
        multi = (
            self.boolean(m["multi_writer"], f"{path}.multi_writer")
            if "multi_writer" in m
            else False
        )
        if storage is Storage.POSTGRES_TABLE and not m.get("schema"):
            self.problem(f"{path}.schema", "a postgres_table output needs a schema")
        if (
            storage is Storage.POSTGRES_TABLE
            and strategy is UpdateStrategy.APPEND
            and not m.get("unique_key")
        ):
            self.problem(
                f"{path}.unique_key",
                "an append postgres_table output needs a unique_key",
                "append dedupes rows by unique_key",
            )
        if buffered and storage is Storage.OBJECT_STORE:
            self.problem(f"{path}.buffered", "only a postgres_table output can be buffered")
        if multi and not (buffered and strategy is UpdateStrategy.APPEND):
            self.problem(
                f"{path}.multi_writer",
                "only a buffered append output can be multi-writer",
                "set buffered: true and update_strategy: append",
            )
        if storage is None or strategy is None:
            return None
        return Output(
            storage=storage,
            update_strategy=strategy,
            unique_key=tuple(unique_key),
            schema=schema,
            buffered=buffered,
            multi_writer=multi,
        )

    def trigger(self, value: object, path: str) -> Trigger | None:
        m = self.mapping(value, path, "a trigger")
        if m is None:
            return None
        if "type" not in m:
            self.problem(f"{path}.type", "'type' is required", "manual, cron or interval")
            return None
        kind = self.choice(m["type"], f"{path}.type", TriggerType)
        if kind is None:
            return None
        self.keys(m, path, TRIGGER_KEYS[kind], required=TRIGGER_KEYS[kind] - {"type"})
        match kind:
            case TriggerType.MANUAL:
                return Trigger(kind)
            case TriggerType.CRON:
                if (
                    "schedule" not in m
                    or (text := self.string(m["schedule"], f"{path}.schedule")) is None
                ):
                    return None
                if (why := cron_problem(text)) is not None:
                    self.problem(f"{path}.schedule", why, "e.g. '*/5 * * * *' (every 5 minutes)")
                    return None
                return Trigger(kind, schedule=text)
            case TriggerType.INTERVAL:
                if "every" not in m:
                    return None
                seconds = duration_s(m["every"])
                if seconds is None or seconds < 1:
                    self.problem(
                        f"{path}.every",
                        f"{_show(m['every'])} is not a positive duration",
                        "seconds as an integer, or '30s', '5m', '1h'",
                    )
                    return None
                return Trigger(kind, every_s=seconds)
        return None  # pragma: no cover - every TriggerType is matched above

    def publish(self, value: object, path: str) -> Publish | None:
        m = self.mapping(value, path, "a publish entry")
        if m is None:
            return None
        self.keys(m, path, PUBLISH_KEYS, required=("job", "dataset"))
        job = self.name(m["job"], f"{path}.job", "job name") if "job" in m else None
        output = self.integer(m["output"], f"{path}.output", 0, 999) if "output" in m else 0
        dataset = (
            self.name(m["dataset"], f"{path}.dataset", "dataset name") if "dataset" in m else None
        )
        if job is None or output is None or dataset is None:
            return None
        return Publish(job=job, output=output, dataset=dataset)


def _scalar(value: object) -> bool:
    return isinstance(value, str | bool | int) or (
        isinstance(value, float) and math.isfinite(value)
    )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# --- graph rules ---------------------------------------------------------------------------------


def consumers(dag: Dag) -> dict[str, set[str]]:
    """Job name -> the jobs of ``dag`` that read one of its outputs."""
    out: dict[str, set[str]] = {name: set() for name in dag.jobs}
    for job in dag.jobs.values():
        for inp in job.inputs:
            if isinstance(inp.source, JobRef) and inp.source.job in out:
                out[inp.source.job].add(job.name)
    return out


def cycles(dag: Dag) -> list[list[str]]:
    """Every cycle among ``dag``'s jobs, each as the jobs along it (first job repeated last),
    one per strongly connected component, in job order."""
    graph = consumers(dag)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    order = list(dag.jobs)
    found = []
    for comp in sorted(components, key=lambda c: min(order.index(j) for j in c)):
        start = min(comp, key=order.index)
        path, seen = [start], {start}
        while True:  # walk inside the component until a job repeats
            nxt = min(
                (w for w in graph[path[-1]] if w in comp), key=lambda w: (w in seen, order.index(w))
            )
            path.append(nxt)
            if nxt in seen:
                break
            seen.add(nxt)
        found.append(path[path.index(path[-1]) :])
    return found


def downstream(dag: Dag, jobs: Iterable[str]) -> set[str]:
    """``jobs`` (those in ``dag``) and every job that reads from them, transitively."""
    graph = consumers(dag)
    todo = [j for j in jobs if j in graph]
    seen = set(todo)
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def topological_order(dag: Dag) -> list[str]:
    """Job names, producers before consumers (ties in file order). Raises ``ValidationFailed``
    on a cycle."""
    graph = consumers(dag)
    indegree = {j: 0 for j in graph}
    for targets in graph.values():
        for t in targets:
            indegree[t] += 1
    ready = [j for j in dag.jobs if indegree[j] == 0]
    out: list[str] = []
    while ready:
        j = ready.pop(0)
        out.append(j)
        for t in sorted(graph[j], key=list(dag.jobs).index):
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    if len(out) != len(graph):
        raise errors.ValidationFailed("the DAG has a cycle", field="jobs")
    return out


def _graph_problems(
    dag: Dag,
    operators: Mapping[str, OperatorInfo] | None,
    datasets: Mapping[str, DatasetFacts] | None,
    broken: _Reader,
) -> Iterator[Problem]:
    """The graph rules on what parsed; references to jobs and pools present in the file but
    not parsed (already reported, ``broken``) are skipped."""
    published = {p.dataset for p in dag.publish}
    for job in dag.jobs.values():
        path = f"jobs.{job.name}"
        if operators is not None and job.operator not in operators:
            yield Problem(
                f"{path}.operator",
                f"unknown operator {_show(job.operator)}",
                _close(job.operator, operators)
                or f"available: {', '.join(sorted(operators)) or 'none'}",
            )
        if (
            job.worker_pool is not None
            and job.worker_pool not in dag.worker_pools
            and job.worker_pool not in broken.broken_pools
        ):
            yield Problem(
                f"{path}.worker_pool",
                f"no worker pool named {_show(job.worker_pool)}",
                _close(job.worker_pool, dag.worker_pools) or "declare it under worker_pools",
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
                        f"no job named {_show(ref.job)}",
                        _close(ref.job, dag.jobs) or "name a job of this DAG",
                    )
                    continue
                if ref.output >= len(producer.outputs):
                    yield Problem(
                        f"{ipath}.from.output",
                        f"job {_show(ref.job)} has {len(producer.outputs)} output(s); "
                        f"index {ref.output} does not exist",
                        "outputs are numbered from 0",
                    )
                    continue
                columns = producer.outputs[ref.output].schema
                where_hint = f"declare jobs.{ref.job}.outputs[{ref.output}].schema"
            else:
                name = inp.source.dataset
                where_hint = f"dataset {_show(name)} declares no schema"
                if name in published:
                    yield Problem(
                        f"{ipath}.from.dataset",
                        f"dataset {_show(name)} is published by this DAG",
                        "wire it by index: from: {job, output}",
                    )
                    continue
                if datasets is not None:
                    facts = datasets.get(name)
                    if facts is None:
                        yield Problem(
                            f"{ipath}.from.dataset",
                            f"no dataset named {_show(name)} in this org",
                            _close(name, datasets) or "publish it from its DAG first",
                        )
                        continue
                    columns = facts.schema
                else:
                    checkable = False  # offline: the registry checks at deploy
            if inp.where and checkable:
                yield from _where_problems(inp.where, columns or {}, f"{ipath}.where", where_hint)
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
            yield Problem(f"{ppath}.job", f"no job named {_show(p.job)}", _close(p.job, dag.jobs))
            continue
        if p.output >= len(pub_job.outputs):
            yield Problem(
                f"{ppath}.output",
                f"job {_show(p.job)} has {len(pub_job.outputs)} output(s); index {p.output} does not exist",
                "outputs are numbered from 0",
            )
            continue
        out = pub_job.outputs[p.output]
        if (first := seen.get(p.dataset)) is not None:
            first_out = dag.jobs[first.job].outputs[first.output]
            if (first.job, first.output) == (p.job, p.output):
                yield Problem(f"{ppath}.dataset", f"{_show(p.dataset)} is published twice")
            elif not (out.multi_writer and first_out.multi_writer):
                yield Problem(
                    f"{ppath}.dataset",
                    f"dataset {_show(p.dataset)} is already published by "
                    f"{first.job}.outputs[{first.output}]",
                    "one output per dataset, unless every writer is a buffered multi_writer output",
                )
        else:
            seen[p.dataset] = p
        facts = datasets.get(p.dataset) if datasets is not None else None
        if (
            facts is not None
            and facts.producer_dag is not None
            and facts.producer_dag != dag.name
            and not (facts.multi_writer and out.multi_writer)
        ):
            yield Problem(
                f"{ppath}.dataset",
                f"dataset {_show(p.dataset)} is produced by DAG {_show(facts.producer_dag)}: "
                "a dataset has one producing DAG",
                "publish under another name, or read it with from: {dataset: ...}",
            )


def _where_problems(
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
                f"the input has no column {_show(cond.field)}",
                _close(cond.field, columns) or f"columns: {', '.join(columns)}",
            )
            continue
        if typ == "json" and cond.op != "is_null":
            yield Problem(cpath, "a json column can only be tested with is_null")
            continue
        if cond.op in _ORDERING and typ == "bool":
            yield Problem(cpath, f"{cond.op} does not apply to a bool column", "use eq")
            continue
        values = cond.value if isinstance(cond.value, tuple) else (cond.value,)
        if cond.op != "is_null" and not all(_fits(v, typ) for v in values):
            yield Problem(
                cpath, f"column {_show(cond.field)} is {typ}: {_show(cond.value)} does not fit"
            )


def _fits(value: object, typ: str) -> bool:
    if typ == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if typ in _NUMERIC:
        return isinstance(value, int | float) or (
            typ in ("uint256", "decimal") and isinstance(value, str)
        )
    return typ in _TEXT and isinstance(value, str)


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
    reader = _Reader()
    try:
        dag = reader.dag(doc)
        problems = list(reader.problems)
        if dag is not None:
            problems.extend(_graph_problems(dag, operators, datasets, reader))
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
    reader = _Reader()
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


# --- back to a document --------------------------------------------------------------------------


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


# --- diff ----------------------------------------------------------------------------------------


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


__all__ = [
    "CHANGE_KINDS",
    "COLUMN_TYPES",
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
    "parse",
    "to_doc",
    "topological_order",
    "validate",
]
