"""Test doubles for the language runtimes' tests (Node, Rust): a Lambda Runtime API server and a
Dispatcher task surface, both on loopback, both recording what they were sent.

``RuntimeApi`` serves ``/2018-06-01/runtime/*`` exactly as Lambda documents it: ``next`` waits
for an event the test queues and answers it with ``Lambda-Runtime-Aws-Request-Id`` and
``Lambda-Runtime-Deadline-Ms``; ``response``, ``error`` and ``init/error`` record their bodies.
``TaskApi`` serves ``/v1/task/*``: it accepts only the capability token it issued (renewed at each
heartbeat), deduplicates buffer batches by key, answers queries from a table the test sets, and
can be told to refuse or fail calls; it records every call (a runtime must never complete an
attempt: the runner does). The build helpers compile the SDKs once per source digest into
``.trace/udf-sdks``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
NODE_SDK = REPO / "sdks" / "node"
RUST_SDK = REPO / "sdks" / "rust"
CACHE = REPO / ".trace" / "udf-sdks"
CARGO = shutil.which("cargo") or "/root/.cargo/bin/cargo"

RUNTIME = "/2018-06-01/runtime"


@dataclass
class Invocation:
    """What the runtime answered for one queued event."""

    request_id: str
    kind: str  # "response" or "error"
    body: Any
    error_type_header: str | None = None


@dataclass
class RuntimeApi:
    """A Lambda Runtime API on loopback. ``queue(event)`` hands one event to ``next``."""

    deadline_ms: int = 0
    events: asyncio.Queue[tuple[str, bytes]] = field(default_factory=asyncio.Queue)
    answers: dict[str, asyncio.Future[Invocation]] = field(default_factory=dict)
    init_errors: list[tuple[str | None, Any]] = field(default_factory=list)
    polls: int = 0
    url: str = ""

    def queue(self, event: Any, *, raw: bytes | None = None) -> str:
        request_id = str(uuid.uuid4())
        body = raw if raw is not None else json.dumps(event).encode()
        self.answers[request_id] = asyncio.get_running_loop().create_future()
        self.events.put_nowait((request_id, body))
        return request_id

    async def answer(self, request_id: str) -> Invocation:
        """The runtime's answer to one queued event (bounded by the test's own timeout)."""
        async with asyncio.timeout(30):
            return await self.answers[request_id]

    async def _next(self, request: web.Request) -> web.Response:
        self.polls += 1
        request_id, body = await self.events.get()
        deadline = self.deadline_ms or int((datetime.now(UTC).timestamp() + 60) * 1000)
        return web.Response(
            body=body,
            content_type="application/json",
            headers={
                "Lambda-Runtime-Aws-Request-Id": request_id,
                "Lambda-Runtime-Deadline-Ms": str(deadline),
                "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:local:0:function:udf",
            },
        )

    async def _finish(self, request: web.Request) -> web.Response:
        request_id = request.match_info["id"]
        kind = request.match_info["kind"]
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        future = self.answers.get(request_id)
        if future is None or future.done():
            return web.json_response({"errorType": "InvalidRequestID"}, status=400)
        future.set_result(
            Invocation(
                request_id, kind, body, request.headers.get("Lambda-Runtime-Function-Error-Type")
            )
        )
        return web.json_response({"status": "OK"}, status=202)

    async def _init_error(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.init_errors.append(
            (request.headers.get("Lambda-Runtime-Function-Error-Type"), json.loads(raw))
        )
        return web.json_response({"status": "OK"}, status=202)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"{RUNTIME}/invocation/next", self._next)
        app.router.add_post(f"{RUNTIME}/invocation/{{id}}/{{kind:response|error}}", self._finish)
        app.router.add_post(f"{RUNTIME}/init/error", self._init_error)
        return app


@dataclass
class TaskApi:
    """The Dispatcher's ``/v1/task/*`` routes for one attempt at a time, recording each call."""

    token: str = field(default_factory=lambda: f"cap-{uuid.uuid4().hex}")
    calls: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: route name -> list of (status, body) answered before the real answer, one per call
    faults: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    #: SQL -> the answer of /v1/task/query (404 for any other SQL, as for an ungranted dataset)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    def routes(self, name: str) -> list[dict[str, Any]]:
        return [body for route, body, _ in self.calls if route == name]

    def tokens_used(self) -> set[str | None]:
        return {token for _, _, token in self.calls}

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        presented = request.headers.get("X-Trace-Task-Capability")
        body: dict[str, Any] = await request.json()
        self.calls.append((name, body, presented))
        if presented != self.token:
            return web.json_response(
                {"error": "unauthenticated", "message": "bad capability token"}, status=401
            )
        pending = self.faults.get(name)
        if pending:
            status, err = pending.pop(0)
            return web.json_response(err, status=status)
        if name == "heartbeat":
            self.token = f"cap-{uuid.uuid4().hex}"
            expires = datetime.now(UTC) + timedelta(seconds=60)
            return web.json_response(
                {"lease_expires_at": expires.isoformat(), "capability_token": self.token}
            )
        if name == "buffer-publish":
            key = body["batch"]["key"]
            duplicate = key in self.batches
            self.batches.setdefault(key, body["batch"])
            return web.json_response({"accepted": True, "duplicate": duplicate})
        if name == "query":
            answer = self.answers.get(body["sql"])
            if answer is None:
                return web.json_response(
                    {"error": "not_found", "message": "dataset not found or not readable"},
                    status=404,
                )
            return web.json_response(answer)
        return web.json_response({"error": "http_error"}, status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/task/{name}", self._handle)
        return app

    def event(self, payload: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """An invoke event for this surface's current token."""
        event: dict[str, Any] = {
            "task_id": str(uuid.uuid4()),
            "org_id": str(uuid.uuid4()),
            "job_id": None,
            "operator": "udf.test",
            "payload": dict(payload or {}),
            "status": "running",
            "attempt": 1,
            "max_attempts": 3,
            "timeout_s": 60,
            "staging_prefix": "org/x/staging/task/t/attempt/1/",
            "slot": None,
            "capability_token": self.token,
            "lease_token": str(uuid.uuid4()),
            "lease_expires_at": (datetime.now(UTC) + timedelta(seconds=60)).isoformat(),
            "bundle_url": "http://127.0.0.1:9/bundle.zip",
        }
        event.update(fields)
        return event


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port; yields ``host:port``."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Running:
    """A started ``bootstrap`` and the fakes it talks to."""

    api: RuntimeApi
    tasks: TaskApi
    proc: asyncio.subprocess.Process
    stdout: bytes = b""
    stderr: bytes = b""


def minimal_env(api: str, task_api: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the Lite runner gives a runtime (``docs/architecture/udf.md``): nothing
    inherited, no platform credential."""
    env = {
        "AWS_LAMBDA_RUNTIME_API": api,
        "TRACE_TASK_API_URL": f"http://{task_api}",
        "_HANDLER": "handler.handler",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
    }
    env.update(extra or {})
    return env


@asynccontextmanager
async def bootstrap(
    command: list[str],
    *,
    extra_env: Mapping[str, str] | None = None,
    tasks: TaskApi | None = None,
) -> AsyncIterator[Running]:
    """Start a bootstrap against fresh fakes; stops it (by its PID) on exit."""
    api = RuntimeApi()
    tasks = tasks or TaskApi()
    async with serve(api.app()) as api_addr, serve(tasks.app()) as task_addr:
        api.url, tasks.url = api_addr, task_addr
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=minimal_env(api_addr, task_addr, extra_env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        running = Running(api, tasks, proc)
        try:
            yield running
        finally:
            if proc.returncode is None:
                proc.kill()
            running.stdout, running.stderr = await proc.communicate()


def source_digest(root: Path, patterns: tuple[str, ...]) -> str:
    """SHA-256 over the files under ``root`` matching ``patterns`` (path and bytes)."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and "node_modules" not in path.parts and "target" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """One build at a time across test sessions sharing this checkout."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_node_sdk() -> Path:
    """Compile the Node SDK (``tsc``) unless its sources are unchanged; returns ``dist/``."""
    with _build_lock("node-sdk"):
        return _build_node_sdk()


def _build_node_sdk() -> Path:
    stamp = CACHE / "node-sdk.digest"
    digest = source_digest(NODE_SDK, ("src/*.ts", "tsconfig.json", "package-lock.json"))
    dist = NODE_SDK / "dist"
    if stamp.exists() and stamp.read_text() == digest and (dist / "index.js").exists():
        return dist
    tsc = NODE_SDK / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.exists():
        raise RuntimeError("sdks/node/node_modules is missing: run bash scripts/bootstrap.sh")
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run(["node", str(tsc), "-p", str(NODE_SDK / "tsconfig.json")], check=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    return dist


def build_node_bundle(src: Path, out: Path, *, name: str | None = None) -> Path:
    """``node sdks/node/build.mjs SRC OUT [--name NAME]``; returns OUT."""
    cmd = ["node", str(NODE_SDK / "build.mjs"), str(src), str(out)]
    subprocess.run([*cmd, "--name", name] if name else cmd, check=True, capture_output=True)
    return out


def build_rust_bundle(out: Path, *, name: str, example: str = "bootstrap") -> Path:
    """A Rust bundle directory: the example's executable as ``bootstrap`` and its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_rust(example), out / "bootstrap")
    manifest = {"format": 1, "name": name, "language": "rust", "handler": example}
    (out / "trace-udf.json").write_text(json.dumps(manifest))
    return out


def build_rust(example: str = "bootstrap") -> Path:
    """``cargo build --offline --release --examples`` of the Rust crate into
    ``.trace/udf-sdks/cargo-target`` unless its sources are unchanged; returns the example's
    executable."""
    with _build_lock("rust-sdk"):
        return _build_rust(example)


def _build_rust(example: str) -> Path:
    target = CACHE / "cargo-target"
    exe = target / "release" / "examples" / example
    stamp = CACHE / "rust-sdk.digest"
    digest = source_digest(RUST_SDK, ("Cargo.toml", "Cargo.lock", "src/**/*.rs", "examples/*.rs"))
    if stamp.exists() and stamp.read_text() == digest and exe.exists():
        return exe
    subprocess.run(
        [CARGO, "build", "--offline", "--release", "--examples", "--quiet"],
        cwd=RUST_SDK,
        check=True,
        env={**os.environ, "CARGO_TARGET_DIR": str(target)},
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    return exe


def write_files(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root
