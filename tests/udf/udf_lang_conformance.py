"""The runtime conformance suite every non-Python UDF runtime passes (Node, Rust): one bootstrap
against a Lambda Runtime API and a ``/v1/task/*`` surface on loopback (``udf_lang_fakes``).

A subclass provides ``start_cmd`` (the command that starts the runtime with the conformance
handler, whose behaviour the event's ``payload.mode`` chooses) and the error types its language
reports. The contract under test is ``docs/architecture/udf.md``: the response is exactly
``{"result", "final_events"}``; rows are published (keys ``{dataset}.{n}.{i}``) only after the
handler succeeded; every failure is an ``/error`` with a clear ``errorType``; the runtime calls
``/v1/task/*`` with the event's capability token only and never completes the attempt.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from udf_lang_fakes import Invocation, TaskApi, bootstrap


class RuntimeConformance:
    #: errorType of a handler's ordinary error, and of a crash inside the handler
    error_type: ClassVar[str]
    crash_type: ClassVar[str]

    @pytest.fixture
    def start_cmd(self) -> list[str]:
        raise NotImplementedError

    async def run(
        self, cmd: list[str], payload: dict[str, Any], tasks: TaskApi | None = None, **fields: Any
    ) -> tuple[Invocation, TaskApi, bytes]:
        tasks = tasks or TaskApi()
        async with bootstrap(cmd, tasks=tasks) as running:
            answer = await running.api.answer(running.api.queue(tasks.event(payload, **fields)))
        return answer, tasks, running.stdout

    async def test_success_publishes_rows_then_responds_with_result_and_events(
        self, start_cmd: list[str]
    ) -> None:
        tasks = TaskApi()
        event = tasks.event({"mode": "ok", "n": 3})
        async with bootstrap(start_cmd, tasks=tasks) as running:
            answer = await running.api.answer(running.api.queue(event))
        assert answer.kind == "response", answer.body
        assert answer.body == {
            "result": {"n": 3, "granted": 0},
            "final_events": [{"key": "done", "type": "udf.done", "payload": {"n": 3}}],
        }
        (publish,) = tasks.routes("buffer-publish")
        assert publish["batch"] == {
            "key": "squares.0.0",
            "dataset": "squares",
            "rows": [{"i": i, "sq": i * i} for i in range(3)],
        }
        fence = {k: event[k] for k in ("task_id", "attempt", "lease_token")}
        assert {k: publish[k] for k in fence} == fence
        assert [name for name, _, _ in tasks.calls] == ["buffer-publish"]
        assert tasks.tokens_used() == {event["capability_token"]}

    async def test_keys_count_calls_per_dataset_and_honour_a_given_key(
        self, start_cmd: list[str]
    ) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": "two_calls"})
        assert answer.kind == "response"
        keys = [p["batch"]["key"] for p in tasks.routes("buffer-publish")]
        assert keys == ["squares.0.0", "squares.1.0", "mine.0"]

    async def test_many_rows_go_in_batches_of_at_most_1000(self, start_cmd: list[str]) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": "big", "n": 2500})
        assert answer.kind == "response"
        batches = [p["batch"] for p in tasks.routes("buffer-publish")]
        assert [(b["key"], len(b["rows"])) for b in batches] == [
            ("squares.0.0", 1000),
            ("squares.0.1", 1000),
            ("squares.0.2", 500),
        ]
        assert [r["i"] for b in batches for r in b["rows"]] == list(range(2500))

    async def test_the_same_input_publishes_the_same_keys_on_a_retry(
        self, start_cmd: list[str]
    ) -> None:
        tasks = TaskApi()
        async with bootstrap(start_cmd, tasks=tasks) as running:
            first = tasks.event({"mode": "ok", "n": 2})
            retry = dict(first, attempt=2, lease_token="00000000-0000-4000-8000-00000000000b")
            answers = [await running.api.answer(running.api.queue(e)) for e in (first, retry)]
        assert [a.kind for a in answers] == ["response", "response"]
        published = tasks.routes("buffer-publish")
        assert [p["batch"]["key"] for p in published] == ["squares.0.0", "squares.0.0"]
        assert [p["attempt"] for p in published] == [1, 2]
        assert len(tasks.batches) == 1  # the retry's batch is a duplicate

    async def test_a_failing_handler_reports_its_error_and_publishes_nothing(
        self, start_cmd: list[str]
    ) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": "error"})
        assert answer.kind == "error"
        assert answer.body["errorType"] == answer.error_type_header == self.error_type
        assert answer.body["errorMessage"] == "boom at row 3"
        assert tasks.calls == []

    async def test_non_retryable_error_keeps_its_type(self, start_cmd: list[str]) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": "non_retryable"})
        assert answer.body["errorType"] == "NonRetryableError"
        assert answer.body["errorMessage"] == "input is malformed"
        assert tasks.calls == []

    async def test_a_crash_inside_the_handler_fails_that_invocation_and_the_loop_goes_on(
        self, start_cmd: list[str]
    ) -> None:
        tasks = TaskApi()
        async with bootstrap(start_cmd, tasks=tasks) as running:
            crashed = await running.api.answer(running.api.queue(tasks.event({"mode": "crash"})))
            after = await running.api.answer(running.api.queue(tasks.event({"mode": "ok", "n": 1})))
        assert crashed.kind == "error"
        assert crashed.body["errorType"] == self.crash_type
        assert "index out of bounds" in crashed.body["errorMessage"]
        assert after.kind == "response"
        assert [p["batch"]["rows"] for p in tasks.routes("buffer-publish")] == [[{"i": 0, "sq": 0}]]

    @pytest.mark.parametrize(("mode", "named"), [("array", "an array"), ("string", "a string")])
    async def test_a_wrong_shape_result_is_invalid_result_and_nothing_is_published(
        self, start_cmd: list[str], mode: str, named: str
    ) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": mode})
        assert answer.kind == "error"
        assert answer.body["errorType"] == "Runtime.InvalidResult"
        assert f"the handler returned {named}" in answer.body["errorMessage"]
        assert tasks.calls == []

    async def test_garbage_on_stdout_and_stderr_does_not_disturb_the_protocol(
        self, start_cmd: list[str]
    ) -> None:
        answer, _, stdout = await self.run(start_cmd, {"mode": "garbage"})
        assert answer.kind == "response"
        assert answer.body == {"result": {"fine": True}, "final_events": []}
        assert b"{not json at all" in stdout

    async def test_a_heartbeat_renews_the_token_and_later_calls_use_it(
        self, start_cmd: list[str]
    ) -> None:
        tasks = TaskApi()
        first_token = tasks.token
        answer, _, _ = await self.run(start_cmd, {"mode": "heartbeat"}, tasks)
        assert answer.kind == "response"
        (beat, publish) = tasks.calls
        assert (beat[0], beat[2]) == ("heartbeat", first_token)
        assert (publish[0], publish[2]) == ("buffer-publish", tasks.token)
        assert tasks.token != first_token

    async def test_a_refused_heartbeat_fails_the_handler(self, start_cmd: list[str]) -> None:
        tasks = TaskApi()
        tasks.faults["heartbeat"] = [(409, {"error": "lease_lost", "message": "a newer attempt"})]
        answer, _, _ = await self.run(start_cmd, {"mode": "heartbeat"}, tasks)
        assert answer.kind == "error"
        assert "lease_lost: a newer attempt" in answer.body["errorMessage"]
        assert tasks.routes("buffer-publish") == []

    async def test_transient_task_api_failures_are_retried(self, start_cmd: list[str]) -> None:
        tasks = TaskApi()
        unavailable = (503, {"error": "unavailable", "message": "database down"})
        tasks.faults["buffer-publish"] = [unavailable, unavailable]
        answer, _, _ = await self.run(start_cmd, {"mode": "ok", "n": 1}, tasks)
        assert answer.kind == "response"
        assert len(tasks.routes("buffer-publish")) == 3

    async def test_a_refused_publish_is_publish_failed(self, start_cmd: list[str]) -> None:
        tasks = TaskApi()
        refusal = {"error": "validation_failed", "message": "bad row", "field": "batch.rows"}
        tasks.faults["buffer-publish"] = [(422, refusal)]
        answer, _, _ = await self.run(start_cmd, {"mode": "ok", "n": 1}, tasks)
        assert answer.kind == "error"
        assert answer.body["errorType"] == "Runtime.PublishFailed"
        assert "validation_failed: bad row (batch.rows)" in answer.body["errorMessage"]

    async def test_query_sends_the_fence_and_reads_rows_as_objects(
        self, start_cmd: list[str]
    ) -> None:
        tasks = TaskApi()
        tasks.answers["SELECT n FROM blocks"] = {
            "columns": [{"name": "n", "type": "BIGINT"}],
            "rows": [[1], [2]],
            "truncated": False,
            "versions": {"blocks": "v1"},
        }
        answer, _, _ = await self.run(start_cmd, {"mode": "query"}, tasks)
        assert answer.kind == "response"
        assert answer.body["result"] == {"read": 2}
        (query,) = tasks.routes("query")
        assert {k: query[k] for k in ("sql", "format", "max_rows")} == {
            "sql": "SELECT n FROM blocks",
            "format": "json",
            "max_rows": 10,
        }
        assert {"task_id", "attempt", "lease_token"} <= set(query)
        assert tasks.routes("buffer-publish")[0]["batch"]["rows"] == [{"n": 1}, {"n": 2}]

    async def test_a_refused_query_fails_the_handler(self, start_cmd: list[str]) -> None:
        answer, tasks, _ = await self.run(start_cmd, {"mode": "query"})
        assert answer.kind == "error"
        assert "not_found: dataset not found or not readable" in answer.body["errorMessage"]
        assert tasks.routes("buffer-publish") == []

    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            (b"\xff\xfe not json", "the event is not JSON"),
            (b"[1, 2]", "the event is not a JSON object"),
            (b'{"task_id": "t"}', "event.lease_token"),
        ],
    )
    async def test_an_invalid_event_is_reported_and_nothing_reaches_the_task_api(
        self, start_cmd: list[str], raw: bytes, problem: str
    ) -> None:
        tasks = TaskApi()
        async with bootstrap(start_cmd, tasks=tasks) as running:
            answer = await running.api.answer(running.api.queue(None, raw=raw))
        assert answer.kind == "error"
        assert answer.body["errorType"] == "Runtime.InvalidEvent"
        assert problem in answer.body["errorMessage"]
        assert tasks.calls == []
