"""Destination request rules (trace_core.alert_destinations): each refusal names its field;
secrets are write-only (no answer record has a field for them, and they stay out of reprs)."""

from __future__ import annotations

import base64

import attrs
import pytest

from trace_core import errors
from trace_core.alert_destinations import (
    DestinationCreate,
    DestinationOut,
    DestinationUpdate,
    check_create,
    check_update,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def create(**kw: object) -> DestinationCreate:
    fields: dict[str, object] = {"name": "ops", "url": "https://example.com/h", **kw}
    return DestinationCreate(**fields)  # type: ignore[arg-type]


def test_valid_destinations_of_every_kind() -> None:
    check_create(create(signing_secret=SECRET))
    check_create(create(kind="slack"))
    check_create(create(kind="pagerduty", routing_key="R0123456789abcdef"))
    check_update(DestinationUpdate(enabled=False), "webhook")
    check_update(DestinationUpdate(routing_key="R0123456789abcdef"), "pagerduty")


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (create(name="Ops", signing_secret=SECRET), "name"),
        (create(name="", signing_secret=SECRET), "name"),
        (create(kind="email", signing_secret=SECRET), "kind"),
        (create(url="ftp://x", signing_secret=SECRET), "url"),
        (create(url="https://" + "a" * 2048, signing_secret=SECRET), "url"),
        (create(), "signing_secret"),
        (create(signing_secret="whsec_" + base64.b64encode(b"k" * 8).decode()), "signing_secret"),
        (create(signing_secret="whsec_" + base64.b64encode(b"k" * 65).decode()), "signing_secret"),
        (create(signing_secret="whsec_***"), "signing_secret"),
        (create(kind="pagerduty"), "routing_key"),
        (create(kind="slack", routing_key="R0123456789abcdef"), "routing_key"),
        (create(kind="pagerduty", routing_key="short"), "routing_key"),
    ],
)
def test_each_refusal_names_its_field(req: DestinationCreate, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        check_create(req)
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("req", "kind", "field"),
    [
        (DestinationUpdate(), "webhook", "$"),
        (DestinationUpdate(name="A B"), "webhook", "name"),
        (DestinationUpdate(url="gopher://x"), "webhook", "url"),
        (DestinationUpdate(signing_secret="nope"), "webhook", "signing_secret"),
        (DestinationUpdate(routing_key="R0123456789abcdef"), "webhook", "routing_key"),
    ],
)
def test_each_update_refusal_names_its_field(req: DestinationUpdate, kind: str, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        check_update(req, kind)
    assert exc.value.field == field


def test_secrets_are_write_only() -> None:
    answer = {f.name for f in attrs.fields(DestinationOut)}
    assert not answer & {"signing_secret", "routing_key", "secret_name"}
    req = create(kind="pagerduty", signing_secret=SECRET, routing_key="R0123456789abcdef")
    assert SECRET not in repr(req) and "R0123456789abcdef" not in repr(req)
