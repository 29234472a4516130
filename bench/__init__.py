"""Trace benchmarks: ``python -m bench`` (or ``nox -s bench``).

End-to-end no-op task throughput and wake-to-claim latency for Trace (the kernel in-process,
and the Dispatcher over HTTP with worker processes) side by side with peers (pgqueuer,
procrastinate) and a raw ``SKIP LOCKED`` baseline, all on the same PostgreSQL in the same run,
printed as one table with ratios. See ``docs/performance.md``.
"""
