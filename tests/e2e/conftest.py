"""Fixtures of the end-to-end suite: ``trace_procs``, a ``TraceProcs`` (see ``e2e_harness``)
bound to a fresh migrated database and a temporary ``TRACE_HOME``; every process it started is
SIGKILLed at teardown, and a failed test's report carries the tail of every process log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import TraceProcs


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call" and rep.failed:
        for procs in getattr(item, "funcargs", {}).values():
            if isinstance(procs, TraceProcs):  # trace_procs, aws_procs
                rep.sections.append(("process logs", procs.log_tails(60)))
    return rep


@pytest.fixture
def trace_procs(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str
) -> Iterator[TraceProcs]:
    """Processes on a fresh database; lease 3 s unless the test is marked
    ``@pytest.mark.trace_lease(seconds)``; one Dispatcher port unless it is marked
    ``@pytest.mark.trace_dispatchers(n)``."""
    marker = request.node.get_closest_marker("trace_lease")
    lease_s = float(marker.args[0]) if marker else 3.0
    marker = request.node.get_closest_marker("trace_dispatchers")
    dispatchers = int(marker.args[0]) if marker else 1
    home = tmp_path / "home"
    home.mkdir()
    procs = TraceProcs(home, db_url, lease_s=lease_s, dispatchers=dispatchers)
    try:
        yield procs
    finally:
        procs.stop_all()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trace_lease(seconds): lease of the e2e processes")
    config.addinivalue_line(
        "markers", "trace_dispatchers(n): n Dispatcher processes on the one database"
    )
