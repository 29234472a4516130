"""The lifecycle e2e again, with the AWS adapters: the Dispatcher and workers are real processes
with ``TRACE_PROFILE=aws`` talking to a moto server over HTTP (SQS wake-ups, S3 objects, KMS
ES256 capability tokens, STS credentials); Postgres stays Postgres.

Reuses ``e2e_harness.TraceProcs`` unchanged: ``AwsTraceProcs`` only adds the AWS settings to
the child processes' environment and reads objects back from S3. The crash-safety scenario of
``test_crash_safety.py`` (``crash_scenario.run_crash_scenario``) runs here a second time,
scaled down, with the same faults and assertions.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crash_scenario import run_crash_scenario
from e2e_harness import TraceProcs

from trace_aws._boto import client
from trace_aws.kms_signer import create_signing_key
from trace_aws.s3_store import S3ObjectStore
from trace_aws.sqs_queue import SqsQueue

ROLE = "arn:aws:iam::123456789012:role/trace-task-data"
AWS_WAVES = 6
AWS_PER_WAVE = 60  # 360 tasks through the crash scenario


class AwsTraceProcs(TraceProcs):
    sqs: Any  # boto3 clients on the moto server, set by the fixture
    s3: Any

    def __init__(self, home: Path, db_url: str, aws_env: dict[str, str], **kw: Any) -> None:
        super().__init__(home, db_url, **kw)
        self.aws_env = aws_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.aws_env}

    def read_object(self, object_key: str) -> bytes:
        body = self.s3.get_object(Bucket=self.aws_env["TRACE_S3_BUCKET"], Key=object_key)["Body"]
        data: bytes = body.read()
        return data


@pytest.fixture
def aws_procs(tmp_path: Path, db_url: str, moto_server: Any) -> Iterator[AwsTraceProcs]:
    tag = uuid.uuid4().hex[:10]
    queue = SqsQueue.create(f"e2e-{tag}", endpoint_url=moto_server.url)
    bucket = f"e2e-{tag}"
    S3ObjectStore.create_bucket(bucket, endpoint_url=moto_server.url)
    kms = client("kms", endpoint_url=moto_server.url)
    env = {
        "TRACE_PROFILE": "aws",
        "TRACE_AWS_ENDPOINT_URL": moto_server.url,
        "TRACE_SQS_QUEUE_URL": queue.queue_url,
        "TRACE_S3_BUCKET": bucket,
        "TRACE_KMS_CURRENT_KEY": create_signing_key(kms=kms),
        "TRACE_KMS_NEXT_KEY": create_signing_key(kms=kms),
        "TRACE_STS_ROLE_ARN": ROLE,
    }
    home = tmp_path / "home"
    home.mkdir()
    procs = AwsTraceProcs(home, db_url, env, lease_s=3.0)
    procs.sqs = client("sqs", endpoint_url=moto_server.url)
    procs.s3 = client("s3", endpoint_url=moto_server.url)
    try:
        yield procs
    finally:
        procs.stop_all()


def _queue_depth(t: AwsTraceProcs) -> int:
    attrs = t.sqs.get_queue_attributes(
        QueueUrl=t.aws_env["TRACE_SQS_QUEUE_URL"],
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


def test_aws_lifecycle_happy_path(aws_procs: AwsTraceProcs) -> None:
    t = aws_procs
    t.start_dispatcher()
    t.start_worker(concurrency=4)
    demo = t.create_task("demo", {"events": 2, "rows": 5})
    emit = t.create_task("emit_events", {"n": 3})
    flaky = t.create_task("fail_first_attempt", max_attempts=3)
    sleeper = t.create_task("sleep", {"seconds": t.lease_s * 2.5}, timeout_s=60)
    ids = [demo, emit, flaky, sleeper]
    assert t.wait_terminal(ids, timeout=90) == {"completed": 4}

    assert t.sql("SELECT attempt, outcome FROM task_attempts WHERE task_id = %s", (demo,)) == [
        (1, "succeeded")
    ]
    assert [
        e
        for (e,) in t.sql(
            "SELECT event_key FROM task_events WHERE task_id = %s ORDER BY seq", (demo,)
        )
    ] == ["progress-0", "progress-1", "done"]
    # the buffer batch object is in S3, under the attempt's staging prefix, intact
    [(object_key, size, sha)] = t.sql(
        "SELECT object_key, byte_size, sha256 FROM buffer_batches WHERE task_id = %s", (demo,)
    )
    assert f"/staging/task/{demo}/attempt/1/" in object_key
    data = t.read_object(object_key)
    assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    assert [json.loads(x) for x in data.decode().splitlines()] == [
        {"row": i, "task_id": demo, "value": i * i} for i in range(5)
    ]
    assert t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt", (flaky,)
    ) == [(1, "failed"), (2, "succeeded")]
    assert t.sql("SELECT attempt, outcome FROM task_attempts WHERE task_id = %s", (sleeper,)) == [
        (1, "succeeded")
    ]
    assert len(t.sql("SELECT 1 FROM task_events WHERE task_id = %s", (emit,))) == 4
    # every wake-up went through the outbox to SQS and was consumed
    assert (
        t.scalar("SELECT count(*) FROM outbox WHERE topic = 'wake' AND state <> 'published'") == 0
    )
    t.wait_until(lambda: _queue_depth(t) == 0, 20, "the SQS queue to drain")
    # nothing went to the Lite queue table
    assert t.scalar("SELECT count(*) FROM queue_messages") == 0


def _fence(claim: dict[str, Any]) -> dict[str, Any]:
    return {k: claim[k] for k in ("task_id", "attempt", "lease_token")}


def test_aws_fencing_stale_attempt_gets_409_and_kms_tokens(aws_procs: AwsTraceProcs) -> None:
    t = aws_procs
    t.start_dispatcher()
    task_id = t.create_task("noop", max_attempts=5)
    old = t.claim(task_id, "old-worker")
    header = json.loads(
        __import__("base64").urlsafe_b64decode(old["capability_token"].split(".")[0] + "==")
    )
    assert header["alg"] == "ES256"  # signed by KMS
    cap = old["capability_token"]
    r = t.request("POST", "/v1/task/credentials", capability=cap, body=_fence(old))
    assert r.status == 200, r
    assert r.json["write_prefix"].endswith(f"/staging/task/{task_id}/attempt/1/")

    t.sql(
        "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE task_id = %s", (task_id,)
    )
    t.wait_until(
        lambda: t.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "queued",
        15,
        "the reaper to re-queue the task",
    )
    new = t.claim(task_id, "new-worker")
    assert new["attempt"] == 2
    before = t.counts()
    for path, body in {
        "/v1/task/heartbeat": _fence(old),
        "/v1/task/events": {**_fence(old), "events": [{"key": "e", "type": "progress"}]},
        "/v1/task/complete": {**_fence(old), "result": {"stale": True}},
        "/v1/task/credentials": _fence(old),
    }.items():
        r = t.request("POST", path, capability=cap, body=body)
        assert r.status == 409 and r.json["error"] == "lease_lost", (path, r)
    assert t.counts() == before
    r = t.request(
        "POST",
        "/v1/task/complete",
        capability=new["capability_token"],
        body={**_fence(new), "result": {"by": "new"}},
    )
    assert r.status == 200 and r.json["state"] == "completed", r
    assert t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt", (task_id,)
    ) == [(1, "timed_out"), (2, "succeeded")]


def test_aws_worker_kill9_mid_run_completes_everything_once(aws_procs: AwsTraceProcs) -> None:
    t = aws_procs
    t.start_dispatcher()
    victim = t.start_worker(concurrency=8)
    tasks = [{"operator": "sleep", "payload": {"seconds": 1.5}, "max_attempts": 10}] * 16 + [
        {"operator": "demo", "payload": {"events": 2, "rows": 3}, "max_attempts": 10}
    ] * 16
    ids = t.create_tasks(tasks)
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM tasks WHERE state = 'running'") >= 4,
        30,
        "the worker to be mid-run",
    )
    t.kill9(victim)
    running_at_kill = t.scalar("SELECT count(*) FROM tasks WHERE state = 'running'")
    time.sleep(0.5)
    t.start_worker(concurrency=8)
    assert t.wait_terminal(ids, timeout=120) == {"completed": len(ids)}
    # exactly once: one succeeded attempt per task, events and batches once each
    assert t.scalar(
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY(%s::uuid[]) "
        "AND outcome = 'succeeded'",
        (ids,),
    ) == len(ids)
    dup_events = t.sql(
        "SELECT task_id, event_key FROM task_events GROUP BY 1, 2 HAVING count(*) > 1"
    )
    assert dup_events == []
    assert t.scalar("SELECT count(*) FROM buffer_batches") == 16
    assert t.scalar("SELECT count(*) FROM task_events") == 16 * 3
    retried = t.scalar("SELECT count(*) FROM tasks WHERE attempt > 1")
    assert running_at_kill >= 1 and retried >= 1, (running_at_kill, retried)


def test_aws_dispatcher_kill9_mid_run_recovers_exactly_once(aws_procs: AwsTraceProcs) -> None:
    """kill -9 the Dispatcher (the outbox publisher to SQS, the KMS signer, the reaper) while
    workers run, then restart it: nothing lost, nothing done twice."""
    t = aws_procs
    dispatcher = t.start_dispatcher()
    t.start_worker(concurrency=8)
    tasks = [{"operator": "emit_events", "payload": {"n": 2}, "max_attempts": 10}] * 40 + [
        {"operator": "sleep", "payload": {"seconds": 1.0}, "max_attempts": 10}
    ] * 8
    ids = t.create_tasks(tasks)
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM tasks WHERE state = 'completed'") >= 5,
        60,
        "some tasks to complete",
    )
    t.kill9(dispatcher)
    time.sleep(1.0)  # workers keep running and retrying against a dead Dispatcher
    t.start_dispatcher()
    assert t.wait_terminal(ids, timeout=150) == {"completed": len(ids)}
    assert t.scalar(
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY(%s::uuid[]) "
        "AND outcome = 'succeeded'",
        (ids,),
    ) == len(ids)
    assert (
        t.sql("SELECT task_id, event_key FROM task_events GROUP BY 1, 2 HAVING count(*) > 1") == []
    )
    assert t.scalar("SELECT count(*) FROM task_events") == 40 * 3
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE outcome = 'running'") == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_aws_kill9_and_postgres_restart_lose_and_duplicate_nothing(
    aws_procs: AwsTraceProcs, pg_cluster: object
) -> None:
    """``test_crash_safety.py`` again under ``TRACE_PROFILE=aws``: the same body (kill -9 of
    the Dispatcher and of workers, a Postgres restart, every exactly-once check, batch objects
    read back from S3), fewer tasks."""
    run_crash_scenario(aws_procs, pg_cluster, waves=AWS_WAVES, per_wave=AWS_PER_WAVE)
