"""``trace worker`` with one test double: the built-in ``sleep`` operator first writes what its
attempt saw to the JSON-lines file ``$E2E_SLOT_PROBE_FILE`` (fsynced before it sleeps, so an
attempt whose worker is SIGKILLed mid-sleep is on record), then sleeps as usual.

Each line: ``{task_id, attempt, slot, env, process_env, pid}`` where ``env`` is the attempt's
``ctx.env`` (its slot's ``env`` and resolved ``secret_env``) and ``process_env`` the values the
worker PROCESS's environment holds for those same names (slot variables must never be put there,
where concurrent attempts of other slots would see them). The file is the test's own record,
outside the deployment's logs and tables.

Run as ``python slot_probe_worker.py worker --concurrency N`` (argv as ``trace``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from trace_sdk import BUILTIN_OPERATORS, TaskContext
from trace_servers.cli import main

PROBE_FILE = os.environ["E2E_SLOT_PROBE_FILE"]
_sleep = BUILTIN_OPERATORS["sleep"]
#: The variable names the test's slots define (``env`` and ``secret_env``).
NAMES = ("SLOT_NAME", "RPC_KEY")


async def probe_sleep(ctx: TaskContext) -> dict[str, Any] | None:
    slot = ctx.task.slot
    line = json.dumps(
        {
            "task_id": ctx.task.task_id,
            "attempt": ctx.attempt,
            "slot": None if slot is None else slot.index,
            "env": dict(ctx.env),
            "process_env": {n: os.environ[n] for n in NAMES if n in os.environ},
            "pid": os.getpid(),
        },
        sort_keys=True,
    )
    fd = os.open(PROBE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return await _sleep(ctx)


BUILTIN_OPERATORS["sleep"] = probe_sleep  # the worker copies the dict when it starts

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
