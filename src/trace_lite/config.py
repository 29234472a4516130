"""Trace Lite settings and composition: one place that turns environment into adapters.

Environment (all optional):

================================  ===========================================================
``TRACE_HOME``                    project folder; state lives in its ``.trace/`` (default ``.``)
``TRACE_DATABASE_URL``            Postgres state; unset → the embedded cluster is started
``TRACE_DATA_DATABASE_URL``       Postgres data; unset → ``trace_data`` in the same cluster
``TRACE_DISPATCHER_URL``          where workers reach the Dispatcher (default 127.0.0.1:8470)
``TRACE_PLATFORM_TOKEN``          the platform credential; unset → generated in TRACE_HOME
``TRACE_LEASE_S``                 lease duration (60); heartbeats at a quarter of it
``TRACE_RETRY_BASE_S``            retry backoff base (1.0)
================================  ===========================================================
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import attrs

from trace_core.lifecycle import LeasePolicy, RetryPolicy
from trace_lite.secret_files import read_or_create


def _secret_file(path: Path, nbytes: int = 32) -> str:
    """The secret in ``path``, created atomically on first use (``trace_lite.secret_files``).
    Raises ``ValidationFailed`` for an empty file."""
    value = read_or_create(path, lambda: secrets.token_urlsafe(nbytes).encode())
    return value.decode()


@attrs.frozen
class LiteSettings:
    home: Path
    database_url: str | None
    data_database_url: str | None
    dispatcher_host: str
    dispatcher_port: int
    platform_token: str
    lease_s: float
    retry_base_s: float
    queue_name: str = "tasks"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LiteSettings:
        e = dict(os.environ if env is None else env)
        home = (Path(e.get("TRACE_HOME", ".")) / ".trace").resolve()
        url = e.get("TRACE_DISPATCHER_URL", "http://127.0.0.1:8470")
        host_port = url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        return cls(
            home=home,
            database_url=e.get("TRACE_DATABASE_URL") or None,
            data_database_url=e.get("TRACE_DATA_DATABASE_URL") or None,
            dispatcher_host=host or "127.0.0.1",
            dispatcher_port=int(port or 8470),
            platform_token=e.get("TRACE_PLATFORM_TOKEN")
            or _secret_file(home / "secrets" / "platform_token"),
            lease_s=float(e.get("TRACE_LEASE_S", "60")),
            retry_base_s=float(e.get("TRACE_RETRY_BASE_S", "1.0")),
        )

    @property
    def dispatcher_url(self) -> str:
        return f"http://{self.dispatcher_host}:{self.dispatcher_port}"

    @property
    def key_dir(self) -> Path:
        return self.home / "keys"

    @property
    def object_root(self) -> Path:
        return self.home / "objects"

    @property
    def object_secret(self) -> bytes:
        return _secret_file(self.home / "secrets" / "object_url_key").encode()

    @property
    def lease(self) -> LeasePolicy:
        return LeasePolicy(lease_s=self.lease_s, heartbeat_s=self.lease_s / 4)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(base_s=self.retry_base_s, cap_s=max(100.0 * self.retry_base_s, 1.0))

    def env(self) -> dict[str, str]:
        """The environment a child process needs to see the same settings."""
        out = {
            "TRACE_HOME": str(self.home.parent),
            "TRACE_DISPATCHER_URL": self.dispatcher_url,
            "TRACE_PLATFORM_TOKEN": self.platform_token,
            "TRACE_LEASE_S": str(self.lease_s),
            "TRACE_RETRY_BASE_S": str(self.retry_base_s),
        }
        if self.database_url:
            out["TRACE_DATABASE_URL"] = self.database_url
        if self.data_database_url:
            out["TRACE_DATA_DATABASE_URL"] = self.data_database_url
        return out
