"""Block-range windows: the pure logic of ``range_splitter`` and ``range_aggregator``.

Ranges are half-open ``[start, end)`` (docs/architecture/ingest.md). Windows of size ``w`` are
aligned to multiples of ``w``: ``[k*w, (k+1)*w)``, so the same inputs always give the same
windows, whoever computes them.

* ``split(start, end, w)`` cuts a range at window boundaries (stateless).
* ``aggregate(state, start, end, w)`` folds one input range into an aggregator's state and
  returns the windows it completed. v1 assumes ordered inputs; the state is the end of the
  contiguous prefix covered so far (``next``) and the last input taken with the windows it
  completed:

  - ``[start, end)`` with ``start == next``: taken; ``next`` becomes ``end``; every window whose
    end lies in ``(old next, end]`` is complete and returned.
  - the same range as the last one taken: the same windows again (a retried task whose
    completion was lost re-announces them; event keys dedupe downstream).
  - ``end <= next`` otherwise: already covered; nothing (a replayed older event).
  - ``start > next`` (a gap: an input arrived before the ranges before it): ``Gap`` -- the
    caller refuses it retryably, so the task waits through its retries for the gap to fill and
    fails visibly when it never does.
  - ``start < next < end`` (a partial overlap): ``Overlap`` -- refused for good.
"""

from __future__ import annotations

from typing import Any

import attrs

Range = tuple[int, int]


class Gap(Exception):
    """The input starts after the covered prefix: an earlier range is missing."""


class Overlap(Exception):
    """The input partly overlaps the covered prefix."""


def check_range(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"range [{start}, {end}) must have 0 <= start < end")


def split(start: int, end: int, window: int) -> list[Range]:
    """``[start, end)`` cut at multiples of ``window``: consecutive, covering it exactly."""
    check_range(start, end)
    if window < 1:
        raise ValueError("window must be >= 1")
    out: list[Range] = []
    at = start
    while at < end:
        stop = min(end, (at // window + 1) * window)
        out.append((at, stop))
        at = stop
    return out


@attrs.frozen
class AggregatorState:
    """``next``: the end of the contiguous covered prefix; ``last``: the last input taken and
    ``last_windows`` the windows it completed."""

    next: int = 0
    last: Range | None = None
    last_windows: tuple[Range, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "last": list(self.last) if self.last else None,
            "last_windows": [list(w) for w in self.last_windows],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AggregatorState:
        last = doc.get("last")
        return cls(
            int(doc["next"]),
            (int(last[0]), int(last[1])) if last else None,
            tuple((int(a), int(b)) for a, b in doc.get("last_windows", [])),
        )


def aggregate(
    state: AggregatorState, start: int, end: int, window: int
) -> tuple[AggregatorState, list[Range]]:
    """Fold ``[start, end)`` into ``state``; returns the new state and the windows completed
    (empty when the input completed none or was already covered). Raises ``Gap``/``Overlap``."""
    check_range(start, end)
    if window < 1:
        raise ValueError("window must be >= 1")
    if state.last == (start, end):
        return state, list(state.last_windows)
    if end <= state.next:
        return state, []
    if start > state.next:
        raise Gap(f"waiting for [{state.next}, {start}) before [{start}, {end})")
    if start < state.next:
        raise Overlap(f"[{start}, {end}) overlaps the covered prefix ending at {state.next}")
    first = state.next // window + 1  # the first window end after the old prefix
    windows = [((k - 1) * window, k * window) for k in range(first, end // window + 1)]
    return AggregatorState(end, (start, end), tuple(windows)), windows
