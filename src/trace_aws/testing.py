"""Test tools for the AWS adapters: a moto server process and a SigV4 presigned-URL gate.

* ``MotoServer`` starts ``python -m moto.server`` on a free loopback port as a child process
  (its own session, stopped by PID) and waits until it answers. boto3 talks to it over real
  HTTP through ``endpoint_url``.
* ``PresignGate`` is an aiohttp reverse proxy in front of moto that checks SigV4 query
  signatures and expiry the way S3 does (moto serves presigned URLs without checking either).
  It recomputes the signature from the request it received -- method, path, query, host -- with
  the secret key, refuses (403) a mismatch or an expired URL by its own clock (``offset`` moves
  it, for expiry tests), and forwards accepted requests to moto. It proves that Trace's URLs
  are correctly scoped SigV4 URLs; only real S3 proves S3's enforcement of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qsl, quote

#: Credentials moto accepts (any non-empty values work).
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, as a child process."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **MOTO_ENV},
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)

    def reset(self) -> None:
        """Drop every resource moto holds."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# SigV4 query-signature checks (the part of S3's presigned-URL enforcement moto skips)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _q(value: str) -> str:
    return quote(value, safe="-_.~")


def check_presigned(
    method: str, raw_path: str, raw_query: str, host: str, secret_key: str, now: float
) -> str | None:
    """Why a presigned request must be refused, or None when its SigV4 signature and expiry
    hold. ``raw_path`` is the path as sent (already URI-encoded)."""
    pairs = parse_qsl(raw_query, keep_blank_values=True)
    params: dict[str, str] = {}
    for k, v in pairs:
        if k in params:
            return f"repeated parameter {k}"
        params[k] = v
    needed = (
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    )
    if any(not params.get(k) for k in needed):
        return "missing signature parameters"
    if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        return "unsupported algorithm"
    try:
        signed_at = (
            dt.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
            .replace(tzinfo=dt.UTC)
            .timestamp()
        )
        expires = int(params["X-Amz-Expires"])
    except ValueError:
        return "malformed date or expiry"
    if now > signed_at + expires:
        return "expired"
    headers = params["X-Amz-SignedHeaders"].split(";")
    if headers != ["host"]:
        return "unexpected signed headers"
    query = "&".join(
        f"{_q(k)}={_q(v)}" for k, v in sorted((k, v) for k, v in pairs if k != "X-Amz-Signature")
    )
    canonical = "\n".join([method, raw_path, query, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"])
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), date), region), service), "aws4_request"
    )
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, params["X-Amz-Signature"]):
        return "signature does not match"
    return None


__all__ = ["MOTO_ENV", "MotoServer", "check_presigned", "free_port"]
