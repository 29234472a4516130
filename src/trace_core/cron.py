"""Cron expressions for DAG triggers: a pure syntax check.

``cron_problem`` accepts the standard 5 fields (minute hour day-of-month month day-of-week:
``*``, ``N``, ``N-M``, each with an optional ``/step``, comma lists, ``jan``..``dec``,
``sun``..``sat``, day of week 0-7) and the ``@`` macros. It only checks syntax: computing fire
times is the trigger runtime's job (croniter), and a property test checks that croniter accepts
every expression accepted here.
"""

from __future__ import annotations

import re
from typing import Final

_CRON_FIELDS: Final[tuple[tuple[str, int, int, dict[str, int]], ...]] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(
                ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
            )
        },
    ),
    (
        "day of week",
        0,
        7,
        {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
    ),
)
#: The longest expression checked (so a message never echoes a huge one).
MAX_LENGTH: Final = 200
CRON_MACROS: Final = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_CRON_ITEM = re.compile(r"^(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?$")


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a standard 5-field cron expression (or macro), or None if it is.

    Fields: ``* | N | N-M`` each with an optional ``/step``, comma lists, month and weekday
    names (``jan``, ``mon``), day of week 0-7 (0 and 7 are Sunday). Computing fire times is the
    trigger runtime's job (croniter); every expression accepted here croniter accepts too.
    """
    if len(expr) > MAX_LENGTH:
        return f"a cron expression is at most {MAX_LENGTH} characters"
    text = expr.strip().lower()
    if text in CRON_MACROS:
        return None
    fields = text.split()
    if len(fields) != 5:
        return f"a cron expression has 5 fields (minute hour day month weekday), not {len(fields)}"
    for raw, (label, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in raw.split(","):
            m = _CRON_ITEM.match(item)
            if not m:
                return f"{label} field {raw!r}: {item!r} is not *, N, N-M or one of those /step"
            span, step = m.group(1), m.group(2)
            if step is not None and int(step) == 0:
                return f"{label} field {raw!r}: a step must be at least 1"
            if span == "*":
                continue
            ends = []
            for part in span.split("-"):
                value = names.get(part) if not part.isdigit() else int(part)
                if value is None or not low <= value <= high:
                    return f"{label} field {raw!r}: {part!r} is outside {low}-{high}"
                ends.append(value)
            if len(ends) == 2 and ends[0] > ends[1]:
                return f"{label} field {raw!r}: range {span!r} runs backwards"
            if step is not None and len(ends) == 1:
                return f"{label} field {raw!r}: a step needs * or a range before it"
    return None


__all__ = ["CRON_MACROS", "MAX_LENGTH", "cron_problem"]
