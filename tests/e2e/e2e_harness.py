"""End-to-end process harness (used by ``conftest.py``): the Dispatcher and workers as real processes, stopped by PID.

``trace_procs`` gives a ``TraceProcs`` bound to a fresh migrated database (``db_url``) and a
temporary project folder (``TRACE_HOME``). It starts ``python -m trace_servers.cli dispatcher``
and ``... worker`` as subprocesses (own session, own log file under ``tmp_path/logs``), waits
for ``/readyz``, can SIGTERM or SIGKILL any of them by PID, and kills everything at teardown.
Every wait is bounded; a failed wait (and any failed test) shows the tail of every process log.

``TraceProcs(..., dispatchers=N)`` runs N Dispatcher processes on the one database, each on its
own port (``start_dispatcher(index=i)``); ``start_worker(dispatcher=i)`` points a worker at one
of them, and ``request(..., via=i)`` talks to one. With more than one, each Dispatcher's
database sessions carry ``application_name`` ``trace-dispatcher-<i>`` so a test can tell from
the database which of them did a piece of work.

HTTP is spoken with ``http.client`` (no third-party client), so tests can send raw, malformed
or oversized bodies; rows are asserted directly with psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from pg_sql import sql
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.users import LocalUserIssuer

PLATFORM_TOKEN = "e2e-platform-token-0123456789abcdef"

#: Tables whose row counts "nothing was written" assertions compare.
WRITE_TABLES = ("tasks", "task_attempts", "task_events", "buffer_batches", "outbox")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One child process (dispatcher or worker) and its log file."""

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        log_path: Path,
        index: int = 0,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        #: for a Dispatcher, which one (its port is ``TraceProcs.ports[index]``); for a worker,
        #: the Dispatcher it talks to
        self.index = index

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.raw = body
        self.headers = headers

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.raw[:300]!r}>"


class TraceProcs:
    """A Trace Lite deployment made of child processes on one test database."""

    def __init__(
        self,
        home: Path,
        db_url: str,
        *,
        lease_s: float = 3.0,
        retry_base_s: float = 0.05,
        dispatchers: int = 1,
    ) -> None:
        self.home = home
        self.db_url = db_url
        #: one port per Dispatcher process; ``port`` / ``url`` are the first one's
        self.ports = [free_port() for _ in range(dispatchers)]
        self.port = self.ports[0]
        self.url = self.dispatcher_url(0)
        self.log_dir = home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self.retry_base_s = retry_base_s
        self.procs: list[Proc] = []
        self._counter = 0

    # -- configuration ---------------------------------------------------------------------

    def dispatcher_url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def app_name(self, index: int) -> str:
        """The ``application_name`` of Dispatcher ``index``'s database sessions (when there
        are several Dispatchers)."""
        return f"trace-dispatcher-{index}"

    @property
    def trace_dir(self) -> Path:
        return self.home / ".trace"

    @property
    def key_dir(self) -> Path:
        return self.trace_dir / "keys"

    @property
    def object_root(self) -> Path:
        return self.trace_dir / "objects"

    def read_object(self, object_key: str) -> bytes:
        """The bytes of ``object_key`` in the deployment's object store (the local store on
        disk; ``AwsTraceProcs`` reads S3)."""
        root = self.object_root
        for candidate in (root / object_key, root / "objects" / object_key):
            if candidate.is_file():
                return candidate.read_bytes()
        raise AssertionError(f"object {object_key} not found under {root}")

    def env(self) -> dict[str, str]:
        src = Path(__file__).resolve().parents[2]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
        env.update(
            {
                "TRACE_DATABASE_URL": self.db_url,
                "TRACE_HOME": str(self.home),
                "TRACE_DISPATCHER_URL": self.url,
                "TRACE_PLATFORM_TOKEN": PLATFORM_TOKEN,
                "TRACE_LEASE_S": str(self.lease_s),
                "TRACE_RETRY_BASE_S": str(self.retry_base_s),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # the package is installed editable in the venv; keep the checkout first anyway
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(src / "src"), str(src / "servers"), env.get("PYTHONPATH")) if p
        )
        return env

    # -- processes ---------------------------------------------------------------------------

    def _env_for(self, index: int, dispatcher: bool) -> dict[str, str]:
        """``env()`` pointed at Dispatcher ``index`` (its listen address for a Dispatcher)."""
        env = self.env()
        if len(self.ports) > 1:
            env["TRACE_DISPATCHER_URL"] = self.dispatcher_url(index)
            if dispatcher:
                sep = "&" if "?" in env["TRACE_DATABASE_URL"] else "?"
                env["TRACE_DATABASE_URL"] += f"{sep}application_name={self.app_name(index)}"
        return env

    def _spawn(self, name: str, *argv: str, index: int = 0) -> Proc:
        self._counter += 1
        suffix = f"-{index}" if len(self.ports) > 1 else ""
        log_path = self.log_dir / f"{self._counter:03d}-{name}{suffix}.log"
        out = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "trace_servers.cli", *argv],
                env=self._env_for(index, dispatcher=name == "dispatcher"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
            )
        finally:
            out.close()
        proc = Proc(name, popen, log_path, index)
        self.procs.append(proc)
        return proc

    def start_dispatcher(self, *, wait: bool = True, index: int = 0) -> Proc:
        proc = self._spawn("dispatcher", "dispatcher", index=index)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_worker(self, concurrency: int = 8, *, dispatcher: int = 0) -> Proc:
        return self._spawn("worker", "worker", "--concurrency", str(concurrency), index=dispatcher)

    def live(self, name: str) -> list[Proc]:
        return [p for p in self.procs if p.name == name and p.alive()]

    def kill9(self, proc: Proc) -> None:
        """SIGKILL the process (and its session) and reap it."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(10)
        assert not proc.alive(), f"{proc.name} pid {proc.pid} survived SIGKILL"

    def terminate(self, proc: Proc, timeout: float) -> int:
        """SIGTERM ``proc``; returns its exit code. Fails if it outlives ``timeout``."""
        proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{proc.name} pid {proc.pid} still running {timeout}s after SIGTERM\n"
                + self.log_tails()
            ) from None

    def stop_all(self) -> None:
        for p in self.procs:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(10)

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for p in self.procs:
            state = "alive" if p.alive() else f"exit {p.popen.returncode}"
            parts.append(f"--- {p.log_path.name} (pid {p.pid}, {state}) ---\n{p.tail(lines)}")
        return "\n".join(parts)

    # -- waiting -----------------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail with the logs after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, psycopg.Error) as exc:
                last_exc = exc
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}"
                    + (f" (last error: {last_exc!r})" if last_exc else "")
                    + "\n"
                    + self.log_tails()
                )
            time.sleep(interval)

    def wait_ready(self, proc: Proc | None = None, timeout: float = 30.0) -> None:
        """Wait for ``/readyz`` of ``proc`` (a Dispatcher), or of every Dispatcher port."""
        indexes = [proc.index] if proc is not None else list(range(len(self.ports)))

        def ready() -> bool:
            if proc is not None and not proc.alive():
                raise AssertionError(f"{proc.name} exited early\n{self.log_tails()}")
            try:
                return all(
                    self.request("GET", "/readyz", timeout=2, via=i).status == 200 for i in indexes
                )
            except OSError:
                return False

        self.wait_until(ready, timeout, f"dispatcher /readyz ({indexes})")

    # -- HTTP --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        platform: bool = False,
        capability: str | None = None,
        timeout: float = 30.0,
        via: int = 0,
    ) -> Response:
        hdrs = dict(headers or {})
        if platform:
            hdrs["Authorization"] = f"Bearer {PLATFORM_TOKEN}"
        if capability is not None:
            hdrs["X-Trace-Task-Capability"] = capability
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[via], timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, resp.read(), dict(resp.getheaders()))
        finally:
            conn.close()

    def create_tasks(
        self, tasks: list[dict[str, Any]], chunk: int = 500, *, spread: bool = False
    ) -> list[str]:
        """Create ``tasks`` in requests of ``chunk``; with ``spread``, the requests go to the
        Dispatchers in turn (else all to the first)."""
        ids: list[str] = []
        for n, i in enumerate(range(0, len(tasks), chunk)):
            r = self.request(
                "POST",
                "/internal/admin/tasks",
                body={"tasks": tasks[i : i + chunk]},
                platform=True,
                via=n % len(self.ports) if spread else 0,
            )
            assert r.status == 201, r
            ids += [t["task_id"] for t in r.json["tasks"]]
        return ids

    def create_task(self, operator: str, payload: dict[str, Any] | None = None, **kw: Any) -> str:
        (task_id,) = self.create_tasks([{"operator": operator, "payload": payload or {}, **kw}])
        return task_id

    def claim(self, task_id: str, worker_id: str = "e2e") -> dict[str, Any]:
        r = self.request(
            "POST",
            "/internal/task-claim",
            body={"task_id": task_id, "worker_id": worker_id},
            platform=True,
        )
        assert r.status == 200, r
        claim: dict[str, Any] = r.json
        return claim

    # -- SQL ---------------------------------------------------------------------------------

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params, connect_timeout=5)

    def scalar(self, query: str, params: Any = None) -> Any:
        return self.sql(query, params)[0][0]

    def counts(self) -> dict[str, int]:
        """Row counts of every table a request could write."""
        q = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in WRITE_TABLES)
        return {name: n for name, n in self.sql(q)}

    def task_states(self, task_ids: list[str] | None = None) -> dict[str, int]:
        if task_ids is None:
            rows = self.sql("SELECT state, count(*) FROM tasks GROUP BY state")
        else:
            rows = self.sql(
                "SELECT state, count(*) FROM tasks WHERE task_id = ANY(%s::uuid[]) GROUP BY state",
                (task_ids,),
            )
        return dict(rows)  # type: ignore[arg-type]

    def wait_terminal(self, task_ids: list[str], timeout: float) -> dict[str, int]:
        def done() -> dict[str, int] | None:
            states = self.task_states(task_ids)
            live = sum(n for s, n in states.items() if s not in ("completed", "failed", "canceled"))
            return None if live else states

        return self.wait_until(
            done,
            timeout,
            f"{len(task_ids)} tasks to finish (now {self.task_states(task_ids)})",
            0.25,
        )


# -- users and the ``trace`` CLI (DAG tests) ---------------------------------------------------

#: What ``trace users token`` tokens carry; the Dispatcher checks them when this is in its env.
USER_TOKEN_POLICY = {"TRACE_USER_JWT_ISSUER": "trace-lite", "TRACE_USER_JWT_AUDIENCE": "trace-api"}


def set_members(db_url: str, org: str, roles: dict[str, list[str]]) -> None:
    """Make each subject of ``roles`` a member of ``org`` with those roles (the org is created)."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            for subject, its_roles in roles.items():
                await Datasets(pool).set_member(None, org, subject, its_roles)
        finally:
            await pool.close()

    asyncio.run(go())


def start_user_stack(
    t: TraceProcs, monkeypatch: Any, org: str, roles: dict[str, list[str]]
) -> None:
    """Members ``roles`` in ``org``, then a Dispatcher that checks user tokens (``trace_cli``)."""
    set_members(t.db_url, org, roles)
    base_env = t.env
    monkeypatch.setattr(t, "env", lambda: {**base_env(), **USER_TOKEN_POLICY})
    t.start_dispatcher()


def trace_cli(t: TraceProcs, subject: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``trace ARGS`` as a user would run it, with ``subject``'s user token."""
    env = {**t.env(), "TRACE_USER_TOKEN": LocalUserIssuer.init(t.key_dir).token(subject)}
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=t.home,
    )
