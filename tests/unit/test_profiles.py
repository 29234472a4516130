"""Profile selection: one switch (``TRACE_PROFILE``), and a Lite install never imports boto3."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from trace_core import errors
from trace_servers import profiles

NO_BOTO = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    sys.modules["boto3"] = None      # any import of boto3 now raises ImportError
    sys.modules["botocore"] = None
    import trace_core, trace_lite, trace_servers
    names = []
    for pkg in (trace_core, trace_lite, trace_servers):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    import trace_aws  # the package itself is importable; its adapters are not loaded
    import trace_aws.session_policy  # pure: no boto3
    assert "boto3" not in {m for m, v in sys.modules.items() if v is not None}
    print(len(names))
    """
)


def test_lite_imports_without_boto3() -> None:
    out = subprocess.run(
        [sys.executable, "-c", NO_BOTO], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 20  # every trace_core/trace_lite/trace_servers module


def test_profile_switch() -> None:
    assert profiles.profile({}) == "lite"
    assert profiles.profile({"TRACE_PROFILE": "aws"}) == "aws"
    with pytest.raises(errors.ValidationFailed):
        profiles.profile({"TRACE_PROFILE": "gcp"})


async def test_aws_profile_names_missing_settings(tmp_path: object) -> None:
    from trace_lite.config import LiteSettings

    settings = LiteSettings.from_env(
        {"TRACE_HOME": str(tmp_path), "TRACE_PLATFORM_TOKEN": "x" * 32}
    )
    with pytest.raises(errors.ValidationFailed) as info:
        await profiles.worker_parts(settings, "postgresql://unused", {"TRACE_PROFILE": "aws"})
    assert info.value.field == "TRACE_SQS_QUEUE_URL"
