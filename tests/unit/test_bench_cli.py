"""``python -m bench`` refuses at start, with the command to run, when a peer is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs ``python -m bench ARGS`` with the given peer modules made unimportable, and with the
# bench's Postgres replaced by one that fails loudly, so a run that does not refuse at once
# shows up as "started postgres" instead of a minute of work.
RUNNER = """
import sys, runpy
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
import bench.common
class NoPostgres:
    def __init__(self, *a, **k):
        print("started postgres", flush=True)
        raise SystemExit(3)
bench.common.BenchPostgres = NoPostgres
sys.argv = ["bench", *sys.argv[2:]]
runpy.run_module("bench", run_name="__main__")
"""


def run_bench(hidden: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, hidden, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_missing_peers_refuse_before_any_work() -> None:
    proc = run_bench("pgqueuer,procrastinate", "--quick")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "started postgres" not in proc.stdout
    assert "pgqueuer, procrastinate are not installed" in proc.stderr
    assert f"{sys.executable} -m pip install -e '.[bench]'" in proc.stderr


def test_only_the_selected_scenarios_peers_are_required() -> None:
    proc = run_bench("pgqueuer", "--only", "procrastinate")
    assert "started postgres" in proc.stdout, proc.stderr
    proc = run_bench("pgqueuer", "--only", "pgqueuer")
    assert proc.returncode == 2
    assert "pgqueuer are not installed" in proc.stderr
