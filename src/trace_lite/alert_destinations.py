"""Alert destinations of an org: create, list, get, update, delete (user API and CLI).

Rules (``trace_core.alert_destinations``): org admins change destinations, members read them,
the platform (``caller=None``) does both; a caller outside the org gets ``NotFound`` ("no
such org"), as everywhere. Every check runs before anything is written: the request's fields,
then the URL's host resolved once and every address checked (``webhook_sender.check_url``:
SSRF). Secrets go to the ``SecretStore`` (``trace/org/{org_id}/webhooks.{destination_id}``,
the routing key at ``...-routing-key``) and are never read back by this service; a new
destination whose row cannot be stored (the name is taken) has its secrets removed again.
A delete keeps the row for its deliveries' history (``deleted_at``, migration 0023), disables
its due deliveries and removes its secrets.
"""

from __future__ import annotations

import uuid

from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.access import UserCaller
from trace_core.alert_destinations import (
    DestinationCreate,
    DestinationOut,
    DestinationUpdate,
    check_create,
    check_name,
    check_update,
)
from trace_core.ports import SecretStore
from trace_core.secret_names import org_secret
from trace_core.ssrf import NOTHING_ALLOWED, AllowList
from trace_lite.delivery import DeliveryStore, DestinationRow
from trace_lite.orgs import Orgs
from trace_lite.webhook_sender import Resolve, check_url, new_signing_secret, system_resolve

ROUTING_KEY_SUFFIX = "-routing-key"


def out(row: DestinationRow) -> DestinationOut:
    return DestinationOut(
        destination_id=row.destination_id,
        name=row.name,
        kind=row.kind,
        url=row.url,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
    )


class Destinations:
    """The destinations service over the state database and a secret store."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        secrets: SecretStore,
        *,
        allow: AllowList = NOTHING_ALLOWED,
        resolve: Resolve = system_resolve,
        orgs: Orgs | None = None,
    ) -> None:
        self.store = DeliveryStore(pool)
        self.secrets = secrets
        self.allow = allow
        self.resolve = resolve
        self.orgs = orgs or Orgs(pool)

    async def _org(self, caller: UserCaller | None, org: str, *, write: bool) -> str:
        org_id = await self.orgs.org_id(org)
        if caller is None:
            return org_id
        if caller.org_id != org_id or not (caller.member or caller.dags):
            raise errors.NotFound("no such org", field="org")
        if write:
            Orgs.require_admin(caller, org_id)
        return org_id

    async def _by_name(self, org_id: str, name: str) -> DestinationRow:
        check_name(name, "destination")
        try:
            return await self.store.destination_by_name(org_id, name)
        except errors.NotFound:
            raise errors.NotFound("no such destination", field="destination") from None

    async def create(
        self, caller: UserCaller | None, org: str, req: DestinationCreate
    ) -> tuple[DestinationOut, str | None]:
        """A new destination. Returns it and, when this call generated the signing secret
        (``slack``/``pagerduty`` without one; the CLI), that secret -- the only time it is
        shown. Raises ``ValidationFailed`` (naming the field; nothing written), ``Conflict``
        (the name is taken), ``NotFound``, ``Forbidden``, ``Unavailable`` (the host does not
        resolve now)."""
        org_id = await self._org(caller, org, write=True)
        check_create(req)
        await check_url(req.url, resolve=self.resolve, allow=self.allow)
        destination_id = str(uuid.uuid4())
        secret_name = org_secret(org_id, f"webhooks.{destination_id}")
        generated = None if req.signing_secret is not None else new_signing_secret()
        written: list[str] = []
        try:
            await self.secrets.put(secret_name, (req.signing_secret or generated or "").encode())
            written.append(secret_name)
            if req.routing_key is not None:
                await self.secrets.put(secret_name + ROUTING_KEY_SUFFIX, req.routing_key.encode())
                written.append(secret_name + ROUTING_KEY_SUFFIX)
            row = await self.store.add_destination(
                org_id=org_id,
                name=req.name,
                kind=req.kind,
                url=req.url,
                secret_name=secret_name,
                destination_id=destination_id,
            )
        except BaseException:
            for name in written:
                await self.secrets.delete(name)
            raise
        return out(row), generated

    async def list(self, caller: UserCaller | None, org: str) -> list[DestinationOut]:
        """The org's live destinations, by name. Raises ``NotFound``."""
        org_id = await self._org(caller, org, write=False)
        return [out(r) for r in await self.store.destinations(org_id)]

    async def get(self, caller: UserCaller | None, org: str, name: str) -> DestinationOut:
        """Raises ``NotFound``, ``ValidationFailed`` (a name that cannot exist)."""
        org_id = await self._org(caller, org, write=False)
        return out(await self._by_name(org_id, name))

    async def update(
        self, caller: UserCaller | None, org: str, name: str, req: DestinationUpdate
    ) -> DestinationOut:
        """Change a destination: name, URL (checked like a new one), enabled, secrets.
        Raises ``ValidationFailed`` (nothing written), ``Conflict``, ``NotFound``,
        ``Forbidden``, ``Unavailable``."""
        org_id = await self._org(caller, org, write=True)
        row = await self._by_name(org_id, name)
        check_update(req, row.kind)
        if req.url is not None:
            await check_url(req.url, resolve=self.resolve, allow=self.allow)
        if req.name is not None or req.url is not None:
            row = await self.store.update_destination(
                org_id, row.destination_id, name=req.name, url=req.url
            )
        if req.enabled is not None:
            reason = None if req.enabled else "disabled through the API"
            await self.store.set_enabled(row.destination_id, enabled=req.enabled, reason=reason)
            row = await self.store.live_destination(org_id, row.destination_id)
        if req.signing_secret is not None:
            await self.secrets.put(row.secret_name, req.signing_secret.encode())
        if req.routing_key is not None:
            await self.secrets.put(row.secret_name + ROUTING_KEY_SUFFIX, req.routing_key.encode())
        return out(row)

    async def delete(self, caller: UserCaller | None, org: str, name: str) -> int:
        """Delete a destination (module docstring). Returns how many due deliveries were
        disabled. Raises ``NotFound``, ``Forbidden``."""
        org_id = await self._org(caller, org, write=True)
        row = await self._by_name(org_id, name)
        disabled = await self.store.delete_destination(org_id, row.destination_id)
        for secret in (row.secret_name, row.secret_name + ROUTING_KEY_SUFFIX):
            try:
                await self.secrets.delete(secret)
            except errors.NotFound:
                pass
        return disabled


__all__ = ["ROUTING_KEY_SUFFIX", "Destinations", "out"]
