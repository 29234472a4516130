"""How a sandbox reads pinned objects from S3 (the AWS profile): DuckDB's httpfs, offline.

DuckDB 1.4.4's own signed ``httpfs`` extension ships on PyPI as the ``duckdb-ext-httpfs``
wheel (the ``aws`` extra); ``httpfs_path`` finds its file, and the sandbox ``LOAD``s it by path
with unsigned extensions still refused and autoinstall/autoload off, so nothing is ever
downloaded. For one query the server hands the sandbox (on stdin, never in its environment)
the pinned objects' ``s3://`` URLs and ``S3Access.options``: the credentials of this server's
default chain, the endpoint and region, and a ``SCOPE`` of exactly the pinned versions'
prefixes. The sandbox creates a temporary secret from them, reads the objects into in-memory
tables, drops the secret and only then locks DuckDB down and runs the user SQL
(``trace_lite.query.sandbox``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import duckdb

from trace_core import errors


def httpfs_path() -> Path:
    """The ``httpfs`` extension file of the installed ``duckdb-ext-httpfs`` wheel, for the
    installed DuckDB. Raises ``Unavailable`` when the wheel is not installed."""
    spec = importlib.util.find_spec("duckdb_ext")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        found = sorted(
            Path(root).glob(f"extensions/v{duckdb.__version__}/*/httpfs.duckdb_extension")
        )
        if found:
            return found[0]
    raise errors.Unavailable(
        f"DuckDB's httpfs for {duckdb.__version__} is not installed (pip install "
        "duckdb-ext-httpfs, the aws extra)"
    )


#: key id, secret, session token (or None)
Credentials = tuple[str, str, str | None]


def default_credentials() -> Credentials:
    """The credentials of boto3's default chain (environment, profile, instance role), read
    per query so rotated ones are used. Raises ``Unavailable`` when there are none."""
    import boto3  # the aws extra

    found = boto3.session.Session().get_credentials()
    if found is None:
        raise errors.Unavailable("no AWS credentials for the Query Service")
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


@attrs.frozen
class S3Access:
    """One bucket (under an optional ``root`` prefix) as the sandbox reads it."""

    bucket: str
    region: str
    root: str = ""
    #: ``http(s)://host:port`` of an S3-compatible endpoint (moto, MinIO); None for AWS
    endpoint_url: str | None = None
    credentials: Callable[[], Credentials] = default_credentials

    @classmethod
    def of_store(cls, store: Any) -> S3Access:
        """The access of an ``S3ObjectStore`` (its bucket, root, and its client's endpoint
        and region)."""
        meta = store._s3.meta  # the store's boto3 client
        endpoint = meta.endpoint_url
        aws = endpoint is None or (urlsplit(endpoint).hostname or "").endswith("amazonaws.com")
        return cls(
            bucket=store.bucket,
            region=meta.region_name or "us-east-1",
            root=store.root,
            endpoint_url=None if aws else endpoint,
        )

    def url(self, key: str) -> str:
        """The ``s3://`` URL of the object ``key`` (a store key, under ``root``)."""
        return f"s3://{self.bucket}/{self.root}{key}"

    def options(self, keys: Iterable[str]) -> dict[str, Any]:
        """What the sandbox needs to read ``keys``: the extension file, the credentials, and
        a secret scope of exactly the keys' version prefixes."""
        key_id, secret, token = self.credentials()
        scope = sorted({self.url(k).rsplit("/", 1)[0] + "/" for k in keys})
        options: dict[str, Any] = {
            "httpfs": str(httpfs_path()),
            "key_id": key_id,
            "secret": secret,
            "region": self.region,
            "scope": scope,
        }
        if token:
            options["session_token"] = token
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            options["endpoint"] = parts.netloc
            options["use_ssl"] = parts.scheme == "https"
            options["url_style"] = "path"
        return options
