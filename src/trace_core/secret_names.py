"""Secret names and their two namespaces (ADR 0004): the one place that decides a name is valid.

* platform secrets: ``trace/platform/{name}`` -- the Dispatcher and worker wrapper only;
* user (org) secrets: ``trace/org/{org_id}/{name}`` -- worker-pool slot secrets injected into
  the operator environment of that org's tasks.

A name is ``/``-separated segments of ``[A-Za-z0-9._+=@-]`` (Secrets Manager's alphabet without
``/`` inside a segment), no ``.``/``..`` segment, at most 512 characters, under one of the two
namespaces. ``org_prefix`` is what a listing for one org uses, so an org never sees platform
secrets or another org's.
"""

from __future__ import annotations

import re
from typing import Literal

from trace_core.errors import ValidationFailed

PLATFORM_PREFIX = "trace/platform/"
ORG_PREFIX = "trace/org/"
MAX_NAME = 512
_SEGMENT = re.compile(r"^[A-Za-z0-9._+=@-]{1,128}$")


def _check_segments(name: str, field: str) -> None:
    for seg in name.split("/"):
        if not _SEGMENT.match(seg) or seg in (".", ".."):
            raise ValidationFailed(f"invalid secret name segment {seg!r}", field=field)


def validate_secret_name(name: object) -> str:
    """Check a full secret name. Returns it. Raises ``ValidationFailed`` (``field="name"``)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValidationFailed(
            "a secret name is a non-empty string of at most 512 characters", field="name"
        )
    _check_segments(name, "name")
    if name.startswith(PLATFORM_PREFIX) and len(name) > len(PLATFORM_PREFIX):
        return name
    if name.startswith(ORG_PREFIX) and name.count("/") >= 3:
        return name
    raise ValidationFailed(
        "a secret name lives under trace/platform/ or trace/org/{org_id}/", field="name"
    )


def validate_secret_prefix(prefix: object) -> str:
    """Check a listing prefix: one that ends in ``/`` inside a namespace (or a namespace root).
    Returns it. Raises ``ValidationFailed`` (``field="prefix"``)."""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise ValidationFailed("a secret prefix must end with '/'", field="prefix")
    _check_segments(prefix[:-1], "prefix")
    if prefix.startswith(PLATFORM_PREFIX) or (
        prefix.startswith(ORG_PREFIX) and prefix.count("/") >= 3
    ):
        return prefix
    raise ValidationFailed(
        "a secret prefix must lie inside trace/platform/ or trace/org/{org_id}/", field="prefix"
    )


def platform_secret(name: str) -> str:
    """``trace/platform/{name}``. Raises ``ValidationFailed``."""
    return validate_secret_name(PLATFORM_PREFIX + name)


def org_secret(org_id: str, name: str) -> str:
    """``trace/org/{org_id}/{name}``. Raises ``ValidationFailed``."""
    _check_segments(org_id, "org_id")
    return validate_secret_name(f"{ORG_PREFIX}{org_id}/{name}")


def org_prefix(org_id: str) -> str:
    """The listing prefix of one org's secrets."""
    _check_segments(org_id, "org_id")
    return f"{ORG_PREFIX}{org_id}/"


def namespace_of(name: str) -> Literal["platform", "org"]:
    """Which namespace a valid name is in. Raises ``ValidationFailed``."""
    return "platform" if validate_secret_name(name).startswith(PLATFORM_PREFIX) else "org"


__all__ = [
    "ORG_PREFIX",
    "PLATFORM_PREFIX",
    "namespace_of",
    "org_prefix",
    "org_secret",
    "platform_secret",
    "validate_secret_name",
    "validate_secret_prefix",
]
