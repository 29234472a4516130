"""``trace up``'s supervisor: a child that exits is restarted with backoff and reported."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trace_servers.supervisor import Supervisor


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Fixture:
    def __init__(self) -> None:
        self.now = 0.0
        self.spawned: list[tuple[str, tuple[str, ...], FakeProc]] = []
        self.lines: list[str] = []
        self.sup = Supervisor(
            self.spawn,  # type: ignore[arg-type]
            clock=lambda: self.now,
            report=self.lines.append,
            backoff_base_s=1.0,
            backoff_max_s=4.0,
            stable_s=60.0,
        )

    def spawn(self, name: str, argv: Sequence[str]) -> Any:
        proc = FakeProc(100 + len(self.spawned))
        self.spawned.append((name, tuple(argv), proc))
        return proc


def test_an_exited_child_is_restarted_after_a_backoff_and_reported() -> None:
    f = Fixture()
    f.sup.start("dispatcher", ["dispatcher"])
    worker = f.sup.start("worker-0", ["worker", "--concurrency", "4"])
    f.now = 5.0
    worker.returncode = -9  # type: ignore[attr-defined]
    f.sup.check()
    assert len(f.spawned) == 2  # not yet: the backoff runs first
    assert f.lines[-1] == "worker-0 (pid 101) exited with code -9 after 5.0s; restarting in 2.0s"
    f.now = 7.0
    f.sup.check()
    name, argv, proc = f.spawned[-1]
    assert (name, argv) == ("worker-0", ("worker", "--concurrency", "4"))
    assert f.lines[-1] == f"restarted worker-0 (pid {proc.pid})"
    assert f.sup.restarts == {"dispatcher": 0, "worker-0": 1}
    assert f.spawned[0][2] in f.sup.procs and proc in f.sup.procs and worker not in f.sup.procs


def test_backoff_doubles_on_quick_exits_and_resets_after_a_stable_run() -> None:
    f = Fixture()
    f.sup.start("worker-0", ["worker"])
    delays = []
    for _ in range(4):  # crashes right after each start
        f.spawned[-1][2].returncode = 1
        f.sup.check()
        delays.append(f.lines[-1].rsplit(" ", 1)[-1])
        f.now += 10
        f.sup.check()
    assert delays == ["2.0s", "4.0s", "4.0s", "4.0s"]
    f.now += 100  # a long run
    f.spawned[-1][2].returncode = 1
    f.sup.check()
    assert f.lines[-1].endswith("restarting in 1.0s")


def test_a_running_child_is_left_alone() -> None:
    f = Fixture()
    f.sup.start("worker-0", ["worker"])
    f.now = 1000.0
    f.sup.check()
    assert len(f.spawned) == 1 and f.sup.restarts == {"worker-0": 0}
