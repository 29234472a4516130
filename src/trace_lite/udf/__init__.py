"""Lite's UDF runner: Lambda's invoke path on one machine (``docs/architecture/udf.md``).

- ``Runner`` (``trace udf runner``): accepts invoke payloads, runs each bundle's runtime in an
  ``Environment`` (own process, minimal environment, rlimits, optional network and PID
  namespaces) over the Lambda Runtime API, heartbeats and completes the attempt with its
  capability token only.
- ``UdfLauncher`` + ``RunnerInvoker``: the Dispatcher side (``TRACE_UDF_RUNNER_URL``).
- ``bundles``: deterministic packing, fetching, digest check, safe unpacking.
- ``lambda_function.handler``: the same runner as the platform's Lambda function (AWS).
"""

from trace_lite.udf.bundles import BadBundle, BundleCache, BundleUnavailable, pack, python_bundle
from trace_lite.udf.environment import Environment, netns_available
from trace_lite.udf.launcher import RunnerInvoker, UdfLauncher
from trace_lite.udf.runner import Runner, RunnerConfig

__all__ = [
    "BadBundle",
    "BundleCache",
    "BundleUnavailable",
    "Environment",
    "Runner",
    "RunnerConfig",
    "RunnerInvoker",
    "UdfLauncher",
    "netns_available",
    "pack",
    "python_bundle",
]
