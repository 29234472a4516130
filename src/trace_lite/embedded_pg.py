"""A private PostgreSQL cluster for Trace Lite, tests and the demo.

Lite runs against a real PostgreSQL server.  When ``TRACE_DATABASE_URL`` is unset it starts
its own cluster with the installed ``initdb``/``pg_ctl`` under a project-local folder
(``<repo>/.trace/pg`` by default) and reuses it across runs.

* Binaries come from ``/usr/lib/postgresql/<newest>/bin`` (Debian layout) or from
  ``pg_config --bindir`` on ``PATH``.
* ``initdb`` and ``postgres`` refuse to run as root.  When this process is root the cluster
  is owned by, and every server command runs as, the unprivileged ``postgres`` OS user.
* The server listens on a unix socket only (``listen_addresses = ''``).  Unix socket paths are
  limited to ~107 bytes, so when the project path is too long the socket lives in a short
  ``/tmp/trace-pg-<hash>`` directory instead.
* Operational defaults (``docs/standards/operations.md``, row "Postgres server") are written to
  ``trace.conf`` in the data directory,
  which ``postgresql.conf`` includes: fsync and synchronous_commit on,
  ``idle_in_transaction_session_timeout = 60s``, ``lock_timeout = 5s``.  Callers set
  ``statement_timeout`` per session (5 s on claim paths, 30 s for the API).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "ExternalPostgres",
    "default_base_dir",
    "default_database_urls",
    "find_bindir",
    "project_root",
]

SERVER_USER = "postgres"
SUPERUSER = "postgres"
DEFAULT_PORT = 5433
STATE_DBNAME = "trace"
DATA_DBNAME = "trace_data"
# Max bytes of a unix socket path (sun_path is 108 bytes including the NUL).
_MAX_SOCKET_PATH = 100

SERVER_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "idle_in_transaction_session_timeout": "60s",
    "lock_timeout": "5s",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_connections": "off",
    "log_disconnections": "off",
}


#: Where clusters of unreachable checkouts live (see ``EmbeddedPostgres``).
FALLBACK_ROOT = Path("/var/tmp/trace-pg")


def _searchable_by_others(path: Path) -> bool:
    """Whether every existing ancestor of ``path`` lets other users enter it (``o+x``)."""
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            return False
    return True


class EmbeddedPostgresError(RuntimeError):
    """The private cluster could not be initialised, started or stopped."""


def project_root() -> Path:
    """The project folder: ``$TRACE_HOME`` if set, else the current directory."""
    home = os.environ.get("TRACE_HOME")
    return Path(home).resolve() if home else Path.cwd().resolve()


def default_base_dir() -> Path:
    return project_root() / ".trace" / "pg"


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in path.parent.name.split("."))
    except ValueError:
        return (-1,)


def find_bindir() -> Path:
    """Directory holding ``initdb``/``pg_ctl``/``postgres``: newest Debian install, else PATH."""
    candidates = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        key=lambda b: _version_key(b / "x"),
    )
    if candidates:
        return candidates[-1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise EmbeddedPostgresError(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, "
        "no pg_config on PATH); run scripts/bootstrap.sh or apt-get install postgresql"
    )


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an unreaped zombie is dead for us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in {"Z", "X"}


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class EmbeddedPostgres:
    """A private PostgreSQL cluster rooted at ``base_dir``.

    Layout: ``base_dir/data`` (PGDATA), ``base_dir/run`` (socket dir, unless the path is too
    long), ``base_dir/log/postgres.log``.  All methods are synchronous and idempotent where
    that makes sense; ``start()`` reuses a server that is already running.
    """

    def __init__(
        self,
        base_dir: Path | str | None = None,
        *,
        port: int = DEFAULT_PORT,
        settings: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.base_dir = Path(base_dir if base_dir is not None else default_base_dir()).absolute()
        if os.geteuid() == 0 and not _searchable_by_others(self.base_dir):
            # The server runs as the postgres OS user, which cannot enter a checkout under a
            # private folder (e.g. /root, mode 700). Keep the cluster in a stable spot outside
            # it instead, named after the original path so every run finds the same cluster.
            self.base_dir = FALLBACK_ROOT / _short_hash(str(self.base_dir))
        self.port = port
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self.bindir = find_bindir()
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "log" / "postgres.log"
        self.socket_dir = self._choose_socket_dir()
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise EmbeddedPostgresError(
                    f"running as root but OS user {SERVER_USER!r} does not exist; "
                    "run scripts/bootstrap.sh"
                ) from exc

    # ------------------------------------------------------------------ paths and commands
    def _choose_socket_dir(self) -> Path:
        preferred = self.base_dir / "run"
        if len(str(preferred / f".s.PGSQL.{self.port}")) <= _MAX_SOCKET_PATH:
            return preferred
        return Path("/tmp") / f"trace-pg-{_short_hash(str(self.base_dir))}"

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _run(
        self, args: Sequence[str | Path], *, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the ``postgres`` OS user when we are root."""
        kwargs: dict[str, Any] = {}
        env = dict(os.environ)
        env.pop("PGDATA", None)
        env["LC_ALL"] = "C"
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
            env["HOME"] = self._run_as.pw_dir
            env["USER"] = env["LOGNAME"] = SERVER_USER
        proc = subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            env=env,
            timeout=timeout,
            # Detach from our process group so a Ctrl-C in the terminal does not reach the
            # postmaster that pg_ctl forks.
            start_new_session=True,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{Path(str(args[0])).name} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}{self._log_tail()}"
            )
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- postgres.log (tail) ---\n" + "\n".join(text)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise init/start/stop between processes sharing this cluster."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.base_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ lifecycle
    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _prepare_dirs(self) -> None:
        for d in (self.base_dir, self.data_dir, self.log_file.parent, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self.socket_dir.chmod(0o700)
        for d in (self.data_dir, self.log_file.parent, self.socket_dir):
            self._chown(d)
        if self._run_as is not None:
            probe = self._run(
                ["test", "-w", self.data_dir, "-a", "-w", self.socket_dir], check=False
            )
            if probe.returncode != 0:
                raise EmbeddedPostgresError(
                    f"OS user {SERVER_USER!r} cannot reach {self.data_dir} or "
                    f"{self.socket_dir}: every parent folder must be searchable (o+x); "
                    "move the project or set TRACE_HOME to a reachable folder"
                )

    def init(self) -> None:
        """Run ``initdb`` once; later calls only refresh ``trace.conf``."""
        self._prepare_dirs()
        if not self.is_initialized():
            if any(self.data_dir.iterdir()):
                raise EmbeddedPostgresError(f"{self.data_dir} is not empty and not a cluster")
            self._run(
                [
                    self.bindir / "initdb",
                    "-D",
                    self.data_dir,
                    "--auth=trust",
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                timeout=300,
            )
            conf = self.data_dir / "postgresql.conf"
            with conf.open("a") as fh:
                fh.write("\n# Trace Lite settings (written on every start)\ninclude 'trace.conf'\n")
        self._write_conf()

    def _write_conf(self) -> None:
        settings = {
            **self.settings,
            "listen_addresses": "",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0777",
        }
        lines = ["# Generated by trace_lite.embedded_pg; edits are overwritten."]
        for key, value in settings.items():
            escaped = value.replace("'", "''")
            lines.append(f"{key} = '{escaped}'")
        path = self.data_dir / "trace.conf"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        self._chown(path)

    def postmaster_pid(self) -> int | None:
        """PID from ``postmaster.pid`` if that process is alive, else ``None``."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first.strip())
        except (OSError, IndexError, ValueError):
            return None
        if not _alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        if b"postgres" not in cmdline and b"postmaster" not in cmdline:
            return None  # stale pid file, PID reused by another program
        return pid

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None and self.socket_path.exists()

    def start(self) -> EmbeddedPostgres:
        """Initialise if needed and start the server; reuse it if it is already running."""
        with self._lock():
            if self.is_running():
                self._wait_ready()
                return self
            self.init()
            deadline = time.monotonic() + self.start_timeout
            while True:
                proc = self._run(
                    [
                        self.bindir / "pg_ctl",
                        "start",
                        "-D",
                        self.data_dir,
                        "-l",
                        self.log_file,
                        "-w",
                        "-t",
                        str(int(self.start_timeout)),
                        "-s",
                    ],
                    check=False,
                    timeout=self.start_timeout + 30,
                )
                if proc.returncode == 0:
                    break
                # After kill9() orphaned backends may hold the old shared memory for a moment.
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"pg_ctl start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                        f"{self._log_tail()}"
                    )
                time.sleep(0.5)
            self._wait_ready()
            return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise EmbeddedPostgresError(f"server not ready: {last}{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); no-op if not running."""
        if mode not in {"smart", "fast", "immediate"}:
            raise ValueError(f"bad shutdown mode {mode!r}")
        with self._lock():
            if self.postmaster_pid() is None:
                return
            self._run(
                [
                    self.bindir / "pg_ctl",
                    "stop",
                    "-D",
                    self.data_dir,
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                    "-s",
                ],
                timeout=120,
            )

    def restart(self) -> EmbeddedPostgres:
        self.stop()
        return self.start()

    def kill9(self, *, wait: float = 10.0) -> None:
        """SIGKILL the postmaster (a crash, for fault tests); waits until it is gone."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            # Reap it in case it is our own child (not the usual case: pg_ctl forks it).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"postmaster {pid} survived SIGKILL")

    def destroy(self) -> None:
        """Stop the server and delete the whole cluster folder."""
        self.stop(mode="immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if self.socket_dir != self.base_dir / "run":
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    # ------------------------------------------------------------------ databases
    def url(self, dbname: str = STATE_DBNAME) -> str:
        """A libpq URL, e.g. ``postgresql://postgres@/trace?host=/path/run&port=5433``."""
        return (
            f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"
        )

    def admin_url(self) -> str:
        return self.url("postgres")

    def create_database(self, name: str, template: str | None = None) -> str:
        _create_database(self.admin_url(), name, template)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        _drop_database(self.admin_url(), name)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.base_dir)!r}, port={self.port})"


class ExternalPostgres:
    """The database-management subset of :class:`EmbeddedPostgres` for a server we do not own.

    ``admin_url`` must name a maintenance database (usually ``postgres``) as a role that may
    create databases.  ``url(dbname)`` swaps the database name in that URL.
    """

    def __init__(self, admin_url: str) -> None:
        self._admin_url = admin_url
        self._info = psycopg.conninfo.conninfo_to_dict(admin_url)

    def start(self) -> ExternalPostgres:
        with psycopg.connect(self._admin_url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Not ours to stop."""

    def is_running(self) -> bool:
        try:
            self.start()
        except psycopg.OperationalError:
            return False
        return True

    def admin_url(self) -> str:
        return self._admin_url

    def url(self, dbname: str = STATE_DBNAME) -> str:
        return psycopg.conninfo.make_conninfo(self._admin_url, dbname=dbname)

    def create_database(self, name: str, template: str | None = None) -> str:
        _create_database(self._admin_url, name, template)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        _drop_database(self._admin_url, name)


def _create_database(admin_url: str, name: str, template: str | None) -> str:
    """CREATE DATABASE unless it exists; returns ``name``."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists:
            return name
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
        try:
            conn.execute(stmt)
        except psycopg.errors.DuplicateDatabase:
            pass  # created concurrently
    return name


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def default_database_urls(
    base_dir: Path | None = None, *, port: int = DEFAULT_PORT
) -> tuple[str, str]:
    """``(state_url, data_url)`` for Lite.

    From ``TRACE_DATABASE_URL`` / ``TRACE_DATA_DATABASE_URL`` when set (the data URL defaults
    to the state URL); otherwise start (or reuse) the embedded cluster under
    ``base_dir`` (default ``<project>/.trace/pg``) and make sure databases ``trace`` and
    ``trace_data`` exist.
    """
    state = os.environ.get("TRACE_DATABASE_URL")
    data = os.environ.get("TRACE_DATA_DATABASE_URL")
    if state:
        return state, data or state
    cluster = EmbeddedPostgres(base_dir or default_base_dir(), port=port).start()
    cluster.create_database(STATE_DBNAME)
    cluster.create_database(DATA_DBNAME)
    return cluster.url(STATE_DBNAME), data or cluster.url(DATA_DBNAME)
