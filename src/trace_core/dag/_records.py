"""DAG spec records: constants, enums and the frozen records a parsed DAG file is made of."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from trace_core import wire

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
#: Column types that compare as numbers / as text in ``where``.
NUMERIC_TYPES: Final = frozenset(
    {"int32", "int64", "uint32", "uint64", "uint256", "float64", "decimal"}
)
TEXT_TYPES: Final = frozenset({"string", "bytes", "timestamp", "date"})

#: ``where`` operators: the allow-list (``docs/specs/dag.md``, "where"). Fields are ANDed; values are JSON scalars.
WHERE_OPERATORS: Final = frozenset(
    {"eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "is_null"}
)
ORDERING_OPERATORS: Final = frozenset({"lt", "lte", "gt", "gte"})

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
    #: Its ``unique_key`` (None: unknown, not checked).
    unique_key: tuple[str, ...] | None = None
    #: The other DAGs registered as writers of a multi_writer dataset (ADR 0037).
    writer_dags: frozenset[str] = frozenset()


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
