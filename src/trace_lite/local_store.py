"""The Lite ``ObjectStore``: files under a local directory, signed URLs served over HTTP.

Layout under ``root``::

    root/objects/<key>     one file per object, the key used as a relative path
    root/tmp/              partial writes; never visible as objects

Invariants:

* every key and prefix is checked by ``trace_core.object_keys`` before any path is built, and
  the resolved path must stay inside ``root/objects`` (a symlink planted inside the root cannot
  lead out);
* a write is atomic: data goes to ``root/tmp``, is fsynced, renamed over the target, and the
  directory is fsynced — a reader sees the old object or the new one, never a torn one;
* blocking file I/O runs in ``asyncio.to_thread``; OS errors become ``Unavailable``.

Signed URLs are ``{base_url}/o/{key}?m=GET&exp=<epoch>&sig=<hex>``, ``sig`` being the
HMAC-SHA256 of ``method\\nkey\\nexp`` under the store's secret. ``object_routes`` serves them
(GET and PUT) with constant-time comparison; refusals answer 403 with a JSON error body. A
``write_guard`` given to ``object_routes`` is asked before every signed PUT (the Dispatcher
passes ``trace_lite.write_guard.StagingWriteGuard``: a PUT URL dies with its attempt's commit,
and committed objects are immutable to their producer).

Limitation of a filesystem: ``a`` and ``a/b`` cannot both exist (one would have to be a file
and a directory). ``put`` refuses the second with ``Conflict``; Trace's key layouts never do
this (objects are leaves under directory-like prefixes).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from aiohttp import web

from trace_core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    TraceError,
    Unavailable,
    UnsafeKey,
    ValidationFailed,
)
from trace_core.object_keys import validate_key, validate_prefix
from trace_core.ports import ObjectInfo
from trace_lite.durable_files import fsync_dir

#: Default largest object accepted over a signed PUT URL: 256 MiB.
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
_CHUNK = 1024 * 1024
_T = TypeVar("_T")

#: Asked before a signed PUT writes ``key``: returns None to allow, raises ``Forbidden``.
WriteGuard = Callable[[str], Awaitable[None]]


class LocalObjectStore:
    """An ``ObjectStore`` on the local filesystem.

    ``base_url`` is where ``object_routes`` are served (no trailing slash needed); ``secret``
    signs URLs (at least 16 bytes); ``clock`` returns epoch seconds for URL expiry.
    """

    def __init__(
        self,
        root: Path,
        base_url: str,
        secret: bytes,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ValidationFailed("the URL signing secret must be at least 16 bytes")
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self.max_upload_bytes = max_upload_bytes
        self._secret = bytes(secret)
        self._clock = clock
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._real_objects = os.path.realpath(self._objects)
        # key -> (inode, mtime_ns, size, sha256): every write renames a new inode into place.
        self._sha_cache: dict[str, tuple[int, int, int, str]] = {}

    def now(self) -> float:
        """The store's clock (epoch seconds), used for signed-URL expiry."""
        return self._clock()

    # -- paths ---------------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (it may not exist). Raises ``UnsafeKey``."""
        validate_key(key)
        path = self._objects / key
        real = os.path.realpath(path)
        if not real.startswith(self._real_objects + os.sep):
            raise UnsafeKey("unsafe object key: resolves outside the store", field="key")
        return path

    # -- blocking helpers (run in threads) -------------------------------------------------------

    def _write(self, key: str, path: Path, data: bytes) -> ObjectInfo:
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                raise Conflict(
                    "an object and a prefix of the same name cannot coexist here", field="key"
                ) from exc
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        sha = hashlib.sha256(data).hexdigest()
        st = path.stat()
        self._sha_cache[key] = (st.st_ino, st.st_mtime_ns, st.st_size, sha)
        return ObjectInfo(key=key, size=len(data), sha256=sha)

    def _read(self, key: str, path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object at {key!r}", field="key") from None

    def _info(self, key: str, path: Path) -> ObjectInfo:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no object at {key!r}", field="key") from None
        if not path.is_file():
            raise NotFound(f"no object at {key!r}", field="key")
        cached = self._sha_cache.get(key)
        if cached and cached[:3] == (st.st_ino, st.st_mtime_ns, st.st_size):
            return ObjectInfo(key=key, size=st.st_size, sha256=cached[3])
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no object at {key!r}", field="key") from None
        sha = digest.hexdigest()
        self._sha_cache[key] = (st.st_ino, st.st_mtime_ns, st.st_size, sha)
        return ObjectInfo(key=key, size=st.st_size, sha256=sha)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        # Walk only the deepest directory the prefix names, then filter as plain strings.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._objects / directory if directory else self._objects
        if not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self._objects)
                key = rel.replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        infos: list[ObjectInfo] = []
        for key in sorted(keys):
            try:
                infos.append(self._info(key, self._objects / key))
            except NotFound:
                continue  # deleted while listing
        return infos

    def _delete(self, key: str, path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            pass  # a prefix, not an object
        self._sha_cache.pop(key, None)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await asyncio.to_thread(fn, *args)
        except TraceError:
            raise
        except OSError as exc:
            raise Unavailable(f"object store I/O failed: {exc.strerror or exc}") from exc

    # -- ObjectStore ---------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key`` atomically (overwrites).

        Returns its ``ObjectInfo``. Raises ``UnsafeKey``, ``Conflict`` (an object and a prefix
        of the same name), ``Unavailable``.
        """
        path = self.path_for(key)
        return await self._run(self._write, key, path, bytes(data))

    async def get(self, key: str) -> bytes:
        """The object's content. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        return await self._run(self._read, key, self.path_for(key))

    async def head(self, key: str) -> ObjectInfo:
        """The object's metadata. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        return await self._run(self._info, key, self.path_for(key))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted. Raises ``UnsafeKey``, ``Unavailable``."""
        validate_prefix(prefix)
        return await self._run(self._list, prefix)

    async def delete(self, key: str) -> None:
        """Delete the object if present. Raises ``UnsafeKey``, ``Unavailable``."""
        await self._run(self._delete, key, self.path_for(key))

    async def signed_url(self, key: str, *, method: str, expires_in: int) -> str:
        """``{base_url}/o/{key}?m=..&exp=..&sig=..`` allowing ``method`` for ``expires_in`` s.

        Raises ``UnsafeKey``, ``ValidationFailed`` for another method or a non-positive expiry.
        """
        self.path_for(key)
        if method not in ("GET", "PUT"):
            raise ValidationFailed("method must be GET or PUT", field="method")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
            raise ValidationFailed("expires_in must be a positive integer", field="expires_in")
        exp = str(int(self._clock()) + expires_in)
        sig = self._sign(method, key, exp)
        return f"{self.base_url}/o/{quote(key, safe='/')}?m={method}&exp={exp}&sig={sig}"

    # -- signed URL checks -----------------------------------------------------------------------

    def _sign(self, method: str, key: str, exp: str) -> str:
        message = f"{method}\n{key}\n{exp}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def check_signature(self, *, method: str, key: str, exp: str, sig: str, now: float) -> None:
        """Check a signed-URL triple for ``method`` on ``key`` at ``now``.

        Returns None. Raises ``UnsafeKey`` for an unsafe key, ``Forbidden`` for a bad or missing
        signature, a URL signed for another method, or an expired URL.
        """
        validate_key(key)
        expected = self._sign(method, key, exp)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise Forbidden("signed URL: signature does not match")
        if not exp.isdigit() or now >= int(exp):
            raise Forbidden("signed URL: expired")


def _error(exc: TraceError, status: int) -> web.Response:
    return web.json_response(exc.to_dict(), status=status)


_STATUS = [
    (Forbidden, 403),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (UnsafeKey, 422),
    (Conflict, 409),
    (ValidationFailed, 422),
    (Unavailable, 503),
]


def _status_for(exc: TraceError) -> int:
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


def _signed_params(request: web.Request) -> tuple[str, str, str]:
    query = request.rel_url.query
    for name in ("m", "exp", "sig"):
        if len(query.getall(name, [])) != 1:
            raise Forbidden("signed URL: missing or repeated parameter")
    return query["m"], query["exp"], query["sig"]


def object_routes(
    store: LocalObjectStore,
    *,
    max_upload_bytes: int | None = None,
    write_guard: WriteGuard | None = None,
) -> list[web.RouteDef]:
    """aiohttp routes serving ``store``'s signed URLs: ``GET``/``HEAD`` and ``PUT /o/{key}``.

    ``max_upload_bytes`` defaults to the store's (256 MiB); larger uploads get 413.
    ``write_guard`` (if given) is asked before reading a PUT's body and again just before
    writing it; its ``Forbidden`` answers 403 and nothing is written. Refused
    URLs get 403, missing objects 404, unsafe keys 422, all with a JSON ``{"error", "message"}``
    body. Returns the route definitions (``app.add_routes(object_routes(store))``).
    """
    limit = store.max_upload_bytes if max_upload_bytes is None else max_upload_bytes

    def authorize(request: web.Request, method: str) -> str:
        key = request.match_info["key"]
        signed_method, exp, sig = _signed_params(request)
        if signed_method != method:
            raise Forbidden("signed URL: signed for another method")
        store.check_signature(method=method, key=key, exp=exp, sig=sig, now=store.now())
        return key

    async def get_object(request: web.Request) -> web.StreamResponse:
        try:
            key = authorize(request, "GET")
            path = store.path_for(key)
            await store.head(key)  # NotFound before streaming anything
        except TraceError as exc:
            return _error(exc, _status_for(exc))
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def put_object(request: web.Request) -> web.Response:
        try:
            key = authorize(request, "PUT")
            if write_guard is not None:
                await write_guard(key)
            if request.content_length is not None and request.content_length > limit:
                raise PayloadTooLarge(f"object larger than {limit} bytes")
            body = bytearray()
            async for chunk in request.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLarge(f"object larger than {limit} bytes")
            if write_guard is not None:
                await write_guard(key)  # the attempt may have committed during the upload
            info = await store.put(key, bytes(body))
        except TraceError as exc:
            return _error(exc, _status_for(exc))
        return web.json_response({"key": info.key, "size": info.size, "sha256": info.sha256})

    return [web.get("/o/{key:.+}", get_object), web.put("/o/{key:.+}", put_object)]


def new_secret() -> bytes:
    """A fresh random URL-signing secret (32 bytes)."""
    return secrets.token_bytes(32)


__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "LocalObjectStore",
    "WriteGuard",
    "new_secret",
    "object_routes",
]
