"""Alert destinations as the user API takes them: request records and their rules, pure.

A destination is where an org's alert deliveries go: a generic signed webhook, a Slack
incoming webhook, or PagerDuty Events v2 (``kind``). Its secrets are **write-only**: a request
may set them, no answer ever carries them (``DestinationOut`` has no field for them).

* ``signing_secret``: the Standard Webhooks key, ``whsec_`` + base64 of 24 to 64 bytes. A
  ``webhook`` destination needs one (its receiver verifies with it, so the caller chooses it);
  ``slack`` and ``pagerduty`` get a generated one when none is given (their receivers do not
  verify signatures).
* ``routing_key``: the PagerDuty integration key, required for ``pagerduty`` and refused for
  the other kinds.

``check_create`` / ``check_update`` report the first problem as ``ValidationFailed`` with the
field's path; the URL's own rules (scheme, host, SSRF) are ``trace_core.ssrf``'s, checked with
the host's addresses where the request is served.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

import attrs

from trace_core import errors

KINDS: Final = ("webhook", "slack", "pagerduty")
#: Destination names: the ``alert_destinations.name`` rule, and what routes name.
NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_URL: Final = 2048
_ROUTING_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


@attrs.frozen
class DestinationCreate:
    """``POST /v1/orgs/{org}/alert-destinations``."""

    name: str
    url: str
    kind: str = "webhook"
    signing_secret: str | None = attrs.field(default=None, repr=False)
    routing_key: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class DestinationUpdate:
    """``PATCH /v1/orgs/{org}/alert-destinations/{name}``: every field optional; ``enabled``
    false disables the destination (and its due deliveries), true enables it."""

    name: str | None = None
    url: str | None = None
    enabled: bool | None = None
    signing_secret: str | None = attrs.field(default=None, repr=False)
    routing_key: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class DestinationOut:
    """A destination as answers show it: never a secret."""

    destination_id: str
    name: str
    kind: str
    url: str
    enabled: bool
    disabled_reason: str | None


def check_name(name: str, field: str = "name") -> None:
    if not NAME_RE.match(name):
        raise errors.ValidationFailed(f"a destination name matches {NAME_RE.pattern}", field=field)


def check_url_text(url: str, field: str = "url") -> None:
    """Length and scheme only; the host is checked with its addresses (``trace_core.ssrf``)."""
    if len(url) > MAX_URL:
        raise errors.ValidationFailed(f"at most {MAX_URL} characters", field=field)
    if not url.startswith(("https://", "http://")):
        raise errors.ValidationFailed("an http or https URL", field=field)


def check_signing_secret(secret: str, field: str = "signing_secret") -> None:
    """``whsec_`` + standard base64 of 24 to 64 bytes. Raises ``ValidationFailed``."""
    if not secret.startswith("whsec_"):
        raise errors.ValidationFailed("a signing secret starts with whsec_", field=field)
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise errors.ValidationFailed("whsec_ then standard base64", field=field) from None
    if not 24 <= len(key) <= 64:
        raise errors.ValidationFailed("a signing key of 24 to 64 bytes", field=field)


def check_routing_key(key: str, kind: str, field: str = "routing_key") -> None:
    if kind != "pagerduty":
        raise errors.ValidationFailed("only a pagerduty destination has a routing key", field=field)
    if not _ROUTING_KEY_RE.match(key):
        raise errors.ValidationFailed(
            f"a routing key matches {_ROUTING_KEY_RE.pattern}", field=field
        )


def check_create(req: DestinationCreate) -> None:
    """The rules of a new destination (module docstring). Raises ``ValidationFailed``."""
    check_name(req.name)
    if req.kind not in KINDS:
        raise errors.ValidationFailed(f"kind is one of {', '.join(KINDS)}", field="kind")
    check_url_text(req.url)
    if req.signing_secret is not None:
        check_signing_secret(req.signing_secret)
    elif req.kind == "webhook":
        raise errors.ValidationFailed(
            "a webhook destination needs the signing_secret its receiver verifies with",
            field="signing_secret",
        )
    if req.routing_key is not None:
        check_routing_key(req.routing_key, req.kind)
    elif req.kind == "pagerduty":
        raise errors.ValidationFailed(
            "a pagerduty destination needs a routing_key", field="routing_key"
        )


def check_update(req: DestinationUpdate, kind: str) -> None:
    """The rules of a change to a destination of ``kind``. Raises ``ValidationFailed``."""
    if req.name is not None:
        check_name(req.name)
    if req.url is not None:
        check_url_text(req.url)
    if req.signing_secret is not None:
        check_signing_secret(req.signing_secret)
    if req.routing_key is not None:
        check_routing_key(req.routing_key, kind)
    if all(getattr(req, f.name) is None for f in attrs.fields(DestinationUpdate)):
        raise errors.ValidationFailed("nothing to change", field="$")


__all__ = [
    "KINDS",
    "NAME_RE",
    "DestinationCreate",
    "DestinationOut",
    "DestinationUpdate",
    "check_create",
    "check_name",
    "check_routing_key",
    "check_signing_secret",
    "check_update",
    "check_url_text",
]
