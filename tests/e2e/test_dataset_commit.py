"""The output commit with real processes: failed attempts invisible, exactly once, immutable.

1. The worker stages its output and is SIGKILLed before completing: the reaper retries, a new
   worker's attempt 2 commits, and exactly one partition is live (attempt 2's).
2. The completion (with its manifest) is sent and the connection dropped before the reply is
   read; whatever the Dispatcher did, the task ends with exactly one committed output, and
   re-sending the same completion is a replay that commits nothing twice.
3. Committed bytes are immutable to their producer: the attempt's signed PUT URLs die with the
   commit (and a buffer batch's key with its publish), and a reader is handed the verified,
   promoted copy only, never the staging key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from typing import Any

from e2e_harness import TraceProcs

from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.local_store import LocalObjectStore

ORG = "default"


def _setup_dataset(db_url: str) -> str:
    async def go() -> str:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag(ORG, "chain")
            await ds.register(ORG, "blocks", dag="chain", job="ingest")
            version = await ds.open_version(None, ORG, "blocks")
            await ds.cutover(None, ORG, "chain", {"blocks": version})
            return version
        finally:
            await pool.close()

    return asyncio.run(go())


def _live(t: TraceProcs) -> list[tuple[Any, ...]]:
    return t.sql(
        "SELECT range_start, range_end, task_id::text, attempt FROM dataset_partitions "
        "WHERE superseded_at IS NULL ORDER BY partition_id"
    )


def test_killed_worker_after_staging_leaves_nothing_visible(trace_procs: TraceProcs) -> None:
    t = trace_procs
    _setup_dataset(t.db_url)
    t.start_dispatcher()
    worker = t.start_worker(concurrency=2)
    task_id = t.create_task(
        "stage_output", {"start": 0, "end": 100, "hang_first_s": 60}, max_attempts=5
    )
    staged_1 = t.object_root / "objects" / "org"
    t.wait_until(
        lambda: list(staged_1.glob(f"*/staging/task/{task_id}/attempt/1/out/**/*.json")),
        30,
        "attempt 1 to stage its output",
    )
    assert _live(t) == []
    t.kill9(worker)
    assert _live(t) == []  # staged, never committed: invisible
    t.start_worker(concurrency=2)
    t.wait_terminal([task_id], 60)
    assert t.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "completed"
    live = _live(t)
    assert live == [(0, 100, task_id, 2)], live
    # attempt 1's staged object is still there (inside the grace) but nothing names it
    keys = {r[0] for r in t.sql("SELECT staged_key FROM dataset_partitions")}
    assert all("/attempt/2/" in k for k in keys)


def _send_and_drop(port: int, path: str, headers: dict[str, str], body: bytes) -> None:
    """Send a complete HTTP request and close the socket without reading the reply."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode() + body)
        s.shutdown(socket.SHUT_WR)


def test_completion_sent_but_reply_lost_commits_exactly_once(trace_procs: TraceProcs) -> None:
    t = trace_procs
    _setup_dataset(t.db_url)
    t.start_dispatcher()
    task_id = t.create_task("stage_output", {"start": 0, "end": 100}, max_attempts=5)
    claim = t.claim(task_id, "test-worker")
    fetched = t.request(
        "GET", f"/internal/task-fetch?task_id={task_id}&attempt=1", platform=True
    ).json
    store = LocalObjectStore(t.object_root, t.url, b"x" * 32)
    data = json.dumps({"attempt": 1}).encode()
    key = f"{fetched['staging_prefix']}out/blocks/0_100.json"
    asyncio.run(store.put(key, data))
    body = {k: claim[k] for k in ("task_id", "attempt", "lease_token")}
    body["outputs"] = [
        {
            "dataset": "blocks",
            "object_key": key,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "partition": {"start": 0, "end": 100},
        }
    ]
    raw = json.dumps(body).encode()
    _send_and_drop(
        t.port,
        "/v1/task/complete",
        {"X-Trace-Task-Capability": claim["capability_token"], "Content-Type": "application/json"},
        raw,
    )
    # the Dispatcher finishes the request although the client is gone
    t.wait_until(
        lambda: t.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "completed",
        20,
        "the completion to commit",
    )
    assert _live(t) == [(0, 100, task_id, 1)]
    # the worker retries the same completion after reconnecting: a replay, nothing twice
    r = t.request("POST", "/v1/task/complete", raw=raw, capability=claim["capability_token"])
    assert r.status == 200 and r.json["replay"] is True, r
    # and a worker that never heard back and restarts finds the task done (no attempt 2)
    t.start_worker(concurrency=2)
    r = t.request("POST", "/internal/task-claim", body={"task_id": task_id}, platform=True)
    assert r.status == 409, r
    assert _live(t) == [(0, 100, task_id, 1)]
    assert t.scalar("SELECT count(*) FROM dataset_partitions") == 1


def _put(url: str, data: bytes) -> int:
    """PUT ``data`` to a signed URL of the Dispatcher's object routes; returns the status."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_committed_bytes_are_immutable_to_their_producer(
    trace_procs: TraceProcs, monkeypatch: Any
) -> None:
    """A signed PUT URL dies with its attempt's commit (and a buffer batch's key with its
    publish); readers are handed the verified, promoted copy, never the staged key."""
    from trace_lite.users import LocalUserIssuer

    t = trace_procs
    _setup_dataset(t.db_url)
    base_env = t.env
    policy = {"TRACE_USER_JWT_ISSUER": "trace-lite", "TRACE_USER_JWT_AUDIENCE": "trace-api"}
    monkeypatch.setattr(t, "env", lambda: {**base_env(), **policy})
    t.start_dispatcher()
    secret = (t.trace_dir / "secrets" / "object_url_key").read_text().strip().encode()
    signer = LocalObjectStore(t.object_root, t.url, secret)
    task_id = t.create_task("stage_output", {"start": 0, "end": 100}, max_attempts=1)
    claim = t.claim(task_id, "test-worker")
    fence = {k: claim[k] for k in ("task_id", "attempt", "lease_token")}
    cap = claim["capability_token"]
    prefix = t.request(
        "GET", f"/internal/task-fetch?task_id={task_id}&attempt=1", platform=True
    ).json["staging_prefix"]

    def signed_put(key: str) -> str:
        return asyncio.run(signer.signed_url(key, method="PUT", expires_in=600))

    # a buffer batch: writable until published, immutable after
    buffer_key = f"{prefix}buffer/rows/b1.jsonl"
    rows = b'{"n": 1}\n'
    assert _put(signed_put(buffer_key), rows) == 200
    batch = {
        "key": "b1",
        "dataset": "rows",
        "object_key": buffer_key,
        "row_count": 1,
        "byte_size": len(rows),
        "sha256": hashlib.sha256(rows).hexdigest(),
    }
    r = t.request("POST", "/v1/task/buffer-publish", body={**fence, "batch": batch}, capability=cap)
    assert r.status == 200, r
    assert _put(signed_put(buffer_key), b'{"n": 666}\n') == 403
    assert t.read_object(buffer_key) == rows
    # an output: staged through its URL, committed with the completion
    key = f"{prefix}out/blocks/0_100.json"
    url = signed_put(key)
    data = json.dumps({"attempt": 1}).encode()
    assert _put(url, data) == 200
    output = {
        "dataset": "blocks",
        "object_key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "partition": {"start": 0, "end": 100},
    }
    r = t.request("POST", "/v1/task/complete", body={**fence, "outputs": [output]}, capability=cap)
    assert r.status == 200, r
    assert _put(url, b"tampered") == 403  # the same URL, still unexpired
    assert _put(signed_put(key), b"tampered") == 403  # a fresh one for the same key
    assert _put(signed_put(f"{prefix}out/blocks/new.json"), b"x") == 403  # the attempt ended
    assert t.read_object(key) == data
    # a reader gets promoted, verified bytes only: never the staging key
    admin_token = LocalUserIssuer.init(t.key_dir).token("admin")
    t.sql(
        "INSERT INTO org_members (org_id, subject, roles) "
        "SELECT org_id, 'admin', '{admin}' FROM orgs WHERE name = %s",
        (ORG,),
    )

    def resolve() -> dict[str, Any]:
        r = t.request(
            "POST",
            f"/v1/orgs/{ORG}/datasets/resolve",
            body={"datasets": ["blocks"], "pin_ttl_s": 0},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        assert r.status == 200, r
        (resolved,) = r.json["datasets"]
        for o in resolved["objects"]:
            assert "/staging/" not in o["object_key"], o
        return dict(resolved)

    first = resolve()
    assert (first["objects"] == [] and first["pending"] == 1) or len(first["objects"]) == 1
    t.wait_until(
        lambda: t.scalar("SELECT state FROM dataset_partitions") == "promoted",
        30,
        "promotion",
    )
    (obj,) = resolve()["objects"]
    assert obj["object_key"] == t.scalar("SELECT object_key FROM dataset_partitions")
    assert obj["object_key"].startswith("org/") and "/dataset/" in obj["object_key"]
    assert t.read_object(obj["object_key"]) == data
