"""docs/api/openapi.json matches the code: the routes of ``make_app`` and the wire records."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest

from trace_core import errors, wire
from trace_servers.app import make_app

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}

#: Request body schema of each JSON route (a ``oneOf`` lists several).
REQUEST_SCHEMAS = {
    ("POST", "/internal/task-claim"): {"ClaimRequest", "ClaimBatchRequest"},
    ("POST", "/internal/task-complete-batch"): {"CompleteBatchRequest"},
    ("POST", "/internal/admin/tasks"): {"CreateTaskRequest", "CreateTasksRequest"},
    ("POST", "/v1/task/heartbeat"): {"HeartbeatRequest"},
    ("POST", "/v1/task/events"): {"EventsRequest"},
    ("POST", "/v1/task/buffer-publish"): {"BufferPublishRequest"},
    ("POST", "/v1/task/complete"): {"CompleteRequest"},
    ("POST", "/v1/task/credentials"): {"CredentialsRequest"},
    ("POST", "/v1/task/resolve"): {"TaskResolveRequest"},
    ("POST", "/v1/orgs/{org}/datasets/resolve"): {"ResolveRequest"},
    ("PUT", "/v1/orgs/{org}/datasets/{dataset}/read-roles"): {"ReadRolesRequest"},
    ("POST", "/v1/orgs/{org}/dags/{dag}/cutover"): {"CutoverRequest"},
    ("POST", "/v1/orgs/{org}/dags"): {"DagDeployRequest"},
    ("POST", "/v1/orgs/{org}/dags/{dag}/jobs/{job}/trigger"): {"DagTriggerRequest"},
    ("POST", "/v1/orgs/{org}/datasets/{dataset}/invalidate"): {"DagInvalidateRequest"},
    ("PUT", "/v1/orgs/{org}/members/{subject}"): {"MemberRequest"},
    ("POST", "/v1/query"): {"QueryRequest"},
    ("POST", "/v1/task/query"): {"TaskQueryRequest"},
    ("POST", "/v1/query/exports"): {"ExportRequest"},
    ("POST", "/v1/orgs/{org}/alert-destinations"): {"DestinationCreate"},
    ("PATCH", "/v1/orgs/{org}/alert-destinations/{name}"): {"DestinationUpdate"},
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


def _schema_ref(node: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        return {node["$ref"].rsplit("/", 1)[-1]}
    return {r for alt in node.get("oneOf", []) for r in _schema_ref(alt)}


def _app_routes() -> set[tuple[str, str]]:
    dispatcher = types.SimpleNamespace(pool=None, object_store=None, wake_mode="queue")
    app = make_app(dispatcher, platform_token="x" * 32)  # type: ignore[arg-type]
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_spec_is_openapi_31(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    schemes = spec["components"]["securitySchemes"]
    assert schemes["taskCapability"]["name"] == "X-Trace-Task-Capability"
    assert schemes["platformBearer"]["scheme"] == "bearer"


def test_paths_equal_routes_of_make_app(spec: dict[str, Any]) -> None:
    documented = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }
    assert documented == _app_routes()


def test_request_bodies_name_the_wire_classes(spec: dict[str, Any]) -> None:
    found = {}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS and "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                found[(method.upper(), path)] = _schema_ref(schema)
    assert found == REQUEST_SCHEMAS


def _json_types(tp: Any) -> set[str]:
    """The JSON Schema types a Python annotation of a wire field allows."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_json_types(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return {"string"}
    if tp is type(None):
        return {"null"}
    base = origin or tp
    simple = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        dict: "object",
        list: "array",
    }
    if base in simple:
        return {simple[base]}
    if attrs.has(base):
        return {"$ref:" + base.__name__}
    raise AssertionError(f"no JSON type for {tp!r}")


def _schema_types(node: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        return {"$ref:" + node["$ref"].rsplit("/", 1)[-1]}
    if "oneOf" in node:
        return set().union(*(_schema_types(a) for a in node["oneOf"]))
    kind = node["type"]
    return set(kind) if isinstance(kind, list) else {kind}


WIRE_CLASSES = [
    cls for name in wire.__all__ if attrs.has(cls := getattr(wire, name)) and name != "FenceFields"
]


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda c: c.__name__)
def test_schema_fields_match_the_wire_class(spec: dict[str, Any], cls: type) -> None:
    schema = spec["components"]["schemas"][cls.__name__]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    assert set(schema["properties"]) == set(fields)
    for name, prop in schema["properties"].items():
        assert _schema_types(prop) == _json_types(hints[name]), name
    is_request = any(cls.__name__ in names for names in REQUEST_SCHEMAS.values()) or cls in (
        wire.EventIn,
        wire.BufferBatchIn,
        wire.BufferScopeIn,
        wire.RangeIn,
        wire.OutputIn,
        wire.PartitionIn,
        wire.TokenedCompletion,
    )
    if is_request:
        # Requests are strict (unknown fields refused) and require exactly the fields without
        # defaults.
        assert schema.get("additionalProperties") is False
        required = {n for n, f in fields.items() if f.default is attrs.NOTHING}
        assert set(schema["required"]) == required
    else:
        # Responses always carry every field.
        assert set(schema["required"]) == set(fields)


def test_json_routes_document_the_input_refusals(spec: dict[str, Any]) -> None:
    """Every route with a JSON body answers 400/413/415/422 (``trace_servers.http.read_json``)."""
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS and "requestBody" in op:
                assert {"400", "413", "415", "422"} <= set(op["responses"]), (method, path)


def test_error_codes_are_the_domain_codes(spec: dict[str, Any]) -> None:
    documented = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    codes = {
        cls.code
        for name in errors.__all__
        if isinstance(cls := getattr(errors, name), type) and issubclass(cls, errors.TraceError)
    }
    assert documented == (codes - {"trace_error"}) | {"http_error", "internal"}


@pytest.mark.parametrize("name", ["QueryRequest", "TaskQueryRequest", "ExportRequest"])
def test_query_request_schemas_match_query_api(spec: dict[str, Any], name: str) -> None:
    from trace_servers import query_api

    schema = spec["components"]["schemas"][name]
    fields = {f.name: f for f in attrs.fields(getattr(query_api, name))}
    assert set(schema["properties"]) == set(fields)
    assert set(schema["required"]) == {n for n, f in fields.items() if f.default is attrs.NOTHING}
    assert schema["additionalProperties"] is False
