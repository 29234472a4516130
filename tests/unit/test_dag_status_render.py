"""``trace dag status`` as text: the progress bar of a job's finished tasks and the counts."""

from __future__ import annotations

from trace_servers.dag_cli import progress_bar, render_status


def test_progress_bar() -> None:
    assert progress_bar(0, 0, width=4) == "[----] 0/0"
    assert progress_bar(1, 4, width=4) == "[#---] 1/4"
    assert progress_bar(4, 4, width=4) == "[####] 4/4"
    assert progress_bar(3, 10, width=10) == "[###-------]  3/10"


def test_render_status_counts_finished_tasks_as_done() -> None:
    body = {
        "dag": "flow",
        "active_version": 3,
        "active_generation": 2,
        "jobs": {
            "src": {
                "pending": 0,
                "queued": 1,
                "running": 1,
                "completed": 1,
                "failed": 1,
                "canceled": 1,
            },
            "b": {
                "pending": 0,
                "queued": 0,
                "running": 0,
                "completed": 0,
                "failed": 0,
                "canceled": 0,
            },
        },
        "other_versions": {"2": {"running": 2}},
    }
    lines = render_status(body).splitlines()
    assert lines[0] == "flow: active version 3, pointer set 2"
    assert lines[1].split()[0] == "src" and "3/5" in lines[1]
    assert "queued 1, running 1, completed 1, failed 1, canceled 1" in lines[1]
    assert lines[2].split()[0] == "b" and "0/0" in lines[2] and lines[2].endswith("no tasks")
    assert lines[3] == "  version 2 (not active): running 2"
