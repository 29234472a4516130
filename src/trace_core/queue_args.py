"""Argument checks every Queue adapter applies the same way (pure; no I/O).

Keeping them here keeps the memory, Postgres and SQS adapters from drifting apart on what
they accept: the conformance suite pins the behaviour, this module is its one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

from trace_core.errors import PayloadTooLarge, ValidationFailed
from trace_core.ports import MAX_DEAD_LETTER_REASON, MAX_MESSAGE_BYTES


def check_bodies(bodies: Sequence[bytes]) -> list[bytes]:
    """The bodies as ``bytes``. Raises ``ValidationFailed`` for a non-sequence or a non-bytes
    body (``bodies[i]``), ``PayloadTooLarge`` for a body over ``MAX_MESSAGE_BYTES``; nothing
    is sent when any body fails."""
    if isinstance(bodies, bytes | bytearray | memoryview | str):
        raise ValidationFailed("bodies must be a sequence of bytes bodies", field="bodies")
    out: list[bytes] = []
    for i, body in enumerate(bodies):
        if not isinstance(body, bytes | bytearray | memoryview):
            raise ValidationFailed("a message body must be bytes", field=f"bodies[{i}]")
        out.append(bytes(body))
    for i, body in enumerate(out):
        if len(body) > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge(
                f"message body is {len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}",
                field=f"bodies[{i}]",
            )
    return out


def check_range(field: str, value: float, low: float, high: float) -> None:
    """Raises ``ValidationFailed`` unless ``low <= value <= high`` (booleans refused)."""
    if isinstance(value, bool) or not low <= value <= high:
        raise ValidationFailed(f"{field} must be between {low} and {high}", field=field)


def dead_letter_reason(reason: str) -> str:
    """``reason`` as every adapter stores it: printable text (other characters become ``?``),
    at most ``MAX_DEAD_LETTER_REASON`` characters, never empty."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(reason))
    return text[:MAX_DEAD_LETTER_REASON] or "unspecified"


__all__ = ["check_bodies", "check_range", "dead_letter_reason"]
