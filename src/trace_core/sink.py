"""Buffer batches of buffered Postgres datasets: strict parsing and row dedupe keys.

A buffer batch is JSON lines, one object per row, published by a task for a dataset declared
``storage: postgres_table, buffered: true`` (``docs/specs/dag.md``). The sink parses it here,
against the dataset's declared schema, before anything is written:

* at most ``MAX_BATCH_ROWS`` rows and ``MAX_BATCH_BYTES`` bytes;
* every line a JSON object (no NaN/Infinity, no repeated key), every key a declared column;
* every value of its column's type and size; ``unique_key`` columns required (not null),
  other columns nullable;
* a value becomes what the sink writes: ``int`` (int32 … uint256), ``Decimal``, ``float``,
  ``str``, ``bytes`` (``0x`` hex), ``bool``, timezone-aware ``datetime``, ``date``, or a JSON
  value (``json``).

Any problem rejects the whole batch (``MalformedBatch``) with every problem found, up to
``MAX_PROBLEMS``, each naming the row index, the field and what was wrong: the sink dead-letters
the batch at once with that reason.

Each row gets a dedupe key (``dedupe_key``): a digest of ``(producer_task_id, dataset_uuid,
scope, unique_key values)`` where ``scope`` is the batch's cursor, partition key or range (or
none). A retried attempt re-publishing the same rows yields the same keys, so the table's unique
constraint on the key stores each row once. The key includes the producer task: two tasks
writing the same ``unique_key`` values (several writers of an ``alert_events``-like dataset)
are two rows.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import attrs

from trace_core import errors, json_limits
from trace_core.dag import COLUMN_TYPES

#: Most rows in one batch.
MAX_BATCH_ROWS: Final = 1000
#: Most bytes in one batch (the JSON-lines text).
MAX_BATCH_BYTES: Final = 1024 * 1024
#: Longest ``string`` value, in UTF-8 bytes; longest ``bytes`` value, in bytes.
MAX_TEXT_BYTES: Final = 64 * 1024
#: Most problems one rejection lists (the first ones found, row by row).
MAX_PROBLEMS: Final = 20

_INT_RANGES: Final = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "uint256": (0, 2**256 - 1),
}
_DIGITS = re.compile(r"^-?[0-9]{1,80}$")
_DECIMAL = re.compile(r"^-?[0-9]{1,100}(\.[0-9]{1,100})?$")
_HEX = re.compile(r"^0x([0-9a-fA-F]{2})*$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TIMESTAMP = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})$")


@attrs.frozen
class DatasetSchema:
    """What a buffered dataset's rows must look like (its registry entry)."""

    #: ``(column, type)`` in declaration order; types from ``trace_core.dag.COLUMN_TYPES``.
    columns: tuple[tuple[str, str], ...]
    #: Columns whose values (with the batch's producer and scope) identify a row.
    unique_key: tuple[str, ...] = ()

    @classmethod
    def of(cls, schema: Mapping[str, str], unique_key: Sequence[str] = ()) -> DatasetSchema:
        """The schema of a registry entry. Raises ``ValidationFailed`` for an unknown type or
        a ``unique_key`` column not in the schema (a registry written around deploy)."""
        for col, typ in schema.items():
            if typ not in COLUMN_TYPES:
                raise errors.ValidationFailed(
                    f"column {col!r} has unknown type {typ!r}", field=f"schema.{col}"
                )
        for col in unique_key:
            if col not in schema:
                raise errors.ValidationFailed(
                    f"unique_key column {col!r} is not in the schema", field="unique_key"
                )
        return cls(tuple(schema.items()), tuple(unique_key))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)


@attrs.frozen
class Scope:
    """What a batch covers: a cursor, a partition key or a block range (at most one)."""

    cursor: str | None = None
    partition_key: str | None = None
    range: tuple[int, int] | None = None

    def as_json(self) -> Any:
        if self.range is not None:
            return {"range": list(self.range)}
        if self.partition_key is not None:
            return {"partition_key": self.partition_key}
        if self.cursor is not None:
            return {"cursor": self.cursor}
        return None


@attrs.frozen
class Problem:
    """One thing wrong with a batch."""

    #: Row index (0-based line of the batch); ``None`` for the batch as a whole.
    row: int | None
    #: The column (or ``None``).
    field: str | None
    message: str

    def __str__(self) -> str:
        where = "batch" if self.row is None else f"row {self.row}"
        if self.field is not None:
            where += f" field {self.field}"
        return f"{where}: {self.message}"


class MalformedBatch(errors.ValidationFailed):
    """The buffer batch does not match its dataset's schema."""

    def __init__(self, problems: Sequence[Problem], more: int = 0) -> None:
        self.problems = tuple(problems)
        first = problems[0]
        text = "; ".join(str(p) for p in problems)
        if more:
            text += f"; and {more} more"
        field = None
        if first.row is not None:
            field = f"rows[{first.row}]" + (f".{first.field}" if first.field else "")
        super().__init__(
            text,
            field=field,
            details={"problems": [attrs.asdict(p) for p in problems], "more": more},
        )


@attrs.frozen
class ParsedBatch:
    """A batch that matched its schema: values in column order, per row."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def parse_batch(data: bytes, schema: DatasetSchema) -> ParsedBatch:
    """Parse a JSON-lines batch strictly against ``schema``. Raises ``MalformedBatch``."""
    if len(data) > MAX_BATCH_BYTES:
        raise MalformedBatch(
            [Problem(None, None, f"{len(data)} bytes, over the limit of {MAX_BATCH_BYTES}")]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBatch([Problem(None, None, f"not UTF-8 at byte {exc.start}")]) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_BATCH_ROWS:
        raise MalformedBatch(
            [Problem(None, None, f"{len(lines)} rows, over the limit of {MAX_BATCH_ROWS}")]
        )
    types = dict(schema.columns)
    required = frozenset(schema.unique_key)
    problems: list[Problem] = []
    more = 0
    rows: list[tuple[Any, ...]] = []

    def add(p: Problem) -> None:
        nonlocal more
        if len(problems) < MAX_PROBLEMS:
            problems.append(p)
        else:
            more += 1

    converters = [(col, _CONVERTERS[typ], col in required) for col, typ in schema.columns]
    known = frozenset(types)
    for i, line in enumerate(lines):
        obj = _load_object(line, i, add)
        if obj is None:
            continue
        if not known.issuperset(obj):
            for key in obj:
                if key not in types:
                    add(Problem(i, key, "not a column of the dataset"))
        values: list[Any] = []
        for col, conv, req in converters:
            raw = obj.get(col)
            if raw is None:
                if req:
                    add(Problem(i, col, "required (a unique_key column), missing or null"))
                values.append(None)
                continue
            try:
                values.append(conv(raw))
            except _BadValue as exc:
                add(Problem(i, col, str(exc)))
                values.append(None)
        rows.append(tuple(values))
    if problems:
        raise MalformedBatch(problems, more)
    return ParsedBatch(schema.names, tuple(rows))


class _BadValue(Exception):
    pass


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        seen: set[str] = set()
        for k, _ in items:
            if k in seen:
                raise _BadValue(f"key {k!r} repeated")
            seen.add(k)
    return out


def _no_constant(name: str) -> Any:
    raise _BadValue(f"{name} is not JSON")


#: One decoder for every line: repeated keys and NaN/Infinity refused.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constant)


def _load_object(line: str, i: int, add: Callable[[Problem], None]) -> dict[str, Any] | None:
    try:
        obj, end = _DECODER.raw_decode(line.strip())
        if end != len(line.strip()):
            raise ValueError("extra data after the value")
    except _BadValue as exc:
        add(Problem(i, None, str(exc)))
        return None
    except (ValueError, RecursionError) as exc:
        add(Problem(i, None, f"not JSON: {type(exc).__name__}"))
        return None
    if not isinstance(obj, dict):
        add(Problem(i, None, f"a row must be a JSON object, got {_json_type(obj)}"))
        return None
    return obj


def _convert(typ: str, raw: Any, path: str = "value") -> Any:
    """The value of column type ``typ`` that a non-null JSON value ``raw`` stands for.
    Raises ``_BadValue`` saying what was wrong."""
    if typ in _INT_RANGES:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise _BadValue(f"expected {typ} (an integer), got {_json_type(raw)}")
        if isinstance(raw, str):
            if not _DIGITS.match(raw):
                raise _BadValue(f"expected {typ} (an integer or its decimal digits)")
            raw = int(raw)
        lo, hi = _INT_RANGES[typ]
        if not lo <= raw <= hi:
            raise _BadValue(f"{raw} is out of range for {typ}")
        return raw
    if typ == "float64":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _BadValue(f"expected float64 (a number), got {_json_type(raw)}")
        return float(raw)
    if typ == "decimal":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise _BadValue(f"expected decimal (a number or decimal string), got {_json_type(raw)}")
        text = str(raw) if not isinstance(raw, float) else repr(raw)
        if not _DECIMAL.match(text):
            raise _BadValue("expected decimal: digits with an optional fraction")
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid text
            raise _BadValue("expected decimal") from None
    if typ == "bool":
        if not isinstance(raw, bool):
            raise _BadValue(f"expected bool, got {_json_type(raw)}")
        return raw
    if typ == "string":
        if not isinstance(raw, str):
            raise _BadValue(f"expected string, got {_json_type(raw)}")
        if "\x00" in raw:
            raise _BadValue("a string may not contain NUL")
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise _BadValue("a string may not contain a lone surrogate") from None
        if size > MAX_TEXT_BYTES:
            raise _BadValue(f"{size} bytes, over the limit of {MAX_TEXT_BYTES}")
        return raw
    if typ == "bytes":
        if not isinstance(raw, str) or not _HEX.match(raw):
            raise _BadValue("expected bytes as 0x-prefixed hex with an even number of digits")
        if (len(raw) - 2) // 2 > MAX_TEXT_BYTES:
            raise _BadValue(f"over the limit of {MAX_TEXT_BYTES} bytes")
        return bytes.fromhex(raw[2:])
    if typ == "timestamp":
        if not isinstance(raw, str) or not _TIMESTAMP.match(raw):
            raise _BadValue("expected an ISO 8601 timestamp with a time zone (…Z or …+00:00)")
        try:
            return datetime.fromisoformat(raw)
        except ValueError:
            raise _BadValue("not a valid timestamp") from None
    if typ == "date":
        if not isinstance(raw, str) or not _DATE.match(raw):
            raise _BadValue("expected a date YYYY-MM-DD")
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise _BadValue("not a valid date") from None
    if typ == "json":
        try:
            json_limits.check(raw, path=path)
        except errors.ValidationFailed as exc:
            raise _BadValue(exc.message) from None
        return raw
    raise _BadValue(f"unknown column type {typ!r}")


def _slow(typ: str) -> Callable[[Any], Any]:
    return lambda raw: _convert(typ, raw)


def _int_converter(typ: str) -> Callable[[Any], Any]:
    lo, hi = _INT_RANGES[typ]

    def conv(raw: Any) -> Any:
        if type(raw) is int:
            if lo <= raw <= hi:
                return raw
        elif type(raw) is str and 0 < len(raw) <= 80 and raw.isascii() and raw.isdigit():
            n = int(raw)
            if lo <= n <= hi:
                return n
        return _convert(typ, raw)

    return conv


def _bytes_converter(raw: Any) -> Any:
    if type(raw) is str and raw.startswith("0x") and len(raw) <= 2 + 2 * MAX_TEXT_BYTES:
        try:
            out = bytes.fromhex(raw[2:])
        except ValueError:
            out = None
        if out is not None and 2 * len(out) == len(raw) - 2:  # fromhex skips spaces
            return out
    return _convert("bytes", raw)


def _str_converter(raw: Any) -> Any:
    if type(raw) is str and len(raw) <= MAX_TEXT_BYTES // 4 and "\x00" not in raw:
        try:
            raw.encode("utf-8")
            return raw
        except UnicodeEncodeError:
            pass
    return _convert("string", raw)


#: The converter of each column type (fast paths for the common cases, else ``_convert``).
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    **{t: _slow(t) for t in COLUMN_TYPES},
    **{t: _int_converter(t) for t in _INT_RANGES},
    "string": _str_converter,
    "bytes": _bytes_converter,
}


#: Canonical JSON: sorted keys, no spaces, ASCII only (so no raw newline ever appears).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def inline_lines(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The JSON-lines form of rows published inline (``BufferBatchIn.rows``): one canonical
    JSON object per line (sorted keys, ASCII). Its size and SHA-256 stand in for a staged
    object's."""
    return b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in rows
    )


def _key_base(producer_task_id: str, dataset_uuid: str, scope: Scope | None) -> Any:
    """The hash state after ``[producer, dataset, scope]`` and a newline: every key of a batch
    starts from a copy of it."""
    head = [producer_task_id.lower(), dataset_uuid.lower(), scope.as_json() if scope else None]
    return hashlib.sha256(_ENCODER.encode(head).encode("ascii") + b"\n")


def _key_from(base: Any, key_values: Sequence[Any]) -> str:
    h = base.copy()
    h.update(_ENCODER.encode([_canonical(v) for v in key_values]).encode("ascii"))
    return str(h.hexdigest())


def dedupe_key(
    producer_task_id: str,
    dataset_uuid: str,
    scope: Scope | None,
    key_values: Sequence[Any],
) -> str:
    """The row's dedupe key: hex SHA-256 of the canonical JSON of ``[producer_task_id,
    dataset_uuid, scope]``, a newline, and the canonical JSON of ``key_values`` (typed: bytes,
    times and decimals are tagged). Equal inputs, equal keys; any difference in any part, a
    different key."""
    return _key_from(_key_base(producer_task_id, dataset_uuid, scope), key_values)


def dedupe_keys(
    batch: ParsedBatch,
    schema: DatasetSchema,
    *,
    producer_task_id: str,
    dataset_uuid: str,
    scope: Scope | None,
) -> list[str]:
    """The dedupe key of every row of ``batch``, in order (``dedupe_key`` of each). With no
    ``unique_key`` the row's index in the batch stands in for it (the same batch again
    dedupes; nothing else can)."""
    base = _key_base(producer_task_id, dataset_uuid, scope)
    index = [batch.columns.index(c) for c in schema.unique_key]
    if not index:
        return [_key_from(base, ["#row", i]) for i in range(len(batch.rows))]
    return [_key_from(base, [row[j] for j in index]) for row in batch.rows]


#: Column type changes an existing buffered dataset takes in place: every value of the old
#: type is a value of the new one, so stored rows and their dedupe keys keep their meaning.
WIDENINGS: Final[Mapping[str, frozenset[str]]] = {
    "int32": frozenset({"int64", "decimal"}),
    "uint32": frozenset({"int64", "uint64", "uint256", "decimal"}),
    "int64": frozenset({"decimal"}),
    "uint64": frozenset({"uint256", "decimal"}),
    "uint256": frozenset({"decimal"}),
}


@attrs.frozen
class SchemaEvolution:
    """What redeploying a buffered dataset under a new schema changes in its table, and what
    of the change the table cannot take (``problems``: the deploy is refused)."""

    #: New columns ``(column, type)``: added to the table, nullable (old rows hold null).
    added: tuple[tuple[str, str], ...] = ()
    #: ``(column, old type, new type)`` with the new type in ``WIDENINGS[old type]``.
    widened: tuple[tuple[str, str, str], ...] = ()
    #: Every incompatible change, with its path under ``path`` and what to do instead.
    problems: tuple[Problem, ...] = ()


def schema_evolution(
    old: DatasetSchema, new: DatasetSchema, *, dataset: str, path: str = ""
) -> SchemaEvolution:
    """How a buffered dataset's table evolves from ``old`` to ``new``. Compatible: a new
    column not in ``unique_key`` (nullable), a column type widened (``WIDENINGS``).
    Incompatible (a ``Problem`` each, ``field`` = ``{path}.schema.<column>`` or
    ``{path}.unique_key``): a column removed, a type changed otherwise, a ``unique_key``
    changed (the stored dedupe keys would mean something else)."""
    prefix = f"{path}." if path else ""
    old_types, new_types = dict(old.columns), dict(new.columns)
    problems: list[Problem] = []
    widened: list[tuple[str, str, str]] = []
    for col, was in old.columns:
        now = new_types.get(col)
        if now is None:
            problems.append(
                Problem(
                    None,
                    f"{prefix}schema",
                    f"column {col!r} of buffered dataset {dataset!r} is removed: its table "
                    "holds it (keep it declared; rows may leave it null)",
                )
            )
        elif now != was:
            if now in WIDENINGS.get(was, ()):
                widened.append((col, was, now))
            else:
                allowed = ", ".join(sorted(WIDENINGS.get(was, ()))) or "none"
                problems.append(
                    Problem(
                        None,
                        f"{prefix}schema.{col}",
                        f"column {col!r} of buffered dataset {dataset!r} cannot change from "
                        f"{was} to {now}: stored values may not fit (widenings of {was}: "
                        f"{allowed}; or publish a new dataset)",
                    )
                )
    if tuple(old.unique_key) != tuple(new.unique_key):
        problems.append(
            Problem(
                None,
                f"{prefix}unique_key",
                f"the unique_key of buffered dataset {dataset!r} cannot change from "
                f"{list(old.unique_key)} to {list(new.unique_key)}: stored rows are deduplicated "
                "by it (publish a new dataset)",
            )
        )
    added = tuple((c, t) for c, t in new.columns if c not in old_types)
    return SchemaEvolution(added, tuple(widened), tuple(problems))


def _canonical(v: Any) -> Any:
    t = type(v)
    if t is int or t is str or v is None or t is bool or t is float:
        return v
    if isinstance(v, bytes):
        return {"b": v.hex()}
    if isinstance(v, datetime | date):
        return {"t": v.isoformat()}
    if isinstance(v, Decimal):
        return {"d": str(v.normalize())}
    return {"j": _ENCODER.encode(v)}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ROWS",
    "MAX_PROBLEMS",
    "MAX_TEXT_BYTES",
    "WIDENINGS",
    "DatasetSchema",
    "MalformedBatch",
    "ParsedBatch",
    "Problem",
    "SchemaEvolution",
    "Scope",
    "dedupe_key",
    "dedupe_keys",
    "inline_lines",
    "parse_batch",
    "schema_evolution",
]
