"""The query sandbox's no-write filter (``trace_lite.query.nowrite``), installed in a real child
process: every way of creating, changing or removing a file fails, reading still works, and it
holds on threads that existed before it was installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trace_lite.query import nowrite

pytestmark = pytest.mark.skipif(not nowrite.AVAILABLE, reason="x86_64 Linux only")

CHILD = """
import os, sys, threading
from trace_lite.query import nowrite
d = sys.argv[1]
box = {}
ready, go = threading.Event(), threading.Event()
def early():  # a thread started before the filter, like DuckDB's workers
    ready.set(); go.wait()
    try:
        open(os.path.join(d, "from_thread"), "w")
        box["thread"] = "ALLOWED"
    except OSError as e:
        box["thread"] = e.errno
t = threading.Thread(target=early); t.start(); ready.wait()
nowrite.install()
go.set(); t.join()
attempts = {
    "create": lambda: open(os.path.join(d, "new"), "w"),
    "truncate_open": lambda: open(os.path.join(d, "data"), "r+b"),
    "append": lambda: open(os.path.join(d, "data"), "ab"),
    "unlink": lambda: os.unlink(os.path.join(d, "data")),
    "rename": lambda: os.rename(os.path.join(d, "data"), os.path.join(d, "moved")),
    "mkdir": lambda: os.mkdir(os.path.join(d, "dir")),
    "link": lambda: os.link(os.path.join(d, "data"), os.path.join(d, "hard")),
    "symlink": lambda: os.symlink(os.path.join(d, "data"), os.path.join(d, "soft")),
    "chmod": lambda: os.chmod(os.path.join(d, "data"), 0o777),
    "truncate": lambda: os.truncate(os.path.join(d, "data"), 0),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "ALLOWED")
    except OSError as e:
        print(name, e.errno)
print("thread", box["thread"])
print("read", open(os.path.join(d, "data"), "rb").read().decode())
"""


def test_the_filter_refuses_every_file_change_and_keeps_reads(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("kept")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines.pop("read") == "kept"
    assert lines == {name: "13" for name in lines}, lines  # EACCES, every one
    assert len(lines) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert (tmp_path / "data").read_text() == "kept"


def test_the_program_jumps_stay_inside_it() -> None:
    code = nowrite.program()
    jumps = [(i, jt, jf) for i, (op, jt, jf, _k) in enumerate(code) if op & 0x07 == 0x05]
    assert jumps
    for i, jt, jf in jumps:
        assert i + 1 + max(jt, jf) < len(code)
    assert code[-1][0] & 0x07 == 0x06  # it ends on a return
