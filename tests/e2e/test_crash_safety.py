"""Crash safety: 1,200 tasks through kill -9 of the Dispatcher and of workers at random moments,
and a Postgres restart, with no manual recovery. Afterwards every task completed exactly once,
with exactly its events and buffer batches, and the attempt history is consistent.

The same scenario runs with two Dispatcher processes on the one database (ADR 0003: Dispatchers
are stateless and scale out), each killed at least once: exactly-once still holds, the outbox
publishing is split between them and no attempt is expired twice.

The scenario itself is ``crash_scenario.run_crash_scenario``; the same body runs again with the
AWS adapters in ``test_aws_lifecycle.py``."""

from __future__ import annotations

import pytest
from crash_scenario import run_crash_scenario
from e2e_harness import TraceProcs

WAVES = 12
PER_WAVE = 100  # 1,200 tasks in all


@pytest.mark.slow
@pytest.mark.timeout(290)
def test_kill9_and_postgres_restart_lose_and_duplicate_nothing(
    trace_procs: TraceProcs, pg_cluster: object
) -> None:
    run_crash_scenario(trace_procs, pg_cluster, waves=WAVES, per_wave=PER_WAVE)


@pytest.mark.slow
@pytest.mark.trace_dispatchers(2)
@pytest.mark.timeout(290)
def test_two_dispatchers_on_one_database_kill9_of_either(
    trace_procs: TraceProcs, pg_cluster: object
) -> None:
    run_crash_scenario(trace_procs, pg_cluster, waves=8, per_wave=80)
