"""Alert destinations on Postgres: the ``alert_destinations`` rows a delivery is sent to.

A destination's URL is checked by the caller (``trace_lite.webhook_sender``: SSRF) before it
is stored; its signing secret lives in the ``SecretStore`` under ``secret_name``. Disabling or
deleting a destination also disables its due deliveries in the same transaction, so nothing is
sent to it afterwards; sent and failed deliveries keep their history. ``DeliveryStore``
(``trace_lite.delivery``) extends this store: one pool, one SQL file.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_lite import sqlfile
from trace_lite.pg import fetch_named, transaction

Q = sqlfile.load("delivery.sql")

KINDS = ("webhook", "slack", "pagerduty")


class DestinationRow(NamedTuple):
    destination_id: str
    org_id: str
    name: str
    kind: str
    url: str
    secret_name: str
    enabled: bool
    disabled_reason: str | None


class DestinationStore:
    """The destinations of every org on the Postgres state database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def add_destination(
        self,
        *,
        org_id: str,
        name: str,
        kind: str,
        url: str,
        secret_name: str,
        destination_id: str | None = None,
    ) -> DestinationRow:
        """Store a destination whose URL the caller already checked (``webhook_sender``).
        Raises ``ValidationFailed`` (bad name or kind), ``Conflict`` (the name is taken)."""
        if kind not in KINDS:
            raise errors.ValidationFailed(f"kind must be one of {', '.join(KINDS)}", field="kind")
        destination_id = destination_id or str(uuid.uuid4())
        async with transaction(self.pool) as cur:
            await cur.execute(
                Q["insert_destination"],
                {
                    "destination_id": destination_id,
                    "org_id": org_id,
                    "name": name,
                    "kind": kind,
                    "url": url,
                    "secret_name": secret_name,
                },
            )
        return await self.destination(destination_id)

    async def destination(self, destination_id: str) -> DestinationRow:
        """Raises ``NotFound``."""
        async with transaction(self.pool) as cur:
            rows = await fetch_named(
                cur, DestinationRow, Q["destination"], {"destination_id": destination_id}
            )
        if not rows:
            raise errors.NotFound("no such destination")
        return rows[0]

    async def destination_by_name(self, org_id: str, name: str) -> DestinationRow:
        """Raises ``NotFound``."""
        async with transaction(self.pool) as cur:
            rows = await fetch_named(
                cur, DestinationRow, Q["destination_by_name"], {"org_id": org_id, "name": name}
            )
        if not rows:
            raise errors.NotFound("no such destination")
        return rows[0]

    async def destinations(self, org_id: str) -> list[DestinationRow]:
        """The live destinations of an org, by name."""
        async with transaction(self.pool) as cur:
            return await fetch_named(
                cur, DestinationRow, Q["list_destinations"], {"org_id": org_id}
            )

    async def live_destination(self, org_id: str, destination_id: str) -> DestinationRow:
        """A live destination of ``org_id``. Raises ``NotFound``."""
        async with transaction(self.pool) as cur:
            rows = await fetch_named(
                cur,
                DestinationRow,
                Q["live_destination"],
                {"org_id": org_id, "destination_id": destination_id},
            )
        if not rows:
            raise errors.NotFound("no such destination", field="destination")
        return rows[0]

    async def update_destination(
        self,
        org_id: str,
        destination_id: str,
        *,
        name: str | None = None,
        url: str | None = None,
        kind: str | None = None,
    ) -> DestinationRow:
        """Change a live destination (``None`` keeps a value; a URL the caller checked).
        Raises ``NotFound``, ``Conflict`` (the name is taken), ``ValidationFailed``."""
        if kind is not None and kind not in KINDS:
            raise errors.ValidationFailed(f"kind must be one of {', '.join(KINDS)}", field="kind")
        await self.live_destination(org_id, destination_id)
        async with transaction(self.pool) as cur:
            await cur.execute(
                Q["update_destination"],
                {"destination_id": destination_id, "name": name, "url": url, "kind": kind},
            )
            if cur.rowcount != 1:
                raise errors.NotFound("no such destination", field="destination")
        return await self.live_destination(org_id, destination_id)

    async def delete_destination(self, org_id: str, destination_id: str) -> int:
        """Mark a live destination deleted; its due deliveries become disabled (its sent and
        failed ones keep their history). Returns how many were disabled. Raises ``NotFound``."""
        await self.live_destination(org_id, destination_id)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["delete_destination"], {"destination_id": destination_id})
            if cur.rowcount != 1:
                raise errors.NotFound("no such destination", field="destination")
            await cur.execute(
                Q["disable_due_of_destination"],
                {"destination_id": destination_id, "reason": "destination deleted"},
            )
            return cur.rowcount

    async def set_enabled(self, destination_id: str, *, enabled: bool, reason: str | None) -> int:
        """Enable or disable a destination; disabling also disables its due deliveries
        (``decide_disable``). Returns how many deliveries were disabled. Raises ``NotFound``."""
        async with transaction(self.pool) as cur:
            await cur.execute(
                Q["set_destination_enabled"],
                {"destination_id": destination_id, "enabled": enabled, "reason": reason},
            )
            if cur.rowcount == 0:
                raise errors.NotFound("no such destination")
            if enabled:
                return 0
            await cur.execute(
                Q["disable_due_of_destination"],
                {"destination_id": destination_id, "reason": f"destination disabled: {reason}"},
            )
            return cur.rowcount


__all__ = ["KINDS", "DestinationRow", "DestinationStore"]
