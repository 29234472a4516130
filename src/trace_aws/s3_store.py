"""``S3ObjectStore``: the ObjectStore port on Amazon S3 (or MinIO / any S3-compatible store).

Theory of operation
-------------------

* Every key and prefix is checked with ``trace_core.object_keys`` before any call, so a key can
  never address anything outside the store's ``root`` prefix inside the bucket. Trace keys
  follow ``org/{org_id}/dataset/{dataset}/version/{version}/...`` and
  ``org/{org_id}/staging/task/{task_id}/attempt/{attempt}/...``; the store does not impose the
  layout, it only keeps keys inside the root.
* ``put`` stores the hex SHA-256 of the content as the object's ``sha256`` user metadata, so
  ``head`` and ``list`` answer without reading the content. An object written through a
  presigned PUT has no such metadata; its checksum is computed by reading it (and cached for
  nothing: S3 may change it behind the store).
* Presigned URLs are SigV4 query-signed by boto3 for ``GET`` or ``PUT`` on exactly one key.
  ``public_endpoint_url`` sets the host clients will use (it is part of the signature), for
  deployments where the store's own endpoint is not the one clients reach.
* ``endpoint_url`` (or ``TRACE_AWS_ENDPOINT_URL``) points the adapter at moto, MinIO or
  LocalStack; path-style addressing is used so any host works.
"""

from __future__ import annotations

import hashlib
from typing import Any

from trace_aws._boto import AwsCalls, client, translate
from trace_core import errors
from trace_core.object_keys import validate_key, validate_prefix
from trace_core.ports import ObjectInfo

#: Longest presigned URL lifetime SigV4 allows.
MAX_URL_EXPIRY_S = 7 * 24 * 3600
_SHA_META = "sha256"


class S3ObjectStore:
    """The ObjectStore port on one bucket, under an optional ``root`` prefix."""

    def __init__(
        self,
        bucket: str,
        *,
        root: str = "",
        s3: Any | None = None,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region_name: str | None = None,
        presigner: Any | None = None,
    ) -> None:
        if root:
            validate_prefix(root)
            if not root.endswith("/"):
                raise errors.ValidationFailed("root must end with '/'", field="root")
        self.bucket = bucket
        self.root = root
        self._s3 = s3 or client(
            "s3", endpoint_url=endpoint_url, region_name=region_name, signature_version="s3v4"
        )
        self._presigner = presigner or (
            client(
                "s3",
                endpoint_url=public_endpoint_url,
                region_name=region_name,
                signature_version="s3v4",
            )
            if public_endpoint_url
            else self._s3
        )
        self._calls = AwsCalls(name="trace-s3")

    @staticmethod
    def create_bucket(
        bucket: str,
        *,
        s3: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> None:
        """Create ``bucket`` if it does not exist (blocking; for setup scripts and tests)."""
        s3 = s3 or client("s3", endpoint_url=endpoint_url, region_name=region_name)
        try:
            region = s3.meta.region_name
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            s3.create_bucket(**kwargs)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise translate(exc, "create bucket") from exc

    def _key(self, key: str) -> str:
        return self.root + validate_key(key)

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key``. Raises ``UnsafeKey``, ``Unavailable``."""
        s3_key = self._key(key)
        sha = hashlib.sha256(data).hexdigest()
        await self._calls.run(
            "put object",
            self._s3.put_object,
            Bucket=self.bucket,
            Key=s3_key,
            Body=bytes(data),
            Metadata={_SHA_META: sha},
        )
        return ObjectInfo(key, len(data), sha)

    async def get(self, key: str) -> bytes:
        """The object's content. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        s3_key = self._key(key)

        def read() -> bytes:
            resp = self._s3.get_object(Bucket=self.bucket, Key=s3_key)
            return bytes(resp["Body"].read())

        return await self._calls.run("get object", read)

    async def head(self, key: str) -> ObjectInfo:
        """The object's metadata. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        s3_key = self._key(key)
        resp = await self._calls.run(
            "head object", self._s3.head_object, Bucket=self.bucket, Key=s3_key
        )
        return await self._info(key, resp)

    async def _info(self, key: str, resp: dict[str, Any]) -> ObjectInfo:
        sha = (resp.get("Metadata") or {}).get(_SHA_META)
        size = int(resp["ContentLength"])
        if not sha:
            sha = hashlib.sha256(await self.get(key)).hexdigest()
        return ObjectInfo(key, size, sha)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key. Raises ``UnsafeKey``,
        ``Unavailable``."""
        s3_prefix = self.root + validate_prefix(prefix)

        def keys() -> list[str]:
            out: list[str] = []
            for page in self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=s3_prefix
            ):
                out += [o["Key"] for o in page.get("Contents", [])]
            return out

        infos = []
        for s3_key in sorted(await self._calls.run("list objects", keys)):
            key = s3_key[len(self.root) :]
            try:
                infos.append(await self.head(key))
            except errors.NotFound:
                continue  # deleted between the listing and the head
            except errors.UnsafeKey:
                continue  # written behind the store's back with a key Trace never makes
        return infos

    async def delete(self, key: str) -> None:
        """Delete the object (a missing key is fine). Raises ``UnsafeKey``, ``Unavailable``."""
        s3_key = self._key(key)
        await self._calls.run(
            "delete object", self._s3.delete_object, Bucket=self.bucket, Key=s3_key
        )

    async def signed_url(self, key: str, *, method: str, expires_in: int) -> str:
        """A SigV4 presigned URL for ``GET`` or ``PUT`` on ``key`` for ``expires_in`` seconds.
        Raises ``UnsafeKey``, ``ValidationFailed``."""
        s3_key = self._key(key)
        if method not in ("GET", "PUT"):
            raise errors.ValidationFailed("method must be GET or PUT", field="method")
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int)
            or not (0 < expires_in <= MAX_URL_EXPIRY_S)
        ):
            raise errors.ValidationFailed(
                f"expires_in must be an integer in 1..{MAX_URL_EXPIRY_S}", field="expires_in"
            )
        operation = "get_object" if method == "GET" else "put_object"
        url = await self._calls.run(
            "presign",
            self._presigner.generate_presigned_url,
            operation,
            Params={"Bucket": self.bucket, "Key": s3_key},
            ExpiresIn=expires_in,
            HttpMethod=method,
        )
        return str(url)

    async def close(self) -> None:
        self._calls.close()


__all__ = ["MAX_URL_EXPIRY_S", "S3ObjectStore"]
