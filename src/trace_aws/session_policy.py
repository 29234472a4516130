"""The session policy of an attempt's scoped S3 credentials, as a pure function (no boto3).

The Dispatcher mints credentials for one attempt with STS ``AssumeRole`` and a *session
policy*: the effective permissions are the intersection of the role's policy and this one, so
the session policy alone decides what the attempt may touch inside the role's reach.

Theory of operation
-------------------

A ``CredentialGrant`` is what one attempt may do: read objects under its input dataset
prefixes (``org/{org_id}/dataset/...``) and write objects under its own staging prefix
(``org/{org_id}/staging/task/{task_id}/attempt/{attempt}/``). ``grant_for_attempt`` builds it and
refuses, before any AWS call, every prefix that is not safe (``trace_core.object_keys``), that
does not end in ``/`` (``org/1`` would also match ``org/10``), that lies outside the org's
dataset area (or is the whole area), or that contains an IAM wildcard or policy variable character (``*``, ``?``,
``$``) -- such a character would silently widen the grant. ``session_policy`` turns a grant into
exactly three statements: ``s3:GetObject`` on the read prefixes, ``s3:ListBucket`` conditioned on
them, ``s3:PutObject``/``s3:AbortMultipartUpload`` on the staging prefix. Nothing else.

``duration_s`` is tied to the attempt: its timeout + 60 s, at least STS's 900 s minimum and at
most 12 h.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from trace_core import errors
from trace_core.object_keys import is_within, validate_prefix

#: STS AssumeRole's minimum and maximum session length.
STS_MIN_S = 900
STS_MAX_S = 43_200
_WILDCARDS = frozenset("*?$")


def staging_prefix(org_id: str, task_id: str, attempt: int) -> str:
    """Where an attempt may write (the same rule as ``trace_lite.dispatcher.staging_prefix``)."""
    return f"org/{org_id}/staging/task/{task_id}/attempt/{attempt}/"


def _check_prefix(prefix: object, field: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise errors.UnsafeKey("a prefix must be a non-empty string", field=field)
    try:
        validate_prefix(prefix)
    except errors.UnsafeKey as exc:
        raise errors.UnsafeKey(exc.message, field=field) from None
    if not prefix.endswith("/"):
        raise errors.UnsafeKey("a granted prefix must end with '/'", field=field)
    if _WILDCARDS & set(prefix):
        raise errors.UnsafeKey("'*', '?' and '$' are not allowed in a granted prefix", field=field)
    return prefix


@attrs.frozen
class CredentialGrant:
    """What one attempt's credentials allow (prefixes are relative to the store's root)."""

    #: The bucket.
    bucket: str
    #: Prefixes the attempt may read (its input dataset versions).
    read_prefixes: tuple[str, ...]
    #: The one prefix the attempt may write (its staging prefix).
    write_prefix: str
    #: Session length in seconds (900..43200).
    duration_s: int
    #: The store's root prefix inside the bucket ("" or ending in "/").
    root: str = ""

    def allows_read(self, key: str) -> bool:
        """Whether ``key`` lies under a read prefix."""
        return any(is_within(key, p) for p in self.read_prefixes)

    def allows_write(self, key: str) -> bool:
        """Whether ``key`` lies under the write prefix."""
        return is_within(key, self.write_prefix)


def grant_for_attempt(
    *,
    bucket: str,
    org_id: str,
    task_id: str,
    attempt: int,
    timeout_s: int,
    read_prefixes: Iterable[str] = (),
    requested: Sequence[str] | None = None,
    root: str = "",
) -> CredentialGrant:
    """The grant of one attempt: read ``read_prefixes`` (each inside ``org/{org_id}/dataset/``),
    write its staging prefix. ``requested`` narrows the reads to a subset (each requested prefix
    must lie inside one granted prefix).

    Returns the grant. Raises ``UnsafeKey`` for an unsafe or wildcard prefix,
    ``Forbidden`` for a prefix outside the org's datasets or outside the grant.
    """
    dataset_area = f"org/{org_id}/dataset/"
    _check_prefix(dataset_area, "org_id")
    granted: list[str] = []
    for i, prefix in enumerate(read_prefixes):
        _check_prefix(prefix, f"read_prefixes[{i}]")
        if prefix == dataset_area or not prefix.startswith(dataset_area):
            raise errors.Forbidden(
                f"read prefix {prefix!r} is outside {dataset_area}", field=f"read_prefixes[{i}]"
            )
        granted.append(prefix)
    if requested is not None:
        narrowed: list[str] = []
        for i, prefix in enumerate(requested):
            _check_prefix(prefix, f"read_prefixes[{i}]")
            if not any(prefix.startswith(g) for g in granted):
                raise errors.Forbidden(
                    f"prefix {prefix!r} is outside the attempt's grant", field=f"read_prefixes[{i}]"
                )
            narrowed.append(prefix)
        granted = narrowed
    if root:
        _check_prefix(root, "root")
    write = _check_prefix(staging_prefix(org_id, task_id, attempt), "task_id")
    duration = max(STS_MIN_S, min(STS_MAX_S, int(timeout_s) + 60))
    return CredentialGrant(bucket, tuple(dict.fromkeys(granted)), write, duration, root)


def session_policy(grant: CredentialGrant, *, partition: str = "aws") -> dict[str, Any]:
    """The IAM session policy document for ``grant`` (see the module docstring)."""
    bucket_arn = f"arn:{partition}:s3:::{grant.bucket}"
    statements: list[dict[str, Any]] = []
    if grant.read_prefixes:
        reads = [grant.root + p for p in grant.read_prefixes]
        statements.append(
            {
                "Sid": "ReadInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"{bucket_arn}/{p}*" for p in reads],
            }
        )
        statements.append(
            {
                "Sid": "ListInputs",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [bucket_arn],
                "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in reads]}},
            }
        )
    statements.append(
        {
            "Sid": "WriteStaging",
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
            "Resource": [f"{bucket_arn}/{grant.root}{grant.write_prefix}*"],
        }
    )
    return {"Version": "2012-10-17", "Statement": statements}


__all__ = [
    "STS_MAX_S",
    "STS_MIN_S",
    "CredentialGrant",
    "grant_for_attempt",
    "session_policy",
    "staging_prefix",
]
