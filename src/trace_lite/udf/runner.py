"""The Lite UDF runner: Lambda for one machine.

Theory of operation (``docs/architecture/udf.md``)
-------------------------------------------------

* The Dispatcher's launcher (``trace_lite.udf.launcher``) claims a ``runtime: lambda`` task and
  POSTs its ``wire.LambdaInvokePayload`` to ``/2015-03-31/functions/{name}/invocations`` here
  (Lambda's Invoke API path, ``InvocationType=Event``): ``202`` once queued.
* Per invocation: fetch the bundle by its presigned URL and check its digest
  (``BundleCache``), take a warm environment of the same ``(org, digest)`` or start one
  (``Environment``), hand it the event through the Runtime API, heartbeat the attempt while it
  runs, and wait for its answer, its exit or the timeout.
* The attempt is completed through ``/v1/task/complete`` with its capability token only:
  ``succeeded`` with the response's ``result`` and ``final_events``, or ``failed`` with an
  ``error.code`` naming the cause (``trace_core.udf.FailureCode``). A failed environment is
  killed -- with everything it started -- before the completion is sent; only an environment
  that answered well is kept warm.
* The runner holds no platform credential and no database URL: what it may do to an attempt
  is what that attempt's capability token allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from trace_core import errors, udf, wire
from trace_lite.udf.bundles import BadBundle, BundleCache, BundleUnavailable
from trace_lite.udf.environment import (
    Environment,
    Isolation,
    Pending,
    deadline_ms,
    event_bytes,
    exit_description,
)
from trace_sdk import DispatcherClient

log = logging.getLogger("trace.udf")

INVOKE_PATH = "/2015-03-31/functions/{name}/invocations"


@attrs.define
class RunnerConfig:
    #: Where ``/v1/task/*`` is served.
    dispatcher_url: str
    #: Bundles and environments live here (world-traversable when runtimes run as nobody).
    work_dir: Path
    isolation: Isolation
    #: Only bundle URLs under this prefix are fetched (the Dispatcher's signed object URLs).
    bundle_url_prefix: str
    python: str
    node: str | None = None
    concurrency: int = 4
    keep_warm: bool = True
    #: At most this many idle warm environments are kept.
    max_idle: int = 8


class Runner:
    """Accepts invocations and runs each in an environment (see the module docstring)."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._cache: BundleCache | None = None
        self._client: DispatcherClient | None = None
        self._slots = asyncio.Semaphore(config.concurrency)
        self._idle: list[Environment] = []
        self._busy: set[Environment] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {
            "accepted": 0,
            "succeeded": 0,
            "failed": 0,
            "canceled": 0,
            "lease_lost": 0,
            "cold_starts": 0,
            "warm_starts": 0,
        }
        #: Failure codes in order, for tests.
        self.failures: list[str] = []

    async def start(self) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._cache = BundleCache(self.config.work_dir / "bundles", self._session)
        self._client = DispatcherClient(self.config.dispatcher_url, session=self._session)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for env in [*self._idle, *self._busy]:
            await env.kill()
        self._idle.clear()
        if self._session is not None:
            await self._session.close()

    # -- intake -----------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(INVOKE_PATH, self._invoke_route),
            web.get("/healthz", self._health),
        ]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "isolation": self.config.isolation, **self.stats})

    async def _invoke_route(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            payload = wire.structure(doc, wire.LambdaInvokePayload)
        except (ValueError, errors.ValidationFailed) as exc:
            return web.json_response(
                {"Type": "User", "message": f"not an invoke payload: {exc}"}, status=400
            )
        try:
            self.accept(payload)
        except errors.Forbidden as exc:
            return web.json_response({"Type": "User", "message": exc.message}, status=403)
        return web.Response(status=202)

    def accept(self, payload: wire.LambdaInvokePayload) -> None:
        """Queue an invocation. Raises ``Forbidden`` for a bundle URL this runner does not
        fetch from."""
        if not payload.bundle_url.startswith(self.config.bundle_url_prefix):
            raise errors.Forbidden("bundle URLs are fetched from the Dispatcher's store only")
        self.stats["accepted"] += 1
        task = asyncio.create_task(self._run_slot(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_slot(self, payload: wire.LambdaInvokePayload) -> None:
        async with self._slots:
            try:
                await self.run(payload)
            except Exception:
                log.exception("invocation failed", extra={"task_id": payload.task_id})

    # -- one invocation ---------------------------------------------------------------------

    async def run(self, p: wire.LambdaInvokePayload) -> str:
        """Run one invocation to its completion; returns the completion's outcome (or
        ``lease_lost``)."""
        assert self._client is not None and self._cache is not None
        fence = wire.FenceFields(p.task_id, p.attempt, p.lease_token)
        token = [p.capability_token]
        extra = {"task_id": p.task_id, "attempt": p.attempt}
        if p.status == "canceled":
            await self._complete(token, fence, {"outcome": "canceled"}, extra)
            return "canceled"
        lost = asyncio.Event()
        canceled = [False]
        beat = asyncio.create_task(self._heartbeat(p, fence, token, lost, canceled))
        env: Environment | None = None
        try:
            try:
                ref = udf.bundle_ref(p)
                if ref is None:
                    raise BadBundle("the task payload names no bundle (payload.bundle)")
                manifest, root = await self._cache.get(p.org_id, ref, p.bundle_url)
            except BundleUnavailable as exc:
                return await self._fail(token, fence, udf.Failure(_BUNDLE_UNAVAILABLE, str(exc)))
            except (BadBundle, errors.ValidationFailed) as exc:
                failure = udf.Failure(_BAD_BUNDLE, str(exc), retryable=False)
                return await self._fail(token, fence, failure)
            timeout_s = udf.effective_timeout_s(manifest, p.timeout_s)
            try:
                env = await self._environment((p.org_id, ref.digest), manifest, root)
            except (OSError, ValueError) as exc:
                failure = udf.Failure(udf.FailureCode.INIT_ERROR, f"cannot start runtime: {exc}")
                return await self._fail(token, fence, failure)
            loop = asyncio.get_running_loop()
            pending = Pending(
                request_id=str(uuid.uuid4()),
                event=event_bytes(wire.unstructure(p)),
                deadline_ms=deadline_ms(timeout_s),
                arn=f"arn:trace:lambda:lite:{p.org_id}:function:{manifest.name}",
                answer=loop.create_future(),
            )
            invoke = asyncio.ensure_future(env.invoke(pending, timeout_s))
            stop = asyncio.ensure_future(lost.wait())
            await asyncio.wait({invoke, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not invoke.done():  # the lease is gone: stop the runtime, someone else owns it
                await self._discard(env)
                env = None
                with contextlib.suppress(BaseException):
                    await invoke
                if canceled[0]:
                    await self._complete(token, fence, {"outcome": "canceled"}, extra)
                    self.stats["canceled"] += 1
                    return "canceled"
                self.stats["lease_lost"] += 1
                return "lease_lost"
            kind, body = invoke.result()
            beat.cancel()
            if kind == "response":
                try:
                    req = udf.parse_response(body, fence)
                except errors.ValidationFailed as exc:
                    msg = f"bundle {manifest.name}: bad response ({exc.field}): {exc.message}"
                    await self._discard(env)
                    env = None
                    return await self._fail(
                        token, fence, udf.Failure(udf.FailureCode.INVALID_RESPONSE, msg)
                    )
                self._release(env)
                env = None
                return await self._succeed(token, fence, req, manifest.name, extra)
            failure = self._failure(kind, body, manifest, timeout_s, env)
            await self._discard(env)
            env = None
            return await self._fail(token, fence, failure)
        finally:
            beat.cancel()
            if env is not None:
                await self._discard(env)

    def _failure(
        self, kind: str, body: bytes, manifest: udf.Manifest, timeout_s: int, env: Environment
    ) -> udf.Failure:
        name = manifest.name
        match kind:
            case "error":
                f = udf.handler_failure(body)
                return attrs.evolve(f, message=f"bundle {name}: {f.message}")
            case "init_error":
                f = udf.handler_failure(body)
                return udf.Failure(udf.FailureCode.INIT_ERROR, f"bundle {name}: {f.message}")
            case "timeout":
                return udf.Failure(
                    udf.FailureCode.TIMEOUT, f"bundle {name}: no answer within {timeout_s} s"
                )
            case "too_large":
                return udf.Failure(
                    udf.FailureCode.INVALID_RESPONSE, f"bundle {name}: response over 6 MB"
                )
            case _:
                how = exit_description(int(body or b"0"), env.isolation)
                return udf.Failure(
                    udf.FailureCode.CRASHED,
                    f"bundle {name}: runtime {how} before answering "
                    f"(memory limit {manifest.limits.memory_mb} MB)",
                )

    async def _environment(
        self, key: tuple[str, str], manifest: udf.Manifest, root: Path
    ) -> Environment:
        for env in list(self._idle):
            if env.key == key:
                self._idle.remove(env)
                if env.alive():
                    self._busy.add(env)
                    self.stats["warm_starts"] += 1
                    return env
                await env.kill()
        assert self._session is not None
        env = Environment(
            key,
            manifest,
            root,
            self.config.work_dir,
            dispatcher_url=self.config.dispatcher_url,
            isolation=self.config.isolation,
            python=self.config.python,
            node=self.config.node,
            session=self._session,
        )
        self._busy.add(env)
        self.stats["cold_starts"] += 1
        try:
            await env.start()
        except BaseException:
            await self._discard(env)
            raise
        return env

    def _release(self, env: Environment) -> None:
        self._busy.discard(env)
        if self.config.keep_warm and env.alive():
            self._idle.append(env)
            while len(self._idle) > self.config.max_idle:
                old = self._idle.pop(0)
                task = asyncio.create_task(old.kill())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            task = asyncio.create_task(env.kill())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _discard(self, env: Environment) -> None:
        self._busy.discard(env)
        await env.kill()

    def live_pids(self) -> list[int]:
        """PIDs of the runtimes this runner holds (tests check that none outlive an attempt)."""
        return [e.pid for e in [*self._idle, *self._busy] if e.pid is not None and e.alive()]

    # -- the attempt ------------------------------------------------------------------------

    async def _heartbeat(
        self,
        p: wire.LambdaInvokePayload,
        fence: wire.FenceFields,
        token: list[str],
        lost: asyncio.Event,
        canceled: list[bool],
    ) -> None:
        assert self._client is not None
        req = wire.HeartbeatRequest(fence.task_id, fence.attempt, fence.lease_token)
        interval = _heartbeat_interval(p.lease_expires_at)
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self._client.heartbeat(token[0], req)
                token[0] = renewed.capability_token
            except errors.TaskCanceled:
                canceled[0] = True
                lost.set()
                return
            except (errors.LeaseLost, errors.Forbidden, errors.NotFound, errors.Unauthenticated):
                lost.set()
                return
            except errors.TraceError as exc:
                log.warning("heartbeat failed", extra={"task_id": fence.task_id, "error": str(exc)})

    async def _succeed(
        self,
        token: list[str],
        fence: wire.FenceFields,
        req: wire.CompleteRequest,
        name: str,
        extra: dict[str, Any],
    ) -> str:
        assert self._client is not None
        try:
            await self._client.complete(token[0], req)
        except errors.InvalidRequest as exc:  # e.g. an event the task API refuses
            msg = f"bundle {name}: the task API refused the response ({exc.field}): {exc}"
            return await self._fail(
                token, fence, udf.Failure(udf.FailureCode.INVALID_RESPONSE, msg)
            )
        except errors.Conflict as exc:
            log.info("completion refused", extra={**extra, "error": exc.code})
            self.stats["lease_lost"] += 1
            return "lease_lost"
        self.stats["succeeded"] += 1
        return "succeeded"

    async def _fail(self, token: list[str], fence: wire.FenceFields, failure: udf.Failure) -> str:
        extra = {"task_id": fence.task_id, "attempt": fence.attempt}
        log.warning(
            "udf attempt failed",
            extra={**extra, "code": failure.code.value, "error": failure.message},
        )
        self.failures.append(failure.code.value)
        self.stats["failed"] += 1
        await self._complete(token, fence, failure.outcome(), extra)
        return "failed"

    async def _complete(
        self,
        token: list[str],
        fence: wire.FenceFields,
        outcome: dict[str, Any],
        extra: dict[str, Any],
    ) -> None:
        assert self._client is not None
        req = wire.structure(
            {
                "task_id": fence.task_id,
                "attempt": fence.attempt,
                "lease_token": fence.lease_token,
                **outcome,
            },
            wire.CompleteRequest,
        )
        try:
            await self._client.complete(token[0], req)
        except errors.TraceError as exc:
            log.warning("completion failed", extra={**extra, "error": str(exc)})


_BUNDLE_UNAVAILABLE = udf.FailureCode.BUNDLE_UNAVAILABLE
_BAD_BUNDLE = udf.FailureCode.BAD_BUNDLE


def _heartbeat_interval(lease_expires_at: str) -> float:
    """A quarter of the lease left, between 0.2 s and 15 s (15 s when it cannot be read)."""
    try:
        expires = datetime.fromisoformat(lease_expires_at)
        left = (expires - datetime.now(expires.tzinfo)).total_seconds()
    except (ValueError, TypeError):
        return 15.0
    return min(15.0, max(0.2, left / 4))
