"""Object key validation: the one place that decides whether a key is safe to use.

Every ObjectStore adapter validates every key and prefix it is given with this module before
touching storage, so that a key can never address anything outside the store's root (a
filesystem directory, a bucket prefix).

Theory of operation
-------------------

A key is a relative POSIX-style path of non-empty segments separated by ``/``. A key is
*accepted* only if all of these hold; otherwise ``UnsafeKey`` (``field="key"``) is raised:

* it is a non-empty ``str`` of at most ``MAX_KEY_BYTES`` bytes in UTF-8;
* it does not start with ``/`` (absolute) and has no empty segment (``a//b``, ``a/``);
* no segment is ``.`` or ``..``;
* it contains no backslash (a separator on Windows and in some URL parsers);
* it contains no control or invisible format character (Unicode categories ``Cc``, ``Cf``,
  ``Cs``, ``Zl``, ``Zp``: NUL, newlines, DEL, C1 controls, bidi overrides, zero-width marks);
* it contains no ``%`` at all. Percent-encoding is never decoded by Trace, so a ``%`` has no
  legitimate use in a key, and rejecting it outright closes every double-decoding trick
  (``%2e%2e``, ``%2f``, ``%5c``, ``%00``, ``%252e`` ...) in any layer that might decode.

Invariant (tested by fuzzing): for every accepted key ``k`` and every directory ``root``,
``os.path.normpath(os.path.join(root, k))`` lies strictly inside ``root``.

A *prefix* (for listing) follows the same rules, except that the empty prefix is allowed
(everything) and a single trailing ``/`` is allowed (``org/1/``). Listing matches prefixes as
plain strings, as S3 does; ``is_within`` instead answers the segment-aware question "is this
key inside that directory-like prefix", which is what authorization checks need.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import attrs

from trace_core.errors import UnsafeKey

#: Longest key accepted, in UTF-8 bytes (S3's limit).
MAX_KEY_BYTES = 1024

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _reject(reason: str, field: str) -> UnsafeKey:
    return UnsafeKey(f"unsafe object key: {reason}", field=field)


def _check_chars(value: str, field: str) -> None:
    if "\\" in value:
        raise _reject("backslash is not allowed", field)
    if "%" in value:
        raise _reject("'%' is not allowed (no percent-encoding in keys)", field)
    # Fast path: printable ASCII (the common case) has no control or format characters.
    if not (value.isascii() and value.isprintable()):
        for ch in value:
            if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
                raise _reject(f"control or format character U+{ord(ch):04X} is not allowed", field)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # pragma: no cover - surrogates are caught above
        raise _reject("not valid UTF-8", field) from exc
    if size > MAX_KEY_BYTES:
        raise _reject(f"longer than {MAX_KEY_BYTES} bytes", field)


def _check_segments(segments: list[str], field: str) -> None:
    for segment in segments:
        if segment == "":
            raise _reject("empty path segment", field)
        if segment in (".", ".."):
            raise _reject(f"'{segment}' segment is not allowed", field)


def validate_key(key: object) -> str:
    """Check that ``key`` is a safe object key.

    Returns the key unchanged (a ``str``).
    Raises ``UnsafeKey`` (``field="key"``) if it breaks any rule in the module docstring.
    """
    if not isinstance(key, str):
        raise _reject("must be a string", "key")
    return _validate_str_key(key)


@functools.lru_cache(maxsize=65536)
def _validate_str_key(key: str) -> str:
    # Pure, so safe keys are remembered (large manifests check each key several times);
    # a refusal raises and is never cached.
    if key == "":
        raise _reject("must not be empty", "key")
    _check_chars(key, "key")
    if key.startswith("/"):
        raise _reject("absolute keys are not allowed", "key")
    _check_segments(key.split("/"), "key")
    return key


def validate_prefix(prefix: object) -> str:
    """Check that ``prefix`` is a safe listing prefix.

    The empty prefix and one trailing ``/`` are allowed; otherwise the key rules apply.
    Returns the prefix unchanged. Raises ``UnsafeKey`` (``field="key"``).
    """
    if not isinstance(prefix, str):
        raise _reject("must be a string", "key")
    if prefix == "":
        return prefix
    _check_chars(prefix, "key")
    if prefix.startswith("/"):
        raise _reject("absolute prefixes are not allowed", "key")
    body = prefix[:-1] if prefix.endswith("/") else prefix
    _check_segments(body.split("/"), "key")
    return prefix


def is_within(key: str, prefix: str) -> bool:
    """Whether ``key`` lies inside the directory-like ``prefix`` (segment-aware).

    ``is_within("org/1/a", "org/1")`` and ``is_within("org/1/a", "org/1/")`` are true,
    ``is_within("org/10/a", "org/1")`` and ``is_within("org/1", "org/1")`` are false; every key
    is within the empty prefix. Returns a bool.
    Raises ``UnsafeKey`` if either argument is not safe.
    """
    validate_key(key)
    validate_prefix(prefix)
    if prefix == "":
        return True
    directory = prefix if prefix.endswith("/") else prefix + "/"
    return key.startswith(directory)


# --- the staging layout -------------------------------------------------------------------


def staging_prefix(org_id: str, task_id: str, attempt: int) -> str:
    """Where an attempt may write objects (buffer batches, staged outputs):
    ``org/{org_id}/staging/task/{task_id}/attempt/{attempt}/``. The one definition of it."""
    return f"org/{org_id}/staging/task/{task_id}/attempt/{attempt}/"


@attrs.frozen
class StagingKey:
    """A key inside an attempt's staging prefix, taken apart."""

    org_id: str
    task_id: str
    attempt: int


_STAGING_RE = re.compile(r"org/([^/]+)/staging/task/([^/]+)/attempt/([1-9][0-9]{0,8})/.+")


def parse_staging_key(key: str) -> StagingKey | None:
    """The attempt whose staging prefix holds ``key`` (``None`` for any other key).

    Returns a ``StagingKey``. Raises ``UnsafeKey`` if ``key`` is not safe."""
    validate_key(key)
    m = _STAGING_RE.fullmatch(key)
    if m is None:
        return None
    return StagingKey(org_id=m[1], task_id=m[2], attempt=int(m[3]))


__all__ = [
    "MAX_KEY_BYTES",
    "StagingKey",
    "is_within",
    "parse_staging_key",
    "staging_prefix",
    "validate_key",
    "validate_prefix",
]
