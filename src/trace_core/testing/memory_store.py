"""An in-memory ``ObjectStore`` with signed URLs and fault hooks, for tests.

Signed URLs look like ``memory://{key}?method=GET&expires=<epoch>&sig=<hex>``; the signature
is an HMAC-SHA256 over ``method\\nkey\\nexpires`` with a per-store random secret.
``verify_signed_url`` checks one, and ``fetch_signed`` plays the part of the HTTP server that
would serve it (status code and body), so the conformance suite can exercise signed URLs on
the memory adapter exactly as on the real ones.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qs, quote, unquote

from trace_core.errors import Forbidden, NotFound, TraceError, ValidationFailed
from trace_core.object_keys import validate_key, validate_prefix
from trace_core.ports import ObjectInfo

_SCHEME = "memory://"
#: Operation names accepted by ``fail_next``.
OPERATIONS = frozenset({"put", "get", "head", "list", "delete", "signed_url"})


def _info(key: str, data: bytes) -> ObjectInfo:
    return ObjectInfo(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())


class MemoryObjectStore:
    """A dict-backed ``ObjectStore``.

    ``clock`` returns epoch seconds and is used only for signed-URL expiry. ``calls`` logs every
    call as ``(operation, key_or_prefix)``, in order, failed ones included.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, secret: bytes | None = None):
        self._objects: dict[str, bytes] = {}
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._faults: dict[str, list[BaseException]] = {}
        #: Every call as ``(operation, key_or_prefix)``.
        self.calls: list[tuple[str, str]] = []

    # -- fault hooks ---------------------------------------------------------------------------

    def fail_next(self, op: str, exc: BaseException) -> None:
        """Make the next call of operation ``op`` raise ``exc`` before doing anything.

        Failures queue up per operation. Raises ``ValueError`` for an unknown operation name.
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; one of {sorted(OPERATIONS)}")
        self._faults.setdefault(op, []).append(exc)

    def _enter(self, op: str, target: object) -> None:
        self.calls.append((op, target if isinstance(target, str) else repr(target)))
        queued = self._faults.get(op)
        if queued:
            raise queued.pop(0)

    # -- ObjectStore ---------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key`` (overwrites). Raises ``UnsafeKey``."""
        self._enter("put", key)
        validate_key(key)
        self._objects[key] = bytes(data)
        return _info(key, self._objects[key])

    async def get(self, key: str) -> bytes:
        """The object's content. Raises ``NotFound``, ``UnsafeKey``."""
        self._enter("get", key)
        validate_key(key)
        try:
            return self._objects[key]
        except KeyError:
            raise NotFound(f"no object at {key!r}", field="key") from None

    async def head(self, key: str) -> ObjectInfo:
        """The object's metadata. Raises ``NotFound``, ``UnsafeKey``."""
        self._enter("head", key)
        validate_key(key)
        try:
            return _info(key, self._objects[key])
        except KeyError:
            raise NotFound(f"no object at {key!r}", field="key") from None

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key. Raises ``UnsafeKey``."""
        self._enter("list", prefix)
        validate_prefix(prefix)
        return [_info(k, v) for k, v in sorted(self._objects.items()) if k.startswith(prefix)]

    async def delete(self, key: str) -> None:
        """Delete the object if present. Raises ``UnsafeKey``."""
        self._enter("delete", key)
        validate_key(key)
        self._objects.pop(key, None)

    async def signed_url(self, key: str, *, method: str, expires_in: int) -> str:
        """A ``memory://`` URL allowing ``method`` on ``key`` for ``expires_in`` seconds.

        Raises ``UnsafeKey``, ``ValidationFailed`` for another method or a non-positive expiry.
        """
        self._enter("signed_url", key)
        validate_key(key)
        if method not in ("GET", "PUT"):
            raise ValidationFailed("method must be GET or PUT", field="method")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
            raise ValidationFailed("expires_in must be a positive integer", field="expires_in")
        expires = int(self._clock()) + expires_in
        sig = self._sign(method, key, expires)
        return f"{_SCHEME}{quote(key, safe='/')}?method={method}&expires={expires}&sig={sig}"

    # -- signed URLs ---------------------------------------------------------------------------

    def _sign(self, method: str, key: str, expires: int) -> str:
        message = f"{method}\n{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify_signed_url(self, url: str, now: float, *, method: str | None = None) -> str:
        """Check a signed URL at ``now`` (epoch seconds), for ``method`` if given.

        Returns the key it grants. Raises ``Forbidden`` for a foreign, tampered or expired URL
        or one signed for another method; ``UnsafeKey`` for a URL naming an unsafe key.
        """
        if not url.startswith(_SCHEME) or "?" not in url:
            raise Forbidden("not a signed memory URL")
        path, query = url[len(_SCHEME) :].split("?", 1)
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        if any(len(v) != 1 for v in params.values()):
            raise Forbidden("signed URL: repeated parameter")
        signed_method = params.get("method", [""])[0]
        expires_text = params.get("expires", [""])[0]
        sig = params.get("sig", [""])[0]
        key = validate_key(unquote(path))
        if not expires_text.isdigit():
            raise Forbidden("signed URL: bad expiry")
        expires = int(expires_text)
        expected = self._sign(signed_method, key, expires)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise Forbidden("signed URL: signature does not match")
        if now >= expires:
            raise Forbidden("signed URL: expired")
        if method is not None and method != signed_method:
            raise Forbidden("signed URL: signed for another method")
        return key

    async def fetch_signed(
        self, url: str, method: str, data: bytes | None = None
    ) -> tuple[int, bytes]:
        """Serve a signed URL as an HTTP server would: returns ``(status, body)``.

        200 with the content for GET, 200 for PUT, 403 for a refused URL, 404 for a missing
        object, 422 for an unsafe key. Never raises for a bad URL.
        """
        try:
            key = self.verify_signed_url(url, self._clock(), method=method)
            if method == "GET":
                return 200, self._objects[key] if key in self._objects else _raise_not_found()
            if method == "PUT":
                self._objects[key] = bytes(data or b"")
                return 200, b""
            return 405, b""
        except Forbidden:
            return 403, b""
        except NotFound:
            return 404, b""
        except TraceError:
            return 422, b""


def _raise_not_found() -> bytes:
    raise NotFound()


__all__ = ["OPERATIONS", "MemoryObjectStore"]
