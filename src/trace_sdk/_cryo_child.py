"""The child process of ``cryo_ingest``: one ``cryo.freeze`` call, checked, then ``os._exit``.

Run as ``python .../trace_sdk/_cryo_child.py '<json request>'`` (standard library, duckdb and
cryo only: it never imports the SDK). It prints one JSON line on stdout:
``{"ok": true, "files": {datatype: {"path", "rows"}}, "head": N}`` or ``{"ok": false, "kind":
"past_head" | "unreachable" | "errored" | "incomplete", "message"}``, and always leaves through
``os._exit`` (cryo 0.3.2 crashes at interpreter shutdown in about 1% of runs, after its data is
written). It checks what ``freeze`` does not raise: ``n_errored`` must be 0, every chunk
completed, exactly one file per datatype named for the range, and every row inside the range
(the blocks file holds exactly one row per block). It dies with its parent (``PR_SET_PDEATHSIG``
on Linux): a worker killed mid-extract leaves no extract behind.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: The environment variable carrying the endpoint (trace_sdk.ingest.RPC_ENV; not in argv,
#: which any local user can read).
RPC_ENV = "TRACE_CRYO_RPC"


def _head(rpc: str) -> int:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
    req = urllib.request.Request(
        rpc, body.encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read())["result"], 16)


def _count(path: Path) -> tuple[int, int | None, int | None]:
    import duckdb

    row = duckdb.sql(
        "SELECT count(*), min(block_number), max(block_number) FROM read_parquet(?)",
        params=[str(path)],
    ).fetchone()
    assert row is not None
    count, lowest, highest = row
    return int(count), lowest, highest


def run(req: dict[str, Any]) -> dict[str, Any]:
    start, end, rpc = int(req["start"]), int(req["end"]), os.environ[RPC_ENV]
    out = Path(req["out"])
    datatypes: list[str] = list(req["datatypes"])
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
    import cryo  # type: ignore[import-untyped]

    try:
        summary = cryo.freeze(
            datatypes,
            blocks=[f"{start}:{end}"],  # cryo's block range is end-exclusive, like Trace's
            rpc=rpc,
            output_dir=str(out),
            chunk_size=end - start,
            network_name="chain",
            verbose=False,
            no_report=True,
            inner_request_size=min(end - start, 100),
            max_retries=int(req.get("max_retries", 2)),
            initial_backoff=int(req.get("initial_backoff_ms", 200)),
        )
    except Exception as exc:  # cryo raises TypeError("failed") when the node is unreachable
        return {"ok": False, "kind": "unreachable", "message": f"{type(exc).__name__}: {exc}"}
    if summary.get("n_errored") != 0:
        return {"ok": False, "kind": "errored", "message": f"cryo: {summary}"}
    # blocks and transactions are one cryo job: at least one job ran, none was skipped
    if summary.get("n_completed", 0) < 1 or summary.get("n_skipped") != 0:
        return {"ok": False, "kind": "incomplete", "message": f"cryo: {summary}"}
    files: dict[str, dict[str, Any]] = {}
    for datatype in datatypes:
        # cryo names files with an INCLUSIVE end: [start, end) is ..._{start}_to_{end - 1}
        path = out / f"chain__{datatype}__{start:08d}_to_{end - 1:08d}.parquet"
        if not path.is_file():
            return {"ok": False, "kind": "incomplete", "message": f"missing {path.name}"}
        rows, low, high = _count(path)
        outside = rows and (low is None or high is None or low < start or high >= end)
        if outside or (datatype == "blocks" and (rows, low, high) != (end - start, start, end - 1)):
            return {
                "ok": False,
                "kind": "incomplete",
                "message": f"{path.name}: {rows} rows, blocks {low}..{high}",
            }
        files[datatype] = {"path": str(path), "rows": rows}
    unexpected = sorted(p.name for p in out.iterdir() if p.is_file())
    if len(unexpected) != len(datatypes):
        return {"ok": False, "kind": "incomplete", "message": f"unexpected files {unexpected}"}
    return {"ok": True, "files": files, "head": head}


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the worker) dies, so a worker killed
    mid-extract leaves no extract running; then check the parent did not die first."""
    parent = os.getppid()
    if sys.platform == "linux":
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)


#: prctl option: the signal this process gets when its parent thread dies.
_PR_SET_PDEATHSIG = 1


def main() -> None:
    die_with_parent()
    code = 0
    try:
        answer = run(json.loads(sys.argv[1]))
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
