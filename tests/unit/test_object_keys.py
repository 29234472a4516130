"""Object key validation: every rejection rule, and a fuzzed containment invariant."""

from __future__ import annotations

import os
import posixpath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trace_core.errors import UnsafeKey
from trace_core.object_keys import MAX_KEY_BYTES, is_within, validate_key, validate_prefix

SAFE_KEYS = [
    "a",
    "org/1/dataset/blocks/v3/part-0000.parquet",
    "a/b/c.d.e",
    "...",  # three dots is an ordinary name, not a traversal
    "..a/b..",
    ".hidden/x",
    "spaces are fine/and?query#frag&amp=1",
    "ünïcödé/キー",
    "x" * MAX_KEY_BYTES,
]

UNSAFE_KEYS = [
    "",
    "/abs",
    "/",
    "..",
    ".",
    "../x",
    "a/../b",
    "a/..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a\rb",
    "a\tb",
    "a\x7fb",
    "a\x85b",  # C1 control
    "a\u202eb",  # bidi override
    "a\u200bb",  # zero-width space
    "a\u2028b",  # line separator
    "%2e%2e/x",
    "%2E%2E/x",
    "a%2fb",
    "a%2Fb",
    "a%5cb",
    "a%00b",
    "%252e%252e/x",
    "100%",
    "x" * (MAX_KEY_BYTES + 1),
    "é" * (MAX_KEY_BYTES // 2 + 1),  # short in characters, too long in bytes
]


@pytest.mark.parametrize("key", SAFE_KEYS)
def test_safe_keys_are_returned_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_rejected_with_field(key: str) -> None:
    with pytest.raises(UnsafeKey) as info:
        validate_key(key)
    assert info.value.field == "key"
    assert info.value.code == "unsafe_key"


@pytest.mark.parametrize("key", [None, 1, b"a/b", ["a"]])
def test_non_strings_are_rejected(key: object) -> None:
    with pytest.raises(UnsafeKey):
        validate_key(key)
    with pytest.raises(UnsafeKey):
        validate_prefix(key)


@pytest.mark.parametrize("prefix", ["", "org/", "org/1/", "org/1/da", "a"])
def test_safe_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize(
    "prefix", ["/", "/org", "org//", "../", "a/../", "a/./", "a\\", "%2e", "a\x00", "org//x/"]
)
def test_unsafe_prefixes(prefix: str) -> None:
    with pytest.raises(UnsafeKey) as info:
        validate_prefix(prefix)
    assert info.value.field == "key"


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("org/1/a", "org/1", True),
        ("org/1/a", "org/1/", True),
        ("org/1/a/b", "org/1", True),
        ("org/10/a", "org/1", False),
        ("org/1", "org/1", False),
        ("org/1", "org/1/", False),
        ("a", "", True),
        ("org/2/a", "org/1/", False),
    ],
)
def test_is_within_is_segment_aware(key: str, prefix: str, expected: bool) -> None:
    assert is_within(key, prefix) is expected


@pytest.mark.parametrize(("key", "prefix"), [("../a", "org"), ("org/1/a", "org/../")])
def test_is_within_rejects_unsafe_input(key: str, prefix: str) -> None:
    with pytest.raises(UnsafeKey):
        is_within(key, prefix)


# Alphabet biased towards the dangerous characters so the fuzzer meets them often.
_key_text = st.one_of(
    st.text(alphabet=st.sampled_from(list("./\\%2eEfF05c\x00\n a")), max_size=24),
    st.text(max_size=40),
    st.lists(
        st.sampled_from(["..", ".", "", "a", "%2e%2e", "b.c", "\\", "~", "\u202e"]), max_size=6
    ).map("/".join),
)


@given(_key_text)
@example("..")
@example("a/../../b")
@example("...")
def test_accepted_keys_stay_inside_any_root(key: str) -> None:
    root = "/srv/trace/objects"
    try:
        accepted = validate_key(key)
    except UnsafeKey:
        return
    joined = posixpath.normpath(posixpath.join(root, accepted))
    assert joined.startswith(root + "/")
    assert joined != root
    # The OS-level join agrees (no absolute component sneaks in).
    assert os.path.join(root, accepted).startswith(root + os.sep)
    # And an accepted key is within its own parent "directory".
    parent = accepted.rsplit("/", 1)[0] if "/" in accepted else ""
    assert is_within(accepted, parent)


# --- the staging layout ----------------------------------------------------------------------


def test_staging_keys_name_their_attempt() -> None:
    from trace_core.object_keys import StagingKey, parse_staging_key, staging_prefix

    prefix = staging_prefix("o1", "t1", 3)
    assert prefix == "org/o1/staging/task/t1/attempt/3/"
    assert parse_staging_key(prefix + "out/blocks/0_100.json") == StagingKey("o1", "t1", 3)
    for other in (
        "org/o1/dataset/d/version/v/0_100.t1.a3.json",  # a canonical key
        prefix.rstrip("/"),  # the prefix itself is no object of it
        "org/o1/staging/task/t1/attempt/0/x",  # attempts count from 1
        "org/o1/staging/task/t1/attempt/3x/y",
        "x/org/o1/staging/task/t1/attempt/3/y",
    ):
        assert parse_staging_key(other) is None, other
    with pytest.raises(UnsafeKey):
        parse_staging_key(prefix + "../../4/x")
