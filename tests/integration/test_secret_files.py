"""First start on a fresh TRACE_HOME: processes started together agree on one non-empty secret."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest

from trace_core import errors
from trace_lite.config import LiteSettings
from trace_lite.secret_files import read_or_create

PROCESSES = 12
ROUNDS = 5


def _start(home: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(30)
        settings = LiteSettings.from_env({"TRACE_HOME": home})
        results.put(("ok", settings.object_secret, settings.platform_token))
    except BaseException:
        results.put(("error", traceback.format_exc(), ""))


def test_processes_started_together_get_the_same_non_empty_secret(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for n in range(ROUNDS):
        home = tmp_path / f"home{n}"
        home.mkdir()
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [
            ctx.Process(target=_start, args=(str(home), barrier, results)) for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        errors_ = [detail for status, detail, _ in got if status != "ok"]
        assert errors_ == [], errors_[0]
        assert len({secret for _, secret, _ in got}) == 1
        assert len({token for _, _, token in got}) == 1
        secret = got[0][1]
        assert len(secret) >= 32
        assert (home / ".trace" / "secrets" / "object_url_key").read_bytes().strip() == secret
        leftovers = [p.name for p in (home / ".trace" / "secrets").iterdir() if ".tmp" in p.name]
        assert leftovers == []


def test_an_existing_secret_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "key"
    assert read_or_create(path, lambda: b"first\n") == b"first"
    assert read_or_create(path, lambda: b"second") == b"first"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_an_empty_secret_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "object_url_key"
    path.write_bytes(content)
    with pytest.raises(errors.ValidationFailed, match="empty"):
        read_or_create(path, lambda: b"never used")
    home = tmp_path / "home"
    (home / ".trace" / "secrets").mkdir(parents=True)
    (home / ".trace" / "secrets" / "object_url_key").write_bytes(content)
    with pytest.raises(errors.ValidationFailed):
        _ = LiteSettings.from_env(
            {"TRACE_HOME": str(home), "TRACE_PLATFORM_TOKEN": "t"}
        ).object_secret
