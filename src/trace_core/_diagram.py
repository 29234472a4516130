"""Draw a kernel transition table as a Mermaid state diagram.

Each state machine of the kernel (tasks, deliveries, partitions) keeps its legal moves in one
``TRANSITIONS`` table, ``(state, event) -> target``; a target may be a pair, the state the
move goes to while attempts are left and the one it goes to when none are. The diagrams in
``docs/architecture/`` are drawn from those tables by :func:`state_diagram`, so a doc cannot
show a move the code does not make. Pure: strings in, a string out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TypeVar

_State = TypeVar("_State", bound=enum.Enum)
_Event = TypeVar("_Event", bound=enum.Enum)


def state_diagram(
    transitions: Mapping[tuple[_State, _Event], _State | tuple[_State, _State]],
    *,
    initial: Iterable[str],
    final: Iterable[str],
) -> str:
    """The ``stateDiagram-v2`` text of ``transitions``, one edge per line, in table order.

    ``initial`` are the edges out of the start pseudo-state, as Mermaid writes what follows
    ``[*] -->`` (``"queued"`` or ``"committed: commit"``); ``final`` are the states with an
    edge to the end pseudo-state. A pair target draws two edges, labelled ``(attempts left)``
    and ``(none left)``."""
    lines = ["stateDiagram-v2"]
    lines += [f"    [*] --> {edge}" for edge in initial]
    for (state, event), target in transitions.items():
        if isinstance(target, tuple):
            lines.append(f"    {state.value} --> {target[0].value}: {event.value} (attempts left)")
            lines.append(f"    {state.value} --> {target[1].value}: {event.value} (none left)")
        else:
            lines.append(f"    {state.value} --> {target.value}: {event.value}")
    lines += [f"    {state} --> [*]" for state in final]
    return "\n".join(lines)
