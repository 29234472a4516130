"""The generated blocks in docs/ match the kernel's transition tables (scripts/gen_docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_docs_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, (
        "docs are stale; run `python scripts/gen_docs.py`\n" + proc.stdout + proc.stderr
    )


def test_check_mode_detects_a_stale_block(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for rel in gen_docs.BLOCKS:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((ROOT / rel).read_text())
    assert gen_docs.stale(tmp_path) == []
    rel, blocks = next(iter(gen_docs.BLOCKS.items()))
    name = next(iter(blocks))
    path = tmp_path / rel
    path.write_text(
        path.read_text().replace(
            f"<!-- BEGIN GENERATED: {name} -->\n", f"<!-- BEGIN GENERATED: {name} -->\nstale\n"
        )
    )
    assert gen_docs.stale(tmp_path) == [rel]
    assert gen_docs.write(tmp_path) == [rel]
    assert gen_docs.stale(tmp_path) == []
