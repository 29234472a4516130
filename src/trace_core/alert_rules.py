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

Not wired yet: the detector and ``alert_route`` operators that run these rules in a DAG (they
will write ``alert_events`` through a buffered sink and call ``DeliveryStore.enqueue``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
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

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> TransferThreshold:
        """From a DAG job's config. Raises ``ValidationFailed`` naming the field."""
        known = {"min_amount", "addresses", "severity", "amount_field", "from_field",
                 "to_field", "time_field", "key_fields"}  # fmt: skip
        for key in config:
            if key not in known:
                raise errors.ValidationFailed(f"unknown field {key!r}", field=f"config.{key}")
        if "min_amount" not in config:
            raise errors.ValidationFailed("min_amount is required", field="config.min_amount")
        addresses = config.get("addresses", [])
        if not isinstance(addresses, list):
            raise errors.ValidationFailed("a list of addresses", field="config.addresses")
        severity = config.get("severity", "warning")
        if severity not in SEVERITIES:
            raise errors.ValidationFailed(
                f"severity is one of {', '.join(SEVERITIES)}", field="config.severity"
            )
        key_fields = config.get("key_fields", ["transaction_hash", "log_index"])
        if not isinstance(key_fields, list) or not key_fields:
            raise errors.ValidationFailed("a non-empty list", field="config.key_fields")
        fields: dict[str, str] = {}
        for f in ("amount_field", "from_field", "to_field", "time_field"):
            value = config.get(f)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise errors.ValidationFailed("a field name", field=f"config.{f}")
                fields[f] = value
        return cls(
            name=name,
            min_amount=_amount(config["min_amount"], "config.min_amount"),
            addresses=frozenset(
                _address(a, f"config.addresses[{i}]") for i, a in enumerate(addresses)
            ),
            severity=severity,
            key_fields=tuple(str(k) for k in key_fields),
            **fields,
        )

    def detect(self, rows: Iterable[Mapping[str, Any]]) -> list[AlertEvent]:
        """The alert events of ``rows``, in row order. Raises ``ValidationFailed`` naming the
        row and field of a value that cannot be read."""
        events = []
        for i, row in enumerate(rows):
            where = f"rows[{i}]"
            try:
                amount = _amount(row[self.amount_field], f"{where}.{self.amount_field}")
                sender = _address(row[self.from_field], f"{where}.{self.from_field}")
                receiver = _address(row[self.to_field], f"{where}.{self.to_field}")
                when = _time(row[self.time_field], f"{where}.{self.time_field}")
                key_values = [row[k] for k in self.key_fields]
            except KeyError as exc:
                raise errors.ValidationFailed(
                    f"missing field {exc.args[0]!r}", field=f"{where}.{exc.args[0]}"
                ) from None
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
                        **{k: row[k] for k in self.key_fields},
                    },
                )
            )
        return events


@attrs.frozen
class Route:
    """Which events go where, and how old an event may be to still be sent."""

    name: str
    destinations: tuple[str, ...]
    max_delivery_age: timedelta | None = None
    #: Only events at least this severe.
    min_severity: str = "info"

    def matches(self, event: AlertEvent) -> bool:
        return SEVERITIES.index(event.severity) >= SEVERITIES.index(self.min_severity)


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


__all__ = [
    "SEVERITIES",
    "AlertEvent",
    "Route",
    "Routed",
    "TransferThreshold",
    "alert_key",
    "route_event",
]
