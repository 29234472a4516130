"""The Lite ``Signer``: Ed25519 keys in PEM files, rotated by moving files.

Layout of ``key_dir`` (directory mode 0700, key files 0600)::

    current.pem          signs tokens
    next.pem             published to verifiers, signs after the next rotation
    retired/<kid>.pem    stopped signing at the file's mtime; verifies for max TTL + leeway
    revoked              kids that never verify again, one per line (``trace keys revoke``)

Every key is pinned to ``EdDSA``; its kid is the first 16 hex characters of SHA-256 of the raw
public key. The file mtimes carry the schedule (``next.pem``'s mtime is when it was published,
a retired file's mtime is when it retired), and the rules are the kernel's ``KeyRing``: a
rotation refuses a ``next.pem`` younger than 10 minutes unless forced.

Rotation is crash-safe: (1) copy ``current.pem`` to ``retired/``, (2) rename ``next.pem`` over
``current.pem`` (atomic), (3) write a new ``next.pem``. A crash after (1) leaves a harmless
duplicate; after (2) a ring without a next key, which ``FileSigner.init`` repairs. Another
process's rotation is picked up automatically (the files are re-read when they change), and
rotations are serialized by an exclusive ``flock`` on ``key_dir/.lock``.

Revocation (``revoke``, for a leaked key) rotates first when the key is the current one (the
published next key signs at once), writes a fresh ``next.pem`` when it is the next one, then
adds the kid to ``revoked`` (atomic replace) and deletes its file. Every process re-reads the
directory when it changes: ``public_keys`` drops the kid at once, and a verifier that refreshes
its key set every second (``trace_lite.capabilities.TokenVerifier``) refuses its tokens within
seconds, including tokens it had verified before.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trace_core.errors import SignerError
from trace_core.jws import public_key_for, sign_jws, verify_jws
from trace_core.ports import PublicKey
from trace_core.token import MIN_PUBLISH_S, KeyEntry, KeyRing, KeyState, TokenPolicy
from trace_lite.durable_files import fsync_dir, write_private

ALGORITHM = "EdDSA"
_Fingerprint = tuple[tuple[str, int, int], ...]


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey, mtime: float) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_private(tmp, pem)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _read_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignerError(f"unreadable signing key {path.name}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignerError(f"signing key {path.name} is not an Ed25519 key")
    return key


class _Loaded:
    """One consistent snapshot of the key directory."""

    def __init__(
        self,
        ring: KeyRing,
        private: dict[str, ed25519.Ed25519PrivateKey],
        public: dict[str, PublicKey],
        fingerprint: _Fingerprint,
    ) -> None:
        self.ring = ring
        self.private = private
        self.public = public
        self.fingerprint = fingerprint


#: How often signing re-reads the key files for rotations made by other processes.
RECHECK_S = 1.0


class FileSigner:
    """A ``Signer`` over Ed25519 PEM files in ``key_dir``.

    ``clock`` returns epoch seconds (defaults to ``time.time``); it stamps and reads the file
    mtimes that carry the rotation schedule.
    """

    def __init__(
        self,
        key_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        min_publish_s: float = MIN_PUBLISH_S,
        grace_s: float = TokenPolicy().key_grace_s,
    ) -> None:
        self.key_dir = Path(key_dir)
        self._clock = clock
        self._min_publish_s = min_publish_s
        self._grace_s = grace_s
        self._loaded: _Loaded | None = None
        self._checked_at = 0.0
        #: Signing picks up another process's rotation within this many seconds.
        self.recheck_s = RECHECK_S

    @classmethod
    def init(
        cls,
        key_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        min_publish_s: float = MIN_PUBLISH_S,
        grace_s: float = TokenPolicy().key_grace_s,
    ) -> FileSigner:
        """Create ``key_dir`` with ``current.pem`` and ``next.pem`` where missing (mode 0600).

        Existing keys are kept. Returns the signer. Raises ``SignerError`` if the directory
        cannot be prepared.
        """
        key_dir = Path(key_dir)
        try:
            key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (key_dir / "retired").mkdir(mode=0o700, exist_ok=True)
            now = clock()
            with _DirLock(key_dir):
                if not (key_dir / "current.pem").exists():
                    _write_key(key_dir / "current.pem", ed25519.Ed25519PrivateKey.generate(), now)
                if not (key_dir / "next.pem").exists():
                    _write_key(key_dir / "next.pem", ed25519.Ed25519PrivateKey.generate(), now)
        except OSError as exc:
            raise SignerError(f"cannot prepare key directory: {exc.strerror or exc}") from exc
        return cls(key_dir, clock=clock, min_publish_s=min_publish_s, grace_s=grace_s)

    # -- loading -------------------------------------------------------------------------------

    def _fingerprint(self) -> _Fingerprint:
        paths = [self.key_dir / "current.pem", self.key_dir / "next.pem", self._revoked_path]
        retired = self.key_dir / "retired"
        if retired.is_dir():
            paths += sorted(retired.glob("*.pem"))
        out: list[tuple[str, int, int]] = []
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((str(path), st.st_ino, st.st_mtime_ns))
        return tuple(out)

    def _load_sync(self) -> _Loaded:
        fingerprint = self._fingerprint()
        if self._loaded is not None and self._loaded.fingerprint == fingerprint:
            return self._loaded
        current_path = self.key_dir / "current.pem"
        if not current_path.exists():
            raise SignerError(f"no current signing key in {self.key_dir}")
        private: dict[str, ed25519.Ed25519PrivateKey] = {}
        public: dict[str, PublicKey] = {}
        entries: list[KeyEntry] = []

        def add(path: Path) -> str:
            key = _read_key(path)
            record = public_key_for(key)
            private[record.kid] = key
            public[record.kid] = record
            return record.kid

        current_st = current_path.stat()
        current_kid = add(current_path)
        entries.append(
            KeyEntry(
                current_kid,
                KeyState.CURRENT,
                current_st.st_mtime,
                activated_at=current_st.st_mtime,
            )
        )
        next_path = self.key_dir / "next.pem"
        if next_path.exists():
            next_kid = add(next_path)
            if next_kid != current_kid:
                entries.append(KeyEntry(next_kid, KeyState.NEXT, next_path.stat().st_mtime))
        retired_dir = self.key_dir / "retired"
        if retired_dir.is_dir():
            for path in sorted(retired_dir.glob("*.pem")):
                kid = add(path)
                if any(e.kid == kid for e in entries):
                    continue  # a crash between copy and rename left a duplicate
                retired_at = path.stat().st_mtime
                entries.append(KeyEntry(kid, KeyState.RETIRED, retired_at, retired_at, retired_at))
        ring = KeyRing(
            entries,
            min_publish_s=self._min_publish_s,
            grace_s=self._grace_s,
            revoked=self._read_revoked(),
        )
        self._loaded = _Loaded(ring, private, public, fingerprint)
        return self._loaded

    @property
    def _revoked_path(self) -> Path:
        return self.key_dir / "revoked"

    def _read_revoked(self) -> frozenset[str]:
        try:
            text = self._revoked_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return frozenset()
        return frozenset(line.strip() for line in text.splitlines() if line.strip())

    async def _load(self) -> _Loaded:
        try:
            loaded = await asyncio.to_thread(self._load_sync)
        except OSError as exc:
            raise SignerError(f"cannot read signing keys: {exc.strerror or exc}") from exc
        self._checked_at = time.monotonic()
        return loaded

    async def _load_for_signing(self) -> _Loaded:
        # Signing sits on the claim path: re-read the key files (another process may have
        # rotated) at most once per RECHECK_S instead of a thread hop and stats per token.
        if self._loaded is not None and time.monotonic() - self._checked_at < self.recheck_s:
            return self._loaded
        return await self._load()

    async def ring(self) -> KeyRing:
        """The current rotation state, read from the files. Raises ``SignerError``."""
        return (await self._load()).ring

    # -- rotation ------------------------------------------------------------------------------

    def rotate(self, *, force: bool = False) -> str:
        """Promote ``next.pem`` to current, retire the old current, write a new ``next.pem``.

        Blocking (a few small file operations; call it through ``asyncio.to_thread`` from a
        running event loop). Returns the new current kid. Raises ``Conflict`` if ``next.pem``
        is younger than 10 minutes (unless ``force``) or missing, ``SignerError`` on I/O
        failure.
        """
        try:
            return self._rotate_locked(force)
        except OSError as exc:
            raise SignerError(f"key rotation failed: {exc.strerror or exc}") from exc

    def _rotate_locked(self, force: bool) -> str:
        with _DirLock(self.key_dir):
            self._loaded = None
            loaded = self._load_sync()
            now = self._clock()
            new_key = ed25519.Ed25519PrivateKey.generate()
            new_kid = public_key_for(new_key).kid
            ring = loaded.ring.rotate(now, new_kid, force=force)  # Conflict if too early
            self._write_rotation(loaded, ring, new_key, now)
            self._loaded = None
            return ring.signing_kid(now)

    def _write_rotation(
        self, loaded: _Loaded, ring: KeyRing, new_key: ed25519.Ed25519PrivateKey, now: float
    ) -> None:
        """Apply ``loaded.ring.rotate`` to the files (crash-safe order, see the module doc)."""
        old = loaded.ring.current
        retired_dir = self.key_dir / "retired"
        retired_dir.mkdir(mode=0o700, exist_ok=True)
        _write_key(retired_dir / f"{old.kid}.pem", loaded.private[old.kid], now)
        os.replace(self.key_dir / "next.pem", self.key_dir / "current.pem")
        os.utime(self.key_dir / "current.pem", (now, now))
        fsync_dir(self.key_dir)
        _write_key(self.key_dir / "next.pem", new_key, now)
        # Private keys past their grace have no reason to stay on disk.
        live = {e.kid for e in ring.entries}
        for path in retired_dir.glob("*.pem"):
            if path.stem not in live:
                path.unlink(missing_ok=True)

    def revoke(self, kid: str) -> str:
        """Stop trusting key ``kid`` in every process within seconds (a leaked key).

        A current key is rotated out first (the published next key signs from now on), a next
        key is replaced by a fresh one, a retired key's file is deleted; the kid is added to
        ``key_dir/revoked``. Blocking, like ``rotate``. Returns the current kid afterwards.
        Raises ``NotFound`` for a kid not in the key directory, ``Conflict`` when revoking the
        current key with no next key, ``SignerError`` on I/O failure.
        """
        try:
            with _DirLock(self.key_dir):
                self._loaded = None
                loaded = self._load_sync()
                now = self._clock()
                new_key = ed25519.Ed25519PrivateKey.generate()
                ring = loaded.ring.revoke(now, kid, public_key_for(new_key).kid)
                if kid == loaded.ring.current.kid:
                    self._write_rotation(loaded, ring, new_key, now)
                elif loaded.ring.next is not None and kid == loaded.ring.next.kid:
                    _write_key(self.key_dir / "next.pem", new_key, now)
                self._write_revoked(ring.revoked)
                (self.key_dir / "retired" / f"{kid}.pem").unlink(missing_ok=True)
                fsync_dir(self.key_dir)
                self._loaded = None
                return ring.current.kid
        except OSError as exc:
            raise SignerError(f"key revocation failed: {exc.strerror or exc}") from exc

    def _write_revoked(self, kids: frozenset[str]) -> None:
        path = self._revoked_path
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            write_private(tmp, "".join(f"{kid}\n" for kid in sorted(kids)).encode("ascii"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # -- Signer --------------------------------------------------------------------------------

    async def sign(self, signing_input: bytes) -> tuple[str, str, bytes]:
        """Sign with ``current.pem``; returns ``(kid, "EdDSA", signature)``.

        Raises ``SignerError`` if the key is missing or unreadable.
        """
        loaded = await self._load_for_signing()
        kid = loaded.ring.signing_kid(self._clock())
        return kid, ALGORITHM, sign_jws(loaded.private[kid], signing_input)

    async def public_keys(self) -> list[PublicKey]:
        """Current, next and in-grace retired keys (current first). Raises ``SignerError``."""
        loaded = await self._load()
        return [loaded.public[kid] for kid in loaded.ring.verifying_kids(self._clock())]

    async def verify(self, kid: str, signing_input: bytes, signature: bytes) -> bool:
        """Whether ``signature`` verifies with key ``kid``; False for unknown kids or bad input."""
        try:
            loaded = await self._load()
            if not isinstance(kid, str) or kid not in loaded.ring.verifying_kids(self._clock()):
                return False
            public = loaded.private[kid].public_key()
            return verify_jws(public, bytes(signing_input), bytes(signature))
        except Exception:
            return False


class _DirLock:
    """An exclusive ``flock`` on ``key_dir/.lock`` (serializes init and rotation)."""

    def __init__(self, key_dir: Path) -> None:
        self._path = key_dir / ".lock"
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


__all__ = ["ALGORITHM", "FileSigner"]
