"""Alert detection and routing rules, pure: what a detector emits and where a route sends it.

Theory of operation
-------------------
A *detector* reads rows of a dataset and emits *alert events*: append-only facts ("would have
alerted") with a contextual ``event_time`` taken from the row (the block timestamp, never the
clock) and a deterministic ``alert_key``, so re-running a detector over the same rows (a retry,
a backfill) yields the same events. The built-in detector is ``TransferThreshold``: an ERC-20
transfer of at least ``min_amount`` from or to one of ``addresses`` (all addresses when none
are given).

A *route* (``Route``) filters events and names destinations; ``route_event`` says, per
destination, whether the delivery starts ``due`` or ``suppressed`` by the staleness gate
(``max_delivery_age`` against ``event_time``, ``trace_core.delivery.decide_create``). A
backfill over old blocks therefore records would-have-alerted deliveries and sends nothing;
there is no live/backfill mode.

A second rule, ``FieldAbove``, alerts on any numeric column at or above a threshold (a gas
spike: ``gas_used`` of block rows). ``rule_from_config`` builds either from a DAG job's config.

The operators that run these rules in a DAG are ``trace_sdk.alerts``: the detector writes each
event as one row of the buffered ``alert_events`` dataset (``event_row``, ``ALERT_EVENTS_SCHEMA``,
unique on ``alert_key``), and ``alert_route`` reads those rows back (``event_from_row``), matches
``Route``s (severity, label selector) and plans one delivery per destination
(``plan_deliveries``); the staleness gate is applied where the delivery is recorded, at the
database's clock (``trace_lite.delivery.DeliveryStore``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from trace_core import errors
from trace_core.delivery import DeliveryState, decide_create

SEVERITIES = ("info", "warning", "error", "critical")
_HEX_ADDRESS = frozenset("0123456789abcdef")


@attrs.frozen
class AlertEvent:
    """One would-have-alerted fact."""

    #: Deterministic: the detector's name and the source row's key.
    alert_key: str
    #: Contextual time from the row (e.g. the block timestamp).
    event_time: datetime
    summary: str
    severity: str
    #: What the alert is about (the source row's fields the payload carries).
    details: Mapping[str, Any]
    #: Free-form ``name -> value`` labels routes select on (``Route.labels``).
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: The name of the detector (rule) that raised it.
    detector: str = ""


def _address(value: object, field: str) -> str:
    text = str(value).lower()
    if len(text) != 42 or not text.startswith("0x") or not set(text[2:]) <= _HEX_ADDRESS:
        raise errors.ValidationFailed(f"not an address: {value!r}", field=field)
    return text


def _amount(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise errors.ValidationFailed("an amount is an integer or a decimal string", field=field)
    text = str(value)
    if not text.isdigit():
        raise errors.ValidationFailed(f"not a non-negative integer: {value!r}", field=field)
    return int(text)


def _time(value: object, field: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise errors.ValidationFailed(f"not a time: {value!r}", field=field)


def _only_known(doc: Mapping[str, Any], known: Iterable[str], field: str) -> None:
    """Raises ``ValidationFailed`` naming the first key of ``doc`` not in ``known``."""
    known = frozenset(known)
    for key in doc:
        if key not in known:
            raise errors.ValidationFailed(f"unknown field {key!r}", field=f"{field}.{key}")


def _severity(value: object, field: str) -> str:
    """``value`` if it is one of ``SEVERITIES``. Raises ``ValidationFailed`` naming ``field``
    (the message names its last part: ``severity``, ``min_severity``)."""
    if value not in SEVERITIES:
        name = field.rpartition(".")[2]
        raise errors.ValidationFailed(f"{name} is one of {', '.join(SEVERITIES)}", field=field)
    return str(value)


def _field_name(value: object, field: str) -> str:
    """``value`` if it names a row field. Raises ``ValidationFailed`` naming ``field``."""
    if not isinstance(value, str) or not value:
        raise errors.ValidationFailed("a field name", field=field)
    return value


def _key_fields(config: Mapping[str, Any], default: Sequence[str]) -> tuple[str, ...]:
    """``config.key_fields`` (the fields of a row's alert key), or ``default``."""
    key_fields = config.get("key_fields", list(default))
    if not isinstance(key_fields, list) or not key_fields:
        raise errors.ValidationFailed("a non-empty list", field="config.key_fields")
    return tuple(str(k) for k in key_fields)


@contextlib.contextmanager
def _missing_fields(field: str) -> Iterator[None]:
    """Turn a ``KeyError`` of a row lookup into ``ValidationFailed`` naming ``field.<key>``."""
    try:
        yield
    except KeyError as exc:
        raise errors.ValidationFailed(
            f"missing field {exc.args[0]!r}", field=f"{field}.{exc.args[0]}"
        ) from None


def _plain(value: object) -> object:
    """A row value as the alert's payload and key carry it: bytes as ``0x`` hex, times in ISO
    8601, integers too large for JSON numbers' safe range as decimal strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return str(value)
    if isinstance(value, int | str | float | bool) or value is None:
        return value
    return str(value)


_LABEL_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")


def labels_from(value: object, field: str) -> dict[str, str]:
    """Labels (``{name: value}``, names like ``team`` or ``chain.id``, values strings of at most
    200 characters). Raises ``ValidationFailed`` naming the field."""
    if not isinstance(value, Mapping):
        raise errors.ValidationFailed("labels are a mapping of name to value", field=field)
    if len(value) > 32:
        raise errors.ValidationFailed("at most 32 labels", field=field)
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_RE.match(k):
            raise errors.ValidationFailed(f"a label name matches {_LABEL_RE.pattern}", field=field)
        if not isinstance(v, str) or len(v) > 200:
            raise errors.ValidationFailed(
                "a label value is a string (<= 200)", field=f"{field}.{k}"
            )
        out[k] = v
    return out


def alert_key(detector: str, key_values: Sequence[object]) -> str:
    """SHA-256 of the detector's name and the row's key values, length-prefixed."""
    digest = hashlib.sha256(b"trace.alert.v1")
    for part in (detector, *(str(v) for v in key_values)):
        data = part.encode()
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.hexdigest()


@attrs.frozen
class TransferThreshold:
    """ERC-20 transfers of at least ``min_amount`` from or to ``addresses``."""

    name: str
    min_amount: int
    addresses: frozenset[str] = frozenset()
    severity: str = "warning"
    amount_field: str = "value"
    from_field: str = "from_address"
    to_field: str = "to_address"
    time_field: str = "block_timestamp"
    #: The fields that identify a row (its alert key).
    key_fields: tuple[str, ...] = ("transaction_hash", "log_index")
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> TransferThreshold:
        """From a DAG job's config. Raises ``ValidationFailed`` naming the field."""
        known = {"min_amount", "addresses", "severity", "amount_field", "from_field",
                 "to_field", "time_field", "key_fields", "labels"}  # fmt: skip
        labels = labels_from(config.get("labels", {}), "config.labels")
        _only_known(config, known, "config")
        if "min_amount" not in config:
            raise errors.ValidationFailed("min_amount is required", field="config.min_amount")
        addresses = config.get("addresses", [])
        if not isinstance(addresses, list):
            raise errors.ValidationFailed("a list of addresses", field="config.addresses")
        severity = _severity(config.get("severity", "warning"), "config.severity")
        key_fields = _key_fields(config, ["transaction_hash", "log_index"])
        fields: dict[str, str] = {}
        for f in ("amount_field", "from_field", "to_field", "time_field"):
            value = config.get(f)
            if value is not None:
                fields[f] = _field_name(value, f"config.{f}")
        return cls(
            name=name,
            labels=labels,
            min_amount=_amount(config["min_amount"], "config.min_amount"),
            addresses=frozenset(
                _address(a, f"config.addresses[{i}]") for i, a in enumerate(addresses)
            ),
            severity=severity,
            key_fields=key_fields,
            **fields,
        )

    def detect(self, rows: Iterable[Mapping[str, Any]]) -> list[AlertEvent]:
        """The alert events of ``rows``, in row order. Raises ``ValidationFailed`` naming the
        row and field of a value that cannot be read."""
        events = []
        for i, row in enumerate(rows):
            where = f"rows[{i}]"
            with _missing_fields(where):
                amount = _amount(row[self.amount_field], f"{where}.{self.amount_field}")
                sender = _address(row[self.from_field], f"{where}.{self.from_field}")
                receiver = _address(row[self.to_field], f"{where}.{self.to_field}")
                when = _time(row[self.time_field], f"{where}.{self.time_field}")
                key_values = [_plain(row[k]) for k in self.key_fields]
            if amount < self.min_amount:
                continue
            if self.addresses and not {sender, receiver} & self.addresses:
                continue
            events.append(
                AlertEvent(
                    alert_key=alert_key(self.name, key_values),
                    event_time=when,
                    summary=f"{self.name}: transfer of {amount} from {sender} to {receiver}",
                    severity=self.severity,
                    details={
                        "amount": str(amount),
                        "from": sender,
                        "to": receiver,
                        **{k: _plain(row[k]) for k in self.key_fields},
                    },
                    labels=self.labels,
                    detector=self.name,
                )
            )
        return events


@attrs.frozen
class FieldAbove:
    """Rows whose numeric ``field`` is at least ``min_value`` (a gas spike: ``gas_used`` of
    block rows)."""

    name: str
    field: str
    min_value: int
    severity: str = "warning"
    time_field: str = "timestamp"
    key_fields: tuple[str, ...] = ("block_number",)
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> FieldAbove:
        """From a DAG job's config. Raises ``ValidationFailed`` naming the field."""
        known = {"field", "min_value", "severity", "time_field", "key_fields", "labels"}
        _only_known(config, known, "config")
        for required in ("field", "min_value"):
            if required not in config:
                raise errors.ValidationFailed(f"{required} is required", field=f"config.{required}")
        field = _field_name(config["field"], "config.field")
        severity = _severity(config.get("severity", "warning"), "config.severity")
        time_field = _field_name(config.get("time_field", "timestamp"), "config.time_field")
        key_fields = _key_fields(config, ["block_number"])
        return cls(
            name=name,
            field=field,
            min_value=_amount(config["min_value"], "config.min_value"),
            severity=severity,
            time_field=time_field,
            key_fields=key_fields,
            labels=labels_from(config.get("labels", {}), "config.labels"),
        )

    def detect(self, rows: Iterable[Mapping[str, Any]]) -> list[AlertEvent]:
        """The alert events of ``rows``, in row order. Raises ``ValidationFailed`` naming the
        row and field of a value that cannot be read."""
        events = []
        for i, row in enumerate(rows):
            where = f"rows[{i}]"
            with _missing_fields(where):
                value = _amount(row[self.field], f"{where}.{self.field}")
                when = _time(row[self.time_field], f"{where}.{self.time_field}")
                key_values = [_plain(row[k]) for k in self.key_fields]
            if value < self.min_value:
                continue
            keys = {k: v for k, v in zip(self.key_fields, key_values, strict=True)}
            events.append(
                AlertEvent(
                    alert_key=alert_key(self.name, key_values),
                    event_time=when,
                    summary=f"{self.name}: {self.field} {value} >= {self.min_value} at {keys}",
                    severity=self.severity,
                    details={self.field: str(value), **keys},
                    labels=self.labels,
                    detector=self.name,
                )
            )
        return events


Rule = TransferThreshold | FieldAbove
#: ``config.rule`` of a detector job -> the rule class.
RULES: Mapping[str, type[TransferThreshold] | type[FieldAbove]] = {
    "transfer_threshold": TransferThreshold,
    "field_above": FieldAbove,
}


def rule_from_config(name: str, config: Mapping[str, Any]) -> Rule:
    """The rule ``config["rule"]`` names, built from the rest of ``config``. Raises
    ``ValidationFailed`` naming the field."""
    kind = config.get("rule")
    if kind not in RULES:
        raise errors.ValidationFailed(f"rule is one of {', '.join(RULES)}", field="config.rule")
    return RULES[str(kind)].from_config(name, {k: v for k, v in config.items() if k != "rule"})


# --- the alert_events dataset ---------------------------------------------------------------

#: The columns of the ``alert_events`` dataset (a buffered, multi-writer ``postgres_table``).
ALERT_EVENTS_SCHEMA: Mapping[str, str] = {
    "alert_key": "string",
    "detector": "string",
    "event_time": "timestamp",
    "severity": "string",
    "summary": "string",
    "labels": "json",
    "details": "json",
}
#: Its unique key: a detector retried over the same rows stores each event once.
ALERT_EVENTS_UNIQUE_KEY: tuple[str, ...] = ("alert_key",)


def event_row(event: AlertEvent) -> dict[str, Any]:
    """``event`` as one JSON row of ``alert_events``."""
    return {
        "alert_key": event.alert_key,
        "detector": event.detector,
        "event_time": event.event_time.astimezone(UTC).isoformat(),
        "severity": event.severity,
        "summary": event.summary,
        "labels": dict(event.labels),
        "details": {k: _plain(v) for k, v in event.details.items()},
    }


def event_from_row(row: Mapping[str, Any], field: str = "row") -> AlertEvent:
    """An ``alert_events`` row (as JSON or as read from its table) back as an event. Raises
    ``ValidationFailed`` naming the field."""
    with _missing_fields(field):
        key, severity = row["alert_key"], row["severity"]
        details = row.get("details") or {}
        labels = labels_from(row.get("labels") or {}, f"{field}.labels")
        when = _time(row["event_time"], f"{field}.event_time")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{64}", key):
        raise errors.ValidationFailed("alert_key is 64 hex digits", field=f"{field}.alert_key")
    severity = _severity(severity, f"{field}.severity")
    if not isinstance(details, Mapping):
        raise errors.ValidationFailed("details is a mapping", field=f"{field}.details")
    return AlertEvent(
        alert_key=key,
        event_time=when,
        summary=str(row.get("summary") or ""),
        severity=severity,
        details=dict(details),
        labels=labels,
        detector=str(row.get("detector") or ""),
    )


@attrs.frozen
class Route:
    """Which events go where, and how old an event may be to still be sent."""

    name: str
    destinations: tuple[str, ...]
    max_delivery_age: timedelta | None = None
    #: Only events at least this severe.
    min_severity: str = "info"
    #: Label selector: only events carrying every one of these labels with this value.
    labels: Mapping[str, str] = attrs.field(factory=dict)

    def matches(self, event: AlertEvent) -> bool:
        if SEVERITIES.index(event.severity) < SEVERITIES.index(self.min_severity):
            return False
        return all(event.labels.get(k) == v for k, v in self.labels.items())

    @classmethod
    def from_config(cls, doc: object, field: str) -> Route:
        """One entry of an ``alert_route`` job's ``config.routes``: ``{name, destinations,
        min_severity?, max_delivery_age?, labels?}``; ``max_delivery_age`` is seconds or a
        duration like ``15m``, ``2h``, ``1d``. Raises ``ValidationFailed`` naming the field."""
        if not isinstance(doc, Mapping):
            raise errors.ValidationFailed("a route is a mapping", field=field)
        known = {"name", "destinations", "min_severity", "max_delivery_age", "labels"}
        _only_known(doc, known, field)
        name = doc.get("name")
        if not isinstance(name, str) or not _ROUTE_RE.match(name):
            raise errors.ValidationFailed(
                f"a route name matches {_ROUTE_RE.pattern}", field=f"{field}.name"
            )
        dests = doc.get("destinations")
        if not isinstance(dests, list) or not dests:
            raise errors.ValidationFailed(
                "a non-empty list of destination names", field=f"{field}.destinations"
            )
        for i, d in enumerate(dests):
            if not isinstance(d, str) or not _ROUTE_RE.match(d):
                raise errors.ValidationFailed(
                    "a destination name", field=f"{field}.destinations[{i}]"
                )
        severity = _severity(doc.get("min_severity", "info"), f"{field}.min_severity")
        age = doc.get("max_delivery_age")
        return cls(
            name=name,
            destinations=tuple(dict.fromkeys(dests)),
            max_delivery_age=None if age is None else duration(age, f"{field}.max_delivery_age"),
            min_severity=severity,
            labels=labels_from(doc.get("labels", {}), f"{field}.labels"),
        )


_ROUTE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DURATION_RE = re.compile(r"^([0-9]{1,9})(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: object, field: str) -> timedelta:
    """Seconds (an integer > 0) or ``<n>s|m|h|d``. Raises ``ValidationFailed``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 10**9:
        return timedelta(seconds=value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)) and int(m.group(1)) > 0:
        return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    raise errors.ValidationFailed("a duration: seconds, or like 15m, 2h, 1d", field=field)


def routes_from_config(value: object, field: str = "config.routes") -> list[Route]:
    """``config.routes`` of an ``alert_route`` job (a non-empty list, names unique)."""
    if not isinstance(value, list) or not value:
        raise errors.ValidationFailed("a non-empty list of routes", field=field)
    routes = [Route.from_config(r, f"{field}[{i}]") for i, r in enumerate(value)]
    seen: set[str] = set()
    for i, r in enumerate(routes):
        if r.name in seen:
            raise errors.ValidationFailed(f"route {r.name!r} twice", field=f"{field}[{i}].name")
        seen.add(r.name)
    return routes


@attrs.frozen
class Routed:
    """One delivery a route produces: the destination and the state it starts in."""

    destination: str
    state: DeliveryState
    suppressed_reason: str | None


def route_event(event: AlertEvent, route: Route, *, now: datetime) -> list[Routed]:
    """The deliveries ``route`` makes of ``event`` (none when it does not match): ``due``, or
    ``suppressed`` with the reason when the event is older than ``max_delivery_age``."""
    if not route.matches(event):
        return []
    state, reason = decide_create(
        event_time=event.event_time, now=now, max_delivery_age=route.max_delivery_age
    )
    return [Routed(d, state, reason) for d in route.destinations]


@attrs.frozen
class Planned:
    """One delivery ``alert_route`` asks to record: the event, the route and one destination
    (by name, resolved in the task's org where it is recorded)."""

    alert_key: str
    route: str
    destination: str
    event_time: datetime
    max_delivery_age: timedelta | None
    #: The alert as the receiver gets it (``render`` in ``trace_lite.webhook_sender``).
    payload: Mapping[str, Any]


def alert_payload(event: AlertEvent) -> dict[str, Any]:
    """What a delivery carries of its event."""
    row = event_row(event)
    return {k: row[k] for k in ("alert_key", "detector", "severity", "summary", "labels",
                                "details", "event_time")}  # fmt: skip


def plan_deliveries(events: Iterable[AlertEvent], routes: Sequence[Route]) -> list[Planned]:
    """For every event and every route that matches it, one delivery per destination, in
    event then route order. Deterministic: the same events and routes plan the same list."""
    return [
        Planned(e.alert_key, r.name, d, e.event_time, r.max_delivery_age, alert_payload(e))
        for e in events
        for r in routes
        if r.matches(e)
        for d in r.destinations
    ]


__all__ = [
    "ALERT_EVENTS_SCHEMA",
    "ALERT_EVENTS_UNIQUE_KEY",
    "RULES",
    "SEVERITIES",
    "AlertEvent",
    "FieldAbove",
    "Planned",
    "Route",
    "Routed",
    "Rule",
    "TransferThreshold",
    "alert_key",
    "alert_payload",
    "duration",
    "event_from_row",
    "event_row",
    "labels_from",
    "plan_deliveries",
    "route_event",
    "routes_from_config",
    "rule_from_config",
]
