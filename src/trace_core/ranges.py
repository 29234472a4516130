"""Block-range windows: the pure logic of ``range_splitter`` and ``range_aggregator``.

Ranges are half-open ``[start, end)`` (docs/architecture/ingest.md). Windows of size ``w`` are
aligned to multiples of ``w``: ``[k*w, (k+1)*w)``, so the same inputs always give the same
windows, whoever computes them.

* ``split(start, end, w)`` cuts a range at window boundaries (stateless).
* ``aggregate(state, start, end, w)`` folds one input range into an aggregator's state and
  returns the windows to announce. v1 assumes ordered inputs; the state is the end of the
  contiguous prefix covered so far (``next``, starting at ``origin``) and the windows announced
  again lately with the input that did it:

  - ``[start, end)`` with ``start == next``: fresh input, taken; ``next`` becomes ``end``; every
    window whose end lies in ``(old next, end]`` is complete and returned.
  - ``end <= next`` (a range already covered comes again: its data was committed again -- a
    reorged range re-extracted with ``replace`` -- or a retried task whose completion was
    lost): every announced window holding part of it (from ``origin``, ending at or below
    ``next``) is returned again, so its downstream reruns on the data committed now. Once per
    committing task: when ``source`` names the producer task of the input event and the
    consuming task, a window already announced again for that producer by *another* consuming
    task (two chunks of one re-extract in one window) is not returned again; the same
    consuming task (its retry) gets it again. The state remembers the last ``KEEP_AGAIN``
    such announcements.
  - ``start > next`` (a gap: an input arrived before the ranges before it): ``Gap`` -- the
    caller refuses it retryably, so the task waits through its retries for the gap to fill and
    fails visibly when it never does.
  - ``start < next < end`` (a partial overlap): ``Overlap`` -- refused for good.
"""

from __future__ import annotations

from typing import Any

import attrs

Range = tuple[int, int]

KEEP_AGAIN = 256
"""How many windows announced again (with their producer and consumer) the state keeps."""


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
class Again:
    """Window ``window`` announced again for input event of task ``producer``, by the
    consuming task ``consumer``."""

    window: Range
    producer: str
    consumer: str


@attrs.frozen
class AggregatorState:
    """``next``: the end of the contiguous covered prefix; ``again``: the windows announced
    again lately (oldest first, at most ``KEEP_AGAIN``)."""

    next: int = 0
    again: tuple[Again, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "again": [[*a.window, a.producer, a.consumer] for a in self.again],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AggregatorState:
        return cls(
            int(doc["next"]),
            tuple(Again((int(s), int(e)), str(p), str(c)) for s, e, p, c in doc.get("again", [])),
        )


def _covered_windows(start: int, end: int, window: int, origin: int, upto: int) -> list[Range]:
    """The windows holding part of ``[start, end)``, from ``origin`` and ending by ``upto``."""
    first = max(start, origin) // window
    return [
        (k * window, (k + 1) * window)
        for k in range(first, -(-end // window))
        if (k + 1) * window <= upto
    ]


def aggregate(
    state: AggregatorState,
    start: int,
    end: int,
    window: int,
    *,
    origin: int = 0,
    source: tuple[str, str] | None = None,
) -> tuple[AggregatorState, list[Range]]:
    """Fold ``[start, end)`` into ``state``; returns the new state and the windows to announce
    (empty when the input completed none). ``source``: ``(producer task of the input event,
    consuming task)``, when known. Raises ``Gap``/``Overlap``."""
    check_range(start, end)
    if window < 1:
        raise ValueError("window must be >= 1")
    if end <= state.next:
        return _again(state, _covered_windows(start, end, window, origin, state.next), source)
    if start > state.next:
        raise Gap(f"waiting for [{state.next}, {start}) before [{start}, {end})")
    if start < state.next:
        raise Overlap(f"[{start}, {end}) overlaps the covered prefix ending at {state.next}")
    first = state.next // window + 1  # the first window end after the old prefix
    windows = [((k - 1) * window, k * window) for k in range(first, end // window + 1)]
    return attrs.evolve(state, next=end), windows


def _again(
    state: AggregatorState, windows: list[Range], source: tuple[str, str] | None
) -> tuple[AggregatorState, list[Range]]:
    """``windows`` announced again, once per producer (module docstring)."""
    if source is None or not windows:
        return state, windows
    producer, consumer = source
    done = {a.window for a in state.again if a.producer == producer and a.consumer != consumer}
    out = [w for w in windows if w not in done]
    mine = {Again(w, producer, consumer) for w in out}
    if mine <= set(state.again):
        return state, out
    kept = tuple(a for a in state.again if a.window not in set(out) or a.producer != producer)
    again = (kept + tuple(sorted(mine, key=lambda a: a.window)))[-KEEP_AGAIN:]
    return attrs.evolve(state, again=again), out
