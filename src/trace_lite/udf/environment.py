"""One execution environment: a UDF runtime process and the Runtime API it talks to.

The runner starts an environment for a bundle (``Environment.start``), hands it invocations one
at a time (``invoke``) and kills it (``kill``) after a failure, a timeout, or when it is no
longer wanted. Invariants:

* the runtime's environment is exactly ``runtime_env`` (no variable of the runner's own);
* rlimits (``RLIMIT_DATA`` = the manifest's memory, core 0, 256 files, 1 GiB files) are set
  before ``exec``; the process leads its own session;
* with ``isolation="netns"`` it runs under ``unshare --net --pid --fork --kill-child``: the
  relay (``relay.py``) is PID 1 of its namespace and the only path out is this environment's
  unix socket, which answers the Runtime API and forwards ``/v1/task/*`` (nothing else) to the
  Dispatcher; the runtime itself runs as ``nobody``;
* ``kill`` SIGKILLs the process group and waits for it: with a PID namespace nothing the UDF
  started survives, and the environment's files are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import aiohttp
import attrs
from aiohttp import web

from trace_core import udf

log = logging.getLogger("trace.udf")

Isolation = Literal["netns", "none"]
BASE = "/2018-06-01/runtime"
RELAY = Path(__file__).with_name("relay.py")
#: Port the relay listens on inside a namespace (any port works: the namespace is empty).
NETNS_PORT = 9001
NOBODY = 65534
_PATH = "/usr/local/bin:/usr/bin:/bin"


@attrs.define
class Pending:
    """One invocation handed to an environment."""

    request_id: str
    event: bytes
    deadline_ms: int
    arn: str
    #: ``(kind, body)``: ``response``, ``error`` or ``init_error``.
    answer: asyncio.Future[tuple[str, bytes]]


def runtime_argv(manifest: udf.Manifest, root: Path, python: str, node: str | None) -> list[str]:
    """The command that starts a bundle's runtime. Raises ``ValueError`` for a missing
    interpreter or entry."""
    match manifest.language:
        case udf.Language.PYTHON:
            loader = (
                "import sys; sys.path.insert(0, sys.argv[1]); "
                "import trace_udf.runtime as r; r.main()"
            )
            return [python, "-E", "-s", "-S", "-B", "-c", loader, str(root)]
        case udf.Language.NODE:
            if node is None:
                raise ValueError("node is not installed on this runner")
            return [node, str(root / manifest.entry)]
        case udf.Language.RUST:
            return [str(root / manifest.entry)]


def runtime_env(
    manifest: udf.Manifest, root: Path, home: Path, digest: str, api: str, task_api_url: str
) -> dict[str, str]:
    """The runtime's whole environment (``docs/architecture/udf.md``)."""
    return {
        "AWS_LAMBDA_RUNTIME_API": api,
        "TRACE_TASK_API_URL": task_api_url,
        "_HANDLER": manifest.handler,
        "LAMBDA_TASK_ROOT": str(root),
        "AWS_LAMBDA_FUNCTION_NAME": manifest.name,
        "AWS_LAMBDA_FUNCTION_VERSION": digest,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(manifest.limits.memory_mb),
        "PATH": _PATH,
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "HOME": str(home),
        "TMPDIR": str(home),
    }


def _limits(memory_mb: int) -> Any:
    data = memory_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (data, data))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))

    return apply


def netns_available() -> bool:
    """Whether this process may create network and PID namespaces (root with ``unshare``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    import subprocess

    try:
        probe = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--kill-child", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Environment:
    """A runtime process for one ``(org, bundle digest)`` and its Runtime API server."""

    def __init__(
        self,
        key: tuple[str, str],
        manifest: udf.Manifest,
        root: Path,
        work: Path,
        *,
        dispatcher_url: str,
        isolation: Isolation,
        python: str,
        node: str | None,
        session: aiohttp.ClientSession,
    ) -> None:
        self.key = key
        self.manifest = manifest
        self.root = root
        self.dir = work / f"env-{uuid.uuid4().hex[:12]}"
        self.dispatcher_url = dispatcher_url.rstrip("/")
        self.isolation = isolation
        self.python = python
        self.node = node
        self._session = session
        self._next: asyncio.Queue[Pending] = asyncio.Queue()
        #: Set by ``kill``: a runtime waiting in ``invocation/next`` is answered at once.
        self._closed = asyncio.Event()
        self.current: Pending | None = None
        self._init_error: asyncio.Future[bytes] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._runner: web.AppRunner | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self.invocations = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    # -- the Runtime API --------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=udf.MAX_RESPONSE_BYTES)
        app.router.add_get(f"{BASE}/invocation/next", self._get_next)
        app.router.add_post(f"{BASE}/invocation/{{rid}}/response", self._post_response)
        app.router.add_post(f"{BASE}/invocation/{{rid}}/error", self._post_error)
        app.router.add_post(f"{BASE}/init/error", self._post_init_error)
        if self.isolation == "netns":
            app.router.add_route("POST", "/v1/task/{tail:.*}", self._forward)
        app.router.add_route("*", "/{tail:.*}", self._refuse)
        return app

    async def _get_next(self, request: web.Request) -> web.Response:
        take = asyncio.ensure_future(self._next.get())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({take, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not take.done():
                take.cancel()
        if not take.done() or take.cancelled():
            return _error(410, "Gone", "this environment is shutting down")
        pending = take.result()
        self.current = pending
        return web.Response(
            body=pending.event,
            content_type="application/json",
            headers={
                "Lambda-Runtime-Aws-Request-Id": pending.request_id,
                "Lambda-Runtime-Deadline-Ms": str(pending.deadline_ms),
                "Lambda-Runtime-Invoked-Function-Arn": pending.arn,
            },
        )

    async def _answer(self, request: web.Request, kind: str) -> web.Response:
        current = self.current
        if current is None or request.match_info["rid"] != current.request_id:
            return _error(400, "InvalidRequestID", "not the current invocation")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = b""
            kind = "too_large"
        if not current.answer.done():
            current.answer.set_result((kind, body))
        if kind == "too_large":
            return _error(413, "RequestEntityTooLarge", "response over 6 MB")
        self.current = None
        return web.json_response({"status": "OK"}, status=202)

    async def _post_response(self, request: web.Request) -> web.Response:
        return await self._answer(request, "response")

    async def _post_error(self, request: web.Request) -> web.Response:
        return await self._answer(request, "error")

    async def _post_init_error(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.current is not None and not self.current.answer.done():
            self.current.answer.set_result(("init_error", body))
        elif self._init_error is not None and not self._init_error.done():
            self._init_error.set_result(body)
        return web.json_response({"status": "OK"}, status=202)

    async def _forward(self, request: web.Request) -> web.Response:
        """``/v1/task/*`` to the Dispatcher, with the caller's capability header only."""
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if cap := request.headers.get("X-Trace-Task-Capability"):
            headers["X-Trace-Task-Capability"] = cap
        try:
            async with self._session.post(
                self.dispatcher_url + request.path, data=await request.read(), headers=headers
            ) as resp:
                body = await resp.read()
                return web.Response(
                    body=body, status=resp.status, content_type=resp.content_type or None
                )
        except (aiohttp.ClientError, TimeoutError):
            return _error(503, "unavailable", "the Dispatcher is unreachable")

    async def _refuse(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "forbidden", "message": "a UDF may call the Runtime API and /v1/task/* only"},
            status=403,
        )

    # -- the process ------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the Runtime API and start the runtime. Raises ``ValueError`` (no interpreter),
        ``OSError``."""
        self.dir.mkdir(parents=True)
        home = self.dir / "home"
        home.mkdir()
        self._runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        argv = runtime_argv(self.manifest, self.root, self.python, self.node)
        digest = self.key[1]
        if self.isolation == "netns":
            sock = self.dir / "runtime.sock"
            await web.UnixSite(self._runner, str(sock)).start()
            os.chmod(self.dir, 0o711)
            os.chmod(sock, 0o600)
            os.chown(home, NOBODY, NOBODY)
            api = f"127.0.0.1:{NETNS_PORT}"
            env = runtime_env(self.manifest, self.root, home, digest, api, f"http://{api}")
            relay = [sys.executable, "-E", "-s", "-S", "-B", str(RELAY), str(sock)]
            argv = [
                "unshare",
                "--net",
                "--pid",
                "--fork",
                "--kill-child",
                *relay,
                str(NETNS_PORT),
                str(NOBODY),
                str(NOBODY),
                "--",
                *argv,
            ]
        else:
            port = _free_port()
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
            api = f"127.0.0.1:{port}"
            env = runtime_env(self.manifest, self.root, home, digest, api, self.dispatcher_url)
        self._init_error = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=str(home),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits(self.manifest.limits.memory_mb),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, "stdout")),
            asyncio.create_task(self._pump(self.proc.stderr, "stderr")),
        ]
        log.info(
            "udf runtime started",
            extra={"pid": self.proc.pid, "bundle": self.manifest.name, "isolation": self.isolation},
        )

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """The runtime's output goes to the runner's log, line by line, cut to 1,000 bytes."""
        with contextlib.suppress(Exception):
            while line := await stream.readline():
                log.info(
                    "udf %s: %s",
                    name,
                    line[:1000].decode(errors="replace").rstrip(),
                    extra={"bundle": self.manifest.name, "pid": self.pid},
                )

    async def invoke(self, pending: Pending, timeout_s: float) -> tuple[str, bytes]:
        """Hand ``pending`` to the runtime and wait for its answer, its exit or the timeout:
        ``("response" | "error" | "init_error", body)``, ``("exit", b"<code>")`` or
        ``("timeout", b"")``."""
        assert self.proc is not None and self._init_error is not None
        self.invocations += 1
        self._next.put_nowait(pending)
        exited = asyncio.ensure_future(self.proc.wait())
        waits: set[asyncio.Future[Any]] = {pending.answer, exited, self._init_error}
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
        if pending.answer in done:
            return pending.answer.result()
        if self._init_error in done:
            return "init_error", self._init_error.result()
        if exited in done or not self.alive():
            # an answer posted just before the exit still counts
            await asyncio.sleep(0)
            if pending.answer.done():
                return pending.answer.result()
            return "exit", str(self.proc.returncode).encode()
        return "timeout", b""

    async def kill(self) -> None:
        """SIGKILL the runtime's process group, wait for it, stop serving, remove its files."""
        self._closed.set()
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        for pump in self._pumps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pump, 2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(shutil.rmtree, self.dir, True)


def _error(status: int, etype: str, message: str) -> web.Response:
    return web.json_response({"errorType": etype, "errorMessage": message}, status=status)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_description(code: int, isolation: Isolation) -> str:
    """``exited with code 1`` / ``killed by SIGKILL``: how a runtime ended."""
    signum = -code if code < 0 else (code - 128 if isolation == "netns" and code > 128 else 0)
    if signum:
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exited with code {code}"


def deadline_ms(timeout_s: float) -> int:
    return int((time.time() + timeout_s) * 1000)


def event_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
