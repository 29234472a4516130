"""The worker process's environment: the platform credential is read once and removed, and
every process the worker (or an operator) starts gets an explicit minimal environment.

Operator code runs in the worker process. It must not find the platform credential there
(``TRACE_PLATFORM_TOKEN``: it claims any task and fetches any payload), nor pass it, or any
other setting of the worker, to a process it starts. So the worker calls
``take_platform_token`` at start-up, which pops the variable from ``os.environ`` (and so from
the C environment that ``os.environ`` mirrors), and ``TaskContext.run_process`` starts children
with ``child_env()``: the locale, ``PATH`` and ``TMPDIR`` of the worker, ``HOME`` set to the
temporary directory, and what the caller passes explicitly -- nothing else.

Limit: Linux keeps the environment a process was started with in ``/proc/<pid>/environ``; a
process of the same user can read it there. Deployments that need more start the worker with
the credential in a file (``TRACE_HOME/secrets/platform_token``) instead of the environment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, MutableMapping

#: The environment variable that carries the platform credential.
PLATFORM_TOKEN_ENV = "TRACE_PLATFORM_TOKEN"

#: Variables a child inherits from the worker when set: locale and the search path only.
INHERITED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def take_platform_token(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Remove the platform credential from ``environ`` (``os.environ`` by default) and return
    it (None when it was not set)."""
    env = os.environ if environ is None else environ
    return env.pop(PLATFORM_TOKEN_ENV, None)


def child_env(
    extra: Mapping[str, str] | None = None, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The whole environment of a process the worker starts: ``INHERITED`` variables that are
    set in ``environ`` (``os.environ`` by default), ``HOME`` = the temporary directory, then
    ``extra``. Raises ``ValueError`` if ``extra`` names the platform credential."""
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in INHERITED if k in env}
    out["HOME"] = tempfile.gettempdir()
    if extra:
        if PLATFORM_TOKEN_ENV in extra:
            raise ValueError(f"{PLATFORM_TOKEN_ENV} is never passed to a child process")
        out.update(extra)
    return out


__all__ = ["INHERITED", "PLATFORM_TOKEN_ENV", "child_env", "take_platform_token"]
