"""The child process of ``cryo_ingest``: one extract with ``cryo.freeze``, checked, then
``os._exit``.

Run as ``python .../trace_sdk/_cryo_child.py`` (standard library and cryo only: it never imports
the SDK), started ahead of need (``trace_sdk._warm_child``): it imports Cryo,
names itself ``trace-cryo-idle`` (``/proc/PID/comm``), then reads its one request, a JSON line
on stdin (``start``, ``end``, ``chunk``, ``rpc``, ``out``, ``datatypes``, ``budget``), and
renames itself ``trace-cryo-run``; EOF instead of a request (the worker exited) ends it. One
``freeze`` extracts ``[start, end)`` in Cryo chunks of ``chunk`` blocks (default: the whole
range), which Cryo extracts concurrently inside this one process; the chunks are ``pieces``:
``[start, start + chunk)``, ... , the last cut at ``end``. It prints one JSON line on stdout:
``{"ok": true, "pieces": [{"start", "end", "files": {datatype: path}}], "throttled": N,
"seconds": {...}}`` or ``{"ok": false, "kind": "past_head" | "unreachable" | "throttled" |
"errored" | "incomplete", "message"}``, and always leaves through ``os._exit`` (cryo 0.3.2
crashes at interpreter shutdown in about 1% of runs, after its data is written). It checks what
``freeze`` does not raise: ``n_errored`` must be 0, at least one job completed, and exactly one
file per piece and datatype, named for the piece, and no other file (the operator then checks
the rows of each file: ``trace_sdk.ingest.check_rows``). It dies with its parent
(``PR_SET_PDEATHSIG`` on Linux): a worker killed mid-extract leaves no extract behind.

RPC budget (``req["budget"]``, the attempt's worker-pool slot's, see ``trace_sdk.ingest``):
``requests_per_second`` and ``max_concurrent_requests`` go to ``cryo.freeze``, whose client also
retries a JSON-RPC rate-limit answer (code 429 or -32005) ``max_retries`` times after
``initial_backoff_ms``. Cryo does not retry an HTTP 429 or 5xx whose body is not JSON-RPC: it
counts the chunk as errored.

The child runs ``freeze`` at once (no request before it). When the extract fails, it asks
``eth_blockNumber`` why: an answer of HTTP 429 or 5xx (or a JSON-RPC rate-limit error) means
throttled: the child sleeps (``initial_backoff_ms``, doubled each time, at most
``MAX_BACKOFF_S``), asks ``eth_blockNumber`` again (one request a round while the throttle
lasts), and once it answers runs ``freeze`` again into the same directory, where Cryo skips the
datatypes already written; after ``throttle_retries`` rounds it answers ``throttled``. No answer
means ``unreachable``; a head below the range's end means ``past_head`` (Cryo fails a chunk that
ends past the head); a normal answer means the extract runs once more at once (the throttling
may have ended in between), and a second failure answers ``errored``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: The longest sleep between two extract rounds of a throttled endpoint.
MAX_BACKOFF_S = 30.0
#: JSON-RPC error codes providers use for "rate limited" (Alchemy: 429; Infura: -32005).
RATE_LIMIT_CODES = frozenset({429, -32005})


class Throttled(Exception):
    """The endpoint answered HTTP 429 or 5xx, or a JSON-RPC rate-limit error."""


def _head(rpc: str) -> int:
    """``eth_blockNumber``. Raises ``Throttled``, or ``URLError``/``OSError``/``ValueError``
    (unreachable or not a JSON-RPC answer)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
    req = urllib.request.Request(
        rpc, body.encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise Throttled(f"HTTP {exc.code}") from None
        raise
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and error.get("code") in RATE_LIMIT_CODES:
        raise Throttled(f"JSON-RPC error {error.get('code')}")
    return int(doc["result"], 16)


def _freeze(req: dict[str, Any], rpc: str, out: Path) -> dict[str, Any]:
    import cryo  # type: ignore[import-untyped]

    start, end, budget = int(req["start"]), int(req["end"]), req["budget"]
    chunk = _chunk(req)
    summary: dict[str, Any] = cryo.freeze(
        list(req["datatypes"]),
        blocks=[f"{start}:{end}"],  # cryo's block range is end-exclusive, like Trace's
        rpc=rpc,
        output_dir=str(out),
        chunk_size=chunk,  # cryo extracts the chunks concurrently, one file each
        network_name="chain",
        verbose=False,
        no_report=True,
        inner_request_size=min(chunk, 100),
        requests_per_second=budget.get("requests_per_second"),
        max_concurrent_requests=budget.get("max_concurrent_requests"),
        max_retries=int(budget["max_retries"]),
        initial_backoff=int(budget["initial_backoff_ms"]),
    )
    return summary


def _chunk(req: dict[str, Any]) -> int:
    """Blocks per Cryo chunk: ``req["chunk"]``, else the whole range (one chunk)."""
    return int(req.get("chunk") or int(req["end"]) - int(req["start"]))


def pieces(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """Cryo's chunks of ``[start, end)``: ``chunk`` blocks each from ``start``, the last one
    cut at ``end`` (``trace_sdk.ingest.pieces`` is the same rule)."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]


def run(req: dict[str, Any]) -> dict[str, Any]:
    start, end, rpc = int(req["start"]), int(req["end"]), str(req["rpc"])
    out = Path(req["out"])
    datatypes: list[str] = list(req["datatypes"])
    budget = req["budget"]
    backoff_s = int(budget["initial_backoff_ms"]) / 1000
    throttled = completed = 0
    began = time.monotonic()
    freeze_s = 0.0
    rerun = False  # a failed extract whose endpoint then answered normally ran again
    while True:
        try:
            if throttled:  # waiting out a throttle: one small request a round, not an extract
                _head(rpc)
            started = time.monotonic()
            summary: dict[str, Any] | None
            failure: str | None
            try:
                summary = _freeze(req, rpc, out)
            except Exception as exc:  # cryo raises TypeError("failed") when unreachable
                summary, failure = None, f"{type(exc).__name__}: {exc}"
            else:
                completed += int(summary.get("n_completed", 0))
                failure = None if summary.get("n_errored") == 0 else f"cryo: {summary}"
            freeze_s += time.monotonic() - started
            if failure is None:
                break
            # why did it fail? throttled (raises), unreachable, past the head, or else
            try:
                head = _head(rpc)
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                return {"ok": False, "kind": "unreachable", "message": f"eth_blockNumber: {exc}"}
            if end - 1 > head:
                return {
                    "ok": False,
                    "kind": "past_head",
                    "message": f"range [{start}, {end}) ends past the chain head {head}",
                }
            if rerun:
                kind = "errored" if summary is not None else "unreachable"
                return {"ok": False, "kind": kind, "message": failure}
            rerun = True
        except Throttled as exc:
            if throttled >= int(budget["throttle_retries"]):
                return {
                    "ok": False,
                    "kind": "throttled",
                    "message": f"{exc} after {throttled} backoffs",
                }
            throttled += 1
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
    # blocks and transactions are one cryo job: at least one job ran
    if completed < 1:
        return {"ok": False, "kind": "incomplete", "message": "cryo completed no job"}
    checked = time.monotonic()
    found: list[dict[str, Any]] = []
    for s, e in pieces(start, end, _chunk(req)):
        # cryo names files with an INCLUSIVE end: [s, e) is ..._{s}_to_{e - 1}
        paths = {d: out / f"chain__{d}__{s:08d}_to_{e - 1:08d}.parquet" for d in datatypes}
        for path in paths.values():
            if not path.is_file():
                return {"ok": False, "kind": "incomplete", "message": f"missing {path.name}"}
        found.append({"start": s, "end": e, "files": {d: str(p) for d, p in paths.items()}})
    unexpected = sorted(p.name for p in out.iterdir() if p.is_file())
    if len(unexpected) != len(datatypes) * len(found):
        return {"ok": False, "kind": "incomplete", "message": f"unexpected files {unexpected}"}
    done = time.monotonic()
    seconds = {"run": done - began, "freeze": freeze_s, "check": done - checked}
    return {
        "ok": True,
        "pieces": found,
        "throttled": throttled,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the worker) dies, so a worker killed
    mid-extract leaves no extract running; then check the parent did not die first."""
    parent = os.getppid()
    if _LIBC is not None:
        import signal

        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)


def name_self(name: bytes) -> None:
    """Set this process's name (``/proc/PID/comm``, at most 15 bytes) on Linux."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, name[:15], 0, 0, 0)


#: prctl options: the signal this process gets when its parent thread dies; its name.
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_LIBC: Any = None
if sys.platform == "linux":
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)


def main() -> None:
    die_with_parent()
    name_self(b"trace-cryo-idle")
    import cryo  # noqa: F401  (warm: the request pays no import)

    line = sys.stdin.buffer.readline()
    if not line.strip():
        os._exit(0)  # the worker closed our stdin: never used
    name_self(b"trace-cryo-run")
    code = 0
    try:
        answer = run(json.loads(line))
    except Exception as exc:
        answer, code = (
            {"ok": False, "kind": "errored", "message": f"{type(exc).__name__}: {exc}"},
            1,
        )
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
