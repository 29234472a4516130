"""Writing local files so that a crash leaves the old file or the new one, never a torn one.

The Lite adapters that keep state in files (signing keys, secret files, the local object
store) write a private temp file next to the target, fsync it, move it into place (a rename, or
a hard link that never overwrites), and fsync the directory so the new name survives a power
loss. The two steps they share live here; each caller keeps its own naming, move and cleanup.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, content: bytes) -> None:
    """Create ``path`` (mode 0600; it must not exist), write ``content`` and fsync it.

    Raises ``FileExistsError`` if ``path`` exists, ``OSError``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename or link into it) to disk. Raises ``OSError``."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
