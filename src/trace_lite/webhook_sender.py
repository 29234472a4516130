"""Send one leased delivery as a signed webhook, safely.

* **SSRF**: the destination's host is resolved once; every address is checked with
  ``trace_core.ssrf`` (one refused address refuses the host); the connection goes to a checked
  address through a resolver pinned to them (``_PinnedResolver``: asked for any other host it
  fails, so there is no second DNS lookup), while the URL keeps its host name for the ``Host``
  header and TLS SNI. Redirects are never followed (a ``3xx`` is a failed attempt); at most
  ``body_cap`` bytes of a response are read. A host written as an address in any spelling
  (``2130706433``, ``0x7f.1``) is checked as that address.
* **Signing** per Standard Webhooks with the ``standardwebhooks`` package: ``webhook-id`` is the
  delivery's (``trace_core.delivery.webhook_id``, the same on every retry), ``webhook-timestamp``
  the time of this attempt, ``webhook-signature`` ``v1,<base64 HMAC-SHA256 of
  id.timestamp.body>`` under the destination's ``whsec_`` secret from the ``SecretStore``.
* **Shapes** (``render``): ``webhook`` (Trace's own JSON), ``slack`` (an incoming-webhook
  message: ``text`` + ``blocks``), ``pagerduty`` (an Events API v2 ``trigger`` with
  ``dedup_key`` = the delivery key; its ``routing_key`` is the secret ``<secret_name>-routing-key``).
  The body is the same bytes on every attempt.

``send`` never raises for what the receiver or network does: it returns a
``trace_core.delivery.SendResult`` for the store to record.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import attrs
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook
from yarl import URL

from trace_core import errors
from trace_core.delivery import DeliveryEvent, SendResult, classify_response, webhook_id
from trace_core.ports import SecretStore
from trace_core.ssrf import NOTHING_ALLOWED, Address, AllowList, check_addresses, parse_ip_literal
from trace_lite.delivery import Leased

log = logging.getLogger("trace.delivery")

#: Resolve a host name to its addresses (``OSError`` when it does not resolve).
Resolve = Callable[[str, int], Awaitable[list[Address]]]

#: How much of a receiver's answer is read.
BODY_CAP = 64 * 1024
USER_AGENT = "trace-delivery/1"


async def system_resolve(host: str, port: int) -> list[Address]:
    """The system resolver (``getaddrinfo``), every address once, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


@attrs.frozen
class Target:
    """A destination URL whose host was resolved and checked: connect only to ``addresses``."""

    url: URL
    host: str
    port: int
    addresses: tuple[Address, ...]


def parse_url(url: str) -> URL:
    """An ``http``/``https`` URL with a host and no user info. Raises ``ValidationFailed``
    (``field="url"``)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise errors.ValidationFailed("not a URL", field="url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise errors.ValidationFailed("a destination is an http(s) URL with a host", field="url")
    if parsed.user is not None or parsed.password is not None:
        raise errors.ValidationFailed("a destination URL carries no user info", field="url")
    if len(url) > 2048:
        raise errors.ValidationFailed("a destination URL is at most 2048 characters", field="url")
    return parsed


async def check_url(url: str, *, resolve: Resolve, allow: AllowList = NOTHING_ALLOWED) -> Target:
    """Resolve the URL's host once and check every address (``trace_core.ssrf``). Raises
    ``ValidationFailed`` (``field="url"``) for a bad URL or a refused address, ``Unavailable``
    when the host does not resolve now (DNS may answer later: a send retries)."""
    parsed = parse_url(url)
    host = parsed.raw_host or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise errors.Unavailable(f"{host} does not resolve") from exc
        if not addresses:
            raise errors.Unavailable(f"{host} resolves to no address")
    checked = check_addresses(host, addresses, allow=allow)
    return Target(url=parsed, host=host, port=port, addresses=tuple(checked))


class _PinnedResolver(AbstractResolver):
    """Answers for one host with the addresses that were checked; any other host fails."""

    def __init__(self, host: str, addresses: Sequence[Address]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"{host} was not checked")
        return [
            ResolveResult(
                hostname=host,
                host=str(a),
                port=port,
                family=socket.AF_INET if a.version == 4 else socket.AF_INET6,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self._addresses
        ]

    async def close(self) -> None:
        return None


def new_signing_secret() -> str:
    """A fresh ``whsec_`` secret (32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def render(leased: Leased, *, routing_key: str | None = None) -> bytes:
    """The body for the destination's kind; the same bytes on every attempt."""
    alert = dict(leased.payload)
    summary = str(alert.get("summary") or f"Trace alert {leased.alert_key}")
    event_time = leased.event_time.astimezone(UTC).isoformat()
    body: Mapping[str, Any]
    match leased.kind:
        case "webhook":
            body = {
                "type": "trace.alert",
                "delivery_key": leased.delivery_key,
                "alert_key": leased.alert_key,
                "route": leased.route,
                "event_time": event_time,
                "alert": alert,
            }
        case "slack":
            body = {
                "text": summary,
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": summary}},
                    {
                        "type": "context",
                        "elements": [
                            {
                                "type": "mrkdwn",
                                "text": f"route {leased.route} · event time {event_time}",
                            }
                        ],
                    },
                ],
            }
        case "pagerduty":
            body = {
                "routing_key": routing_key or "",
                "event_action": "trigger",
                "dedup_key": leased.delivery_key,
                "payload": {
                    "summary": summary[:1024],
                    "source": f"trace/{leased.route}",
                    "severity": str(alert.get("severity") or "warning"),
                    "timestamp": event_time,
                    "custom_details": alert,
                },
            }
        case _:
            raise errors.ValidationFailed(f"unknown destination kind {leased.kind!r}", field="kind")
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: str, msg_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt."""
    signature = Webhook(secret).sign(msg_id=msg_id, timestamp=timestamp, data=body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


class WebhookSender:
    """Sends leased deliveries; one ``aiohttp`` session per send, pinned to its checked
    addresses."""

    def __init__(
        self,
        secrets_store: SecretStore,
        *,
        resolve: Resolve = system_resolve,
        allow: AllowList = NOTHING_ALLOWED,
        timeout_s: float = 15.0,
        body_cap: int = BODY_CAP,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._secrets = secrets_store
        self._resolve = resolve
        self._allow = allow
        self._timeout_s = timeout_s
        self._body_cap = body_cap
        self._clock = clock

    async def _secret(self, name: str) -> str:
        return (await self._secrets.get(name)).decode()

    async def send(self, leased: Leased) -> SendResult:
        """One attempt. Never raises for the network or the receiver: the result says what
        happened (``refuse`` for an address the SSRF check refuses)."""
        try:
            secret = await self._secret(leased.secret_name)
            routing_key = None
            if leased.kind == "pagerduty":
                routing_key = await self._secret(leased.secret_name + "-routing-key")
        except errors.NotFound:
            return SendResult(DeliveryEvent.FAIL, error="the destination's secret is missing")
        except errors.TraceError as exc:
            return SendResult(DeliveryEvent.FAIL, error=f"secret store: {exc.message}")
        try:
            target = await check_url(leased.url, resolve=self._resolve, allow=self._allow)
        except errors.ValidationFailed as exc:
            return SendResult(DeliveryEvent.REFUSE, error=exc.message)
        except errors.Unavailable as exc:
            return SendResult(DeliveryEvent.FAIL, error=exc.message)
        body = render(leased, routing_key=routing_key)
        headers = {
            **sign(secret, webhook_id(leased.delivery_key), self._clock(), body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(target.host, target.addresses),
            use_dns_cache=False,
            force_close=True,
        )
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=timeout, trust_env=False, auto_decompress=False
                ) as session,
                session.post(
                    target.url, data=body, headers=headers, allow_redirects=False
                ) as response,
            ):
                await response.content.read(self._body_cap)
                return classify_response(
                    response.status,
                    retry_after=response.headers.get("retry-after"),
                    now=self._clock(),
                )
        except TimeoutError:
            return SendResult(DeliveryEvent.FAIL, error=f"timed out after {self._timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return SendResult(DeliveryEvent.FAIL, error=f"connection failed: {type(exc).__name__}")
        except OSError as exc:
            return SendResult(DeliveryEvent.FAIL, error=f"connection failed: {type(exc).__name__}")


__all__ = [
    "BODY_CAP",
    "Resolve",
    "Target",
    "WebhookSender",
    "check_url",
    "new_signing_secret",
    "parse_url",
    "render",
    "sign",
    "system_resolve",
]
