"""The attempt's session policy, as a pure function: exactly the granted prefixes, nothing
wider; unsafe, wildcard or foreign prefixes refused before anything else happens."""

from __future__ import annotations

import pytest

from trace_aws.session_policy import (
    STS_MIN_S,
    CredentialGrant,
    grant_for_attempt,
    session_policy,
)
from trace_core import errors

TASK = "5f0c0a34-7f8e-4d0e-9f0e-3b8f0b7c2a11"
READS = ["org/o1/dataset/blocks/version/3/", "org/o1/dataset/logs/version/7/"]


def _grant(**kw: object) -> CredentialGrant:
    args: dict[str, object] = dict(
        bucket="trace-data", org_id="o1", task_id=TASK, attempt=2, timeout_s=60, read_prefixes=READS
    )
    args.update(kw)
    return grant_for_attempt(**args)  # type: ignore[arg-type]


def test_policy_allows_exactly_the_grant() -> None:
    policy = session_policy(_grant())
    assert policy == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [
                    "arn:aws:s3:::trace-data/org/o1/dataset/blocks/version/3/*",
                    "arn:aws:s3:::trace-data/org/o1/dataset/logs/version/7/*",
                ],
            },
            {
                "Sid": "ListInputs",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": ["arn:aws:s3:::trace-data"],
                "Condition": {
                    "StringLike": {
                        "s3:prefix": [
                            "org/o1/dataset/blocks/version/3/*",
                            "org/o1/dataset/logs/version/7/*",
                        ]
                    }
                },
            },
            {
                "Sid": "WriteStaging",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": [f"arn:aws:s3:::trace-data/org/o1/staging/task/{TASK}/attempt/2/*"],
            },
        ],
    }


def test_nothing_wider_than_the_prefixes() -> None:
    policy = session_policy(_grant())
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        assert not {a for a in st["Action"] if a.endswith("*")}
        for res in st["Resource"]:
            # every object resource ends in "<prefix>/*": never a bare bucket-wide wildcard
            assert res == "arn:aws:s3:::trace-data" or res.endswith("/*")
            assert res.count("*") <= 1
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload"}


def test_no_reads_means_write_only() -> None:
    policy = session_policy(_grant(read_prefixes=[]))
    assert [s["Sid"] for s in policy["Statement"]] == ["WriteStaging"]


def test_root_prefix_is_applied() -> None:
    policy = session_policy(_grant(root="trace/"))
    assert policy["Statement"][0]["Resource"][0] == (
        "arn:aws:s3:::trace-data/trace/org/o1/dataset/blocks/version/3/*"
    )
    assert policy["Statement"][2]["Resource"][0].startswith("arn:aws:s3:::trace-data/trace/org/")


def test_grant_checks_keys() -> None:
    g = _grant()
    assert g.allows_read("org/o1/dataset/blocks/version/3/part-0.parquet")
    assert not g.allows_read("org/o1/dataset/blocks/version/30/part-0.parquet")
    assert not g.allows_read("org/o2/dataset/blocks/version/3/x")
    assert g.allows_write(f"org/o1/staging/task/{TASK}/attempt/2/buffer/b.jsonl")
    assert not g.allows_write(f"org/o1/staging/task/{TASK}/attempt/1/buffer/b.jsonl")


@pytest.mark.parametrize("duration, timeout", [(STS_MIN_S, 60), (960, 900), (43_200, 10**6)])
def test_duration_is_tied_to_the_attempt(duration: int, timeout: int) -> None:
    assert _grant(timeout_s=timeout).duration_s == duration


@pytest.mark.parametrize(
    "prefix, error",
    [
        ("org/o2/dataset/x/", errors.Forbidden),  # another org
        ("org/o1/staging/task/x/", errors.Forbidden),  # not a dataset
        ("org/o1/", errors.Forbidden),  # wider than the dataset area
        ("org/o1/dataset/", errors.Forbidden),  # the whole dataset area
        ("org/o1/dataset/*/", errors.UnsafeKey),  # IAM wildcard
        ("org/o1/dataset/a?/", errors.UnsafeKey),
        ("org/o1/dataset/${aws:username}/", errors.UnsafeKey),
        ("org/o1/dataset/blocks", errors.UnsafeKey),  # no trailing slash: would match blocks2
        ("org/o1/dataset/../../o2/", errors.UnsafeKey),
        ("/org/o1/dataset/x/", errors.UnsafeKey),
        ("", errors.UnsafeKey),
    ],
)
def test_bad_read_prefixes_are_refused(prefix: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        _grant(read_prefixes=[prefix])


def test_requested_prefixes_narrow_within_the_grant() -> None:
    g = _grant(requested=["org/o1/dataset/blocks/version/3/part-1/"])
    assert g.read_prefixes == ("org/o1/dataset/blocks/version/3/part-1/",)
    assert _grant(requested=[READS[1]]).read_prefixes == (READS[1],)
    for outside in ("org/o1/dataset/blocks/version/4/", "org/o1/dataset/", "org/o2/dataset/b/"):
        with pytest.raises(errors.Forbidden):
            _grant(requested=[outside])
    with pytest.raises(errors.UnsafeKey):
        _grant(requested=["org/o1/dataset/blocks/version/3/*/"])


def test_unsafe_org_is_refused() -> None:
    with pytest.raises(errors.UnsafeKey):
        _grant(org_id="../o2", read_prefixes=[])
    with pytest.raises(errors.UnsafeKey):
        _grant(org_id="*", read_prefixes=[])
