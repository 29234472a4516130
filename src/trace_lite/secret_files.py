"""Secret files created on first start, safely when several processes start at once.

``trace up`` starts a Dispatcher and workers together on a fresh ``TRACE_HOME``; each needs the
same secret (the object-URL key, the platform token). ``read_or_create`` guarantees:

* the file appears whole or not at all: the secret is written to a private temp file, fsynced,
  then hard-linked into place with ``os.link``, which fails if the name exists (it never
  overwrites, unlike a rename) — so exactly one process's secret wins, and nobody can read a
  half-written file;
* every caller, winner or loser, returns what is in the file after the link: all agree;
* an empty file (truncated by hand, a crash of an older version) is refused with
  ``ValidationFailed`` instead of being used as a key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from trace_core import errors
from trace_lite.durable_files import fsync_dir, write_private


def read_or_create(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The content of ``path``, created from ``generate()`` (mode 0600) if missing.

    Returns the bytes stripped of surrounding whitespace. Raises ``ValidationFailed`` if the
    file is empty, ``OSError`` if it cannot be created or read.
    """
    path = Path(path)
    try:
        value = path.read_bytes()
    except FileNotFoundError:
        _create(path, generate())
        value = path.read_bytes()
    value = value.strip()
    if not value:
        raise errors.ValidationFailed(
            f"the secret file {path} is empty; remove it to have a new secret generated",
            field=path.name,
        )
    return value


def _create(path: Path, content: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        write_private(tmp, content)
        with contextlib.suppress(FileExistsError):  # another process won: use its secret
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


__all__ = ["read_or_create"]
