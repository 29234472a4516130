"""UDF bundles on disk: deterministic packing, fetching by presigned URL, digest check, safe
unpacking.

* ``pack`` writes a zip whose bytes depend only on the files (entries sorted, timestamps
  1980-01-01, mode 0644 or 0755), so the same sources give the same digest.
* ``BundleCache.get`` fetches a bundle once per ``(org, digest)``, refuses bytes whose SHA-256
  is not the digest (``BadBundle``), and unpacks into a fresh directory: no absolute path, no
  ``..``, no symlink, nothing outside the directory; files world-readable (a runtime may run
  as ``nobody``).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import stat
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import aiohttp

from trace_core import errors, udf

#: The largest bundle the runner fetches.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
_EPOCH = (1980, 1, 1, 0, 0, 0)


class BundleUnavailable(Exception):
    """The bundle could not be fetched (retryable)."""


class BadBundle(Exception):
    """The bundle's bytes are not what its reference names, or not a valid bundle."""


def pack(files: Mapping[str, bytes], executables: frozenset[str] = frozenset()) -> bytes:
    """A deterministic zip of ``files`` (path -> bytes); ``executables`` get mode 0755."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            mode = 0o755 if name in executables else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            zf.writestr(info, files[name])
    return out.getvalue()


def python_bundle(
    manifest: udf.Manifest, sources: Mapping[str, bytes], *, sdk_dir: Path | None = None
) -> bytes:
    """A Python bundle: the manifest, ``sources`` and the vendored ``trace_udf`` package."""
    import json

    import trace_udf

    sdk = sdk_dir or Path(trace_udf.__file__).parent
    files = dict(sources)
    for path in sorted(sdk.glob("*.py")):
        files[f"trace_udf/{path.name}"] = path.read_bytes()
    files[udf.MANIFEST_NAME] = json.dumps(manifest.to_json(), sort_keys=True, indent=2).encode()
    return pack(files)


def read_manifest(data: bytes) -> udf.Manifest:
    """The manifest of a bundle's bytes. Raises ``BadBundle``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            raw = zf.read(udf.MANIFEST_NAME)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BadBundle(f"not a bundle (zip with {udf.MANIFEST_NAME}): {exc}") from None
    try:
        return udf.parse_manifest(raw)
    except errors.ValidationFailed as exc:
        raise BadBundle(f"{udf.MANIFEST_NAME}: {exc.field}: {exc.message}") from None


def unpack(data: bytes, dest: Path) -> udf.Manifest:
    """Unpack a bundle into the new directory ``dest``. Raises ``BadBundle``."""
    manifest = read_manifest(data)
    dest.mkdir(parents=True)
    os.chmod(dest, 0o755)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            mode = info.external_attr >> 16
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                raise BadBundle(f"unsafe path in bundle: {info.filename!r}")
            if stat.S_ISLNK(mode):
                raise BadBundle(f"symlink in bundle: {info.filename!r}")
            target = dest.joinpath(*name.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            os.chmod(target, 0o755 if mode & 0o111 else 0o644)
    for path in dest.rglob("*"):
        if path.is_dir():
            os.chmod(path, 0o755)
    entry = manifest.entry
    if entry and not (dest / entry).is_file():
        raise BadBundle(f"entry {entry!r} is not in the bundle")
    return manifest


class BundleCache:
    """Verified, unpacked bundles under ``root``, one directory per ``(org, digest)``."""

    def __init__(self, root: Path, session: aiohttp.ClientSession) -> None:
        self.root = root
        self._session = session
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._ready: dict[tuple[str, str], tuple[udf.Manifest, Path]] = {}
        #: Fetches made (cold starts of a bundle), for tests and the benchmark.
        self.fetches = 0

    async def get(self, org_id: str, ref: udf.BundleRef, url: str) -> tuple[udf.Manifest, Path]:
        """The manifest and unpacked root of a bundle. Raises ``BundleUnavailable``,
        ``BadBundle``."""
        key = (org_id, ref.digest)
        if key in self._ready:
            return self._ready[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._ready:
                return self._ready[key]
            data = await self._fetch(url)
            if udf.digest_of(data) != ref.digest:
                raise BadBundle(
                    f"bundle {ref.name}: content digest {udf.digest_of(data)} "
                    f"is not the referenced {ref.digest}"
                )
            dest = self.root / org_id / ref.hex
            tmp = self.root / f"tmp-{uuid.uuid4().hex}"
            try:
                manifest = await asyncio.to_thread(unpack, data, tmp)
                if manifest.name != ref.name:
                    raise BadBundle(f"bundle named {manifest.name!r}, referenced as {ref.name!r}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(dest.parent, 0o755)
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.fetches += 1
            self._ready[key] = (manifest, dest)
            return manifest, dest

    async def _fetch(self, url: str) -> bytes:
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise BundleUnavailable(f"bundle URL answered {resp.status}")
                if (resp.content_length or 0) > MAX_BUNDLE_BYTES:
                    raise BadBundle(f"bundle over {MAX_BUNDLE_BYTES} bytes")
                # read(n) answers what has arrived (up to n), not n: read to the end
                chunks: list[bytes] = []
                async for chunk in resp.content.iter_chunked(1 << 20):
                    chunks.append(chunk)
                    if sum(map(len, chunks)) > MAX_BUNDLE_BYTES:
                        break
                data = b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BundleUnavailable(f"bundle fetch failed: {type(exc).__name__}") from None
        if len(data) > MAX_BUNDLE_BYTES:
            raise BadBundle(f"bundle over {MAX_BUNDLE_BYTES} bytes")
        return data
