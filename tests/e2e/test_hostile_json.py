"""Hostile JSON on every JSON route of a real Dispatcher process (issue #8 items 2, 3, 13).

Values PostgreSQL's jsonb cannot store (NUL, lone surrogates, NaN/Infinity, 1e400, integers of
thousands of digits, 100,000-deep arrays) are refused at the edge with 422 and the field path;
unauthenticated bodies are never parsed (401 whatever they hold); a body not sent as
``application/json`` is 415; no response names the server's versions. A hypothesis property
throws arbitrary JSON at every route, with and without credentials: never a 5xx, never a
write on a refusal, never a backend's error text in a body.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import Response, TraceProcs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.users import LocalUserIssuer

ORG = "acme"

#: Tables a request could write, compared whole (``md5`` of every row) before and after.
CHECKED_TABLES = (
    "orgs",
    "jobs",
    "tasks",
    "task_attempts",
    "task_events",
    "buffer_batches",
    "org_members",
    "dags",
    "dag_members",
    "datasets",
    "dataset_versions",
    "dag_pointer_sets",
    "dag_pointers",
    "dataset_partitions",
    "dataset_pins",
    "alert_destinations",
    "dag_rematerializations",
)

#: What would betray a backend or a Python exception in a response body (a backend's words,
#: case-insensitive, or an exception class name such as ``RecursionError``).
LEAK = re.compile(
    r"(?i:psycopg|sqlstate|postgres|traceback|unicode escape|out of range|invalid input syntax"
    r"|violates|recursion)|\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)

#: The placeholder a route's body carries where a poison goes (replaced in the raw text).
SLOT = "\x01slot\x01"


def _setup_org(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag(ORG, "chain")
            await ds.set_member(None, ORG, "alice", ["admin"])
            await ds.register(ORG, "blocks", dag="chain", job="ingest", read_roles=["admin"])
            version = await ds.open_version(None, ORG, "blocks")
            await ds.cutover(None, ORG, "chain", {"blocks": version})
        finally:
            await pool.close()

    asyncio.run(go())


class Surface:
    """Every JSON route, a valid body for each, and the credentials each takes."""

    def __init__(self, t: TraceProcs) -> None:
        self.t = t
        self.issuer = LocalUserIssuer.init(t.key_dir)
        self.user = self.issuer.token("alice")
        self.task_id = t.create_task("noop", org=ORG, read_datasets=["blocks"])
        self.spare_id = t.create_task("noop", org=ORG)
        self.claim = t.claim(self.task_id)
        self.cap = self.claim["capability_token"]
        f = {k: self.claim[k] for k in ("task_id", "attempt", "lease_token")}
        prefix = self.t.scalar(
            "SELECT 'org/' || org_id || '/staging/task/' || task_id || '/attempt/1/' "
            "FROM tasks WHERE task_id = %s",
            (self.task_id,),
        )
        version = str(t.scalar("SELECT dataset_version FROM dataset_versions LIMIT 1"))
        base = f"/v1/orgs/{ORG}"
        #: (method, path, auth, body with SLOT, the field path of SLOT)
        self.routes: list[tuple[str, str, str, Any, str]] = [
            (
                "POST",
                "/internal/task-claim",
                "platform",
                {"task_id": self.spare_id, "worker_id": SLOT},
                "worker_id",
            ),
            (
                "POST",
                "/internal/task-complete-batch",
                "platform",
                {
                    "completions": [
                        {"capability_token": self.cap, "completion": {**f, "result": {"x": SLOT}}}
                    ]
                },
                "completions[0].completion.result.x",
            ),
            (
                "POST",
                "/internal/admin/tasks",
                "platform",
                {"operator": "noop", "org": ORG, "payload": {"x": SLOT}},
                "payload.x",
            ),
            ("POST", "/v1/task/heartbeat", "capability", {**f, "lease_token": SLOT}, "lease_token"),
            (
                "POST",
                "/v1/task/events",
                "capability",
                {**f, "events": [{"key": "k", "type": "progress", "payload": {"x": SLOT}}]},
                "events[0].payload.x",
            ),
            (
                "POST",
                "/v1/task/buffer-publish",
                "capability",
                {
                    **f,
                    "batch": {
                        "key": "b1",
                        "dataset": "rows",
                        "object_key": SLOT,
                        "row_count": 1,
                        "byte_size": 1,
                        "sha256": "0" * 64,
                    },
                },
                "batch.object_key",
            ),
            ("POST", "/v1/task/complete", "capability", {**f, "result": {"x": SLOT}}, "result.x"),
            (
                "POST",
                "/v1/task/credentials",
                "capability",
                {**f, "read_prefixes": [prefix, SLOT]},
                "read_prefixes[1]",
            ),
            ("POST", "/v1/task/resolve", "capability", {**f, "datasets": [SLOT]}, "datasets[0]"),
            ("POST", f"{base}/datasets/resolve", "user", {"datasets": [SLOT]}, "datasets[0]"),
            (
                "PUT",
                f"{base}/datasets/blocks/read-roles",
                "user",
                {"read_roles": [SLOT]},
                "read_roles[0]",
            ),
            (
                "POST",
                f"{base}/dags/chain/cutover",
                "user",
                {"pointers": {"blocks": version, "x": SLOT}},
                "pointers.x",
            ),
            ("PUT", f"{base}/members/carol", "user", {"roles": [SLOT]}, "roles[0]"),
            ("POST", f"{base}/dags?dry_run=true", "user", {"spec": {"x": SLOT}}, "spec.x"),
            (
                "POST",
                f"{base}/dags/chain/jobs/ingest/trigger",
                "user",
                {"payload": {"x": SLOT}},
                "payload.x",
            ),
            ("POST", "/v1/query", "user", {"org": ORG, "sql": SLOT}, "sql"),
            ("POST", "/v1/task/query", "capability", {**f, "sql": SLOT}, "sql"),
            ("POST", "/v1/query/exports", "user", {"org": ORG, "sql": SLOT}, "sql"),
            (
                "POST",
                f"{base}/alert-destinations",
                "user",
                {"name": "ops", "kind": "webhook", "url": SLOT},
                "url",
            ),
            ("PATCH", f"{base}/alert-destinations/ops", "user", {"url": SLOT}, "url"),
            ("POST", f"{base}/datasets/blocks/invalidate", "user", {"key": SLOT}, "key"),
        ]

    def headers(self, auth: str) -> dict[str, str]:
        return {
            "platform": {"Authorization": "Bearer e2e-platform-token-0123456789abcdef"},
            "capability": {"X-Trace-Task-Capability": self.cap},
            "user": {"Authorization": f"Bearer {self.user}"},
            "none": {},
        }[auth]

    def send(self, method: str, path: str, auth: str, raw: bytes, **headers: str) -> Response:
        return self.t.request(method, path, raw=raw, headers={**self.headers(auth), **headers})

    def snapshot(self) -> dict[str, Any]:
        q = " UNION ALL ".join(
            f"SELECT '{t}', count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), ''))"
            f" FROM {t} x"
            for t in CHECKED_TABLES
        )
        return {name: (n, digest) for name, n, digest in self.t.sql(q)}


def with_slot(body: Any, raw_value: str) -> bytes:
    """``body`` as JSON text with SLOT replaced by ``raw_value`` (any JSON text, even one
    ``json.dumps`` cannot write, such as ``1e400`` or a 5,000-digit integer)."""
    text = json.dumps(body)
    marker = json.dumps(SLOT)
    assert text.count(marker) == 1
    return text.replace(marker, raw_value).encode()


@pytest.fixture
def surface(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Surface]:
    trace_procs.lease_s = 300.0  # nothing but the requests under test touches the task
    _setup_org(trace_procs.db_url)
    base_env = trace_procs.env
    policy = {"TRACE_USER_JWT_ISSUER": "trace-lite", "TRACE_USER_JWT_AUDIENCE": "trace-api"}
    monkeypatch.setattr(trace_procs, "env", lambda: {**base_env(), **policy})
    trace_procs.start_dispatcher()
    yield Surface(trace_procs)


def _check_error(r: Response, statuses: set[int]) -> dict[str, Any]:
    assert r.status in statuses, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    body: dict[str, Any] = r.json
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), r
    assert not LEAK.search(r.raw.decode()), r
    return body


POISONS: list[tuple[str, str]] = [
    ("nul", '"a\\u0000b"'),
    ("nul_key", '{"k\\u0000": 1}'),
    ("lone_surrogate", '"\\ud800"'),
    ("lone_low_surrogate_key", '{"\\udc00": 1}'),
    ("nan", "NaN"),
    ("infinity", "Infinity"),
    ("minus_infinity", "-Infinity"),
    ("float_overflow", "1e400"),
    ("int_5000_digits", "9" * 5000),
    ("int_minus_5000_digits", "-" + "9" * 5000),
    ("int_over_2_256", str(2**256 + 1)),
    ("deep_100", "[" * 100 + "]" * 100),
    ("deep_100000", "[" * 100_000 + "]" * 100_000),
]


@pytest.mark.parametrize(("name", "raw_value"), POISONS, ids=[n for n, _ in POISONS])
def test_unstorable_values_are_422_with_the_path_on_every_json_route(
    surface: Surface, name: str, raw_value: str
) -> None:
    before = surface.snapshot()
    for method, path, auth, body, slot in surface.routes:
        r = surface.send(method, path, auth, with_slot(body, raw_value))
        err = _check_error(r, {422})
        assert err["error"] == "validation_failed", (path, r)
        if name == "deep_100000":
            assert err["field"] == "$", (path, r)  # refused before it is even parsed in full
        elif name == "deep_100":
            assert err["field"].startswith(slot + "["), (path, r)
        elif name.endswith("_key"):
            assert err["field"].startswith(slot + '["'), (path, r)
        else:
            assert err["field"] == slot, (path, r)
    assert surface.snapshot() == before, "a refused request wrote something"


def test_unauthenticated_bodies_are_never_parsed(surface: Surface) -> None:
    """Whatever the body, no credential (or one that does not verify) answers 401/403 -- the
    same answer as for a valid body, so nothing about the body was read."""
    before = surface.snapshot()
    forged = {
        "platform": {"Authorization": "Bearer not-the-platform-token-at-all"},
        "capability": {"X-Trace-Task-Capability": "x"},
        "user": {"Authorization": "Bearer x.y.z"},
    }
    for method, path, auth, body, _slot in surface.routes:
        for raw in (
            b"[" * 100_000 + b"]" * 100_000,
            with_slot(body, "9" * 5000),
            with_slot(body, '"\\u0000"'),
            b"{not json",
            with_slot(body, '"fine"'),
        ):
            for headers in ({}, forged[auth]):
                r = surface.t.request(method, path, raw=raw, headers=headers)
                err = _check_error(r, {401, 403})
                assert err["error"] in ("unauthenticated", "forbidden"), (path, r)
    assert surface.snapshot() == before


def test_bodies_not_sent_as_json_are_415(surface: Surface) -> None:
    before = surface.snapshot()
    for method, path, auth, body, _slot in surface.routes:
        valid = with_slot(body, '"fine"')
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
        ):
            r = surface.send(method, path, auth, valid, **{"Content-Type": content_type})
            err = _check_error(r, {415})
            assert err["error"] == "unsupported_media_type", (path, content_type, r)
    assert surface.snapshot() == before


def test_no_response_names_the_server_version(surface: Surface) -> None:
    responses = [
        surface.t.request("GET", "/healthz"),
        surface.t.request("GET", "/no/such/route"),
        surface.t.request("POST", "/internal/task-claim", body={}),
        surface.send("POST", "/v1/task/heartbeat", "capability", b"{}"),
    ]
    for r in responses:
        server = {k.lower(): v for k, v in r.headers.items()}.get("server", "")
        assert not re.search(r"python|aiohttp|[0-9]+\.[0-9]+", server, re.IGNORECASE), r.headers


# --- the property --------------------------------------------------------------------------


class _Raw:
    """JSON text written as is (numbers json.dumps cannot write)."""

    def __init__(self, text: str) -> None:
        self.text = text


odd_text = st.text(
    alphabet=st.sampled_from(
        ["a", "\x00", "\ud800", "\udfff", "\U0001f600", "\u202e", "\ufeff", '"', "\\", "é"]
    ),
    max_size=8,
)
odd_numbers = st.one_of(
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(),  # NaN and Infinity included: json.dumps writes them as tokens
    st.sampled_from(["1e400", "-1e400", "9" * 5000, "0." + "0" * 500 + "1", "-0"]).map(_Raw),
)


hostile_json = st.recursive(
    st.none() | st.booleans() | odd_numbers | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)


def _dump(value: Any) -> str:
    """``json.dumps`` that also writes ``_Raw`` text and integers of any length."""
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)  # within 2**300: far below Python's 4,300-digit str() limit
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"


@st.composite
def hostile_bodies(draw: st.DrawFn, body: Any) -> bytes:
    """A route's valid body with a hostile value in its slot, or at a new key, or wrapped
    deep; or an arbitrary hostile document."""
    value = _dump(draw(hostile_json))
    shape = draw(st.sampled_from(["slot", "deep", "extra", "whole"]))
    if shape == "slot":
        return with_slot(body, value)
    if shape == "deep":
        depth = draw(st.integers(1, 2000))
        return with_slot(body, "[" * depth + value + "]" * depth)
    if shape == "extra":
        text = with_slot(body, '"fine"').decode()
        return (text[:-1] + f", {json.dumps(draw(odd_text))}: {value}}}").encode()
    return value.encode()


def test_hostile_json_never_breaks_the_edge(surface: Surface) -> None:
    state = {"before": surface.snapshot()}
    routes = surface.routes

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        st.sampled_from(range(len(routes))).flatmap(
            lambda i: st.tuples(
                st.just(i),
                hostile_bodies(routes[i][3]),
                st.sampled_from(["valid", "none", "wrong"]),
            )
        )
    )
    def run(case: tuple[int, bytes, str]) -> None:
        i, raw, credential = case
        method, path, auth, _body, _slot = routes[i]
        headers = {
            "valid": surface.headers(auth),
            "none": {},
            "wrong": {"Authorization": "Bearer nope", "X-Trace-Task-Capability": "nope"},
        }[credential]
        r = surface.t.request(method, path, raw=raw, headers=headers)
        assert r.status < 500, (path, raw[:200], r)
        if r.status < 400:  # a hostile-looking but storable body may succeed: a legal write
            state["before"] = surface.snapshot()
            return
        _check_error(r, {r.status})
        if credential != "valid":
            assert r.status in (401, 403), (path, r)
        assert surface.snapshot() == state["before"], ("a refusal wrote", path, raw[:200], r)

    run()


def test_malformed_http_is_refused_and_logged_as_the_clients_mistake(surface: Surface) -> None:
    """aiohttp's parser refuses these before any handler: 400, and an info line without a
    traceback in the Dispatcher's log (not an error-level traceback per bad client)."""
    port = int(surface.t.url.rsplit(":", 1)[1])
    for raw in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/task/complete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0], reply
        assert b"\r\nServer: trace\r\n" in reply and b"Python" not in reply, reply
    log_path = surface.t.procs[0].log_path

    def refused_lines() -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("logger") == "aiohttp.server"]

    lines = surface.t.wait_until(
        lambda: len(refused_lines()) >= 2 and refused_lines(), 10, "the refusals in the log"
    )
    for line in lines:
        assert line["level"] == "info" and "exc" not in line, line


#: The path parameter that follows each path word of the user API.
USER_PARAMS = {
    "orgs": "org",
    "datasets": "dataset",
    "versions": "version",
    "pins": "pin_id",
    "dags": "dag",
    "members": "subject",
}
HOSTILE_SEGMENTS = ["%00", "a%00b", "%ED%A0%80", "%FF", "x" * 5000, "..", "%2e%2e", "-1", "9" * 40]


def test_hostile_path_segments_never_break_the_edge(surface: Surface) -> None:
    """Path parameters (org, dataset, version, dag, subject, pin, task id) get the same care as
    bodies: never a 5xx, never backend text, nothing written."""
    before = surface.snapshot()
    templates = [
        ("GET", "/v1/orgs/{x}/datasets", "user", None),
        ("GET", "/v1/orgs/acme/datasets/{x}", "user", None),
        ("POST", "/v1/orgs/acme/datasets/blocks/versions/{x}/purge", "user", None),
        ("POST", "/v1/orgs/acme/datasets/{x}/versions/{x}/purge", "user", None),
        ("PUT", "/v1/orgs/{x}/datasets/blocks/read-roles", "user", {"read_roles": []}),
        ("DELETE", "/v1/orgs/acme/pins/{x}", "user", None),
        ("POST", "/v1/orgs/acme/dags/{x}/rollback", "user", None),
        ("POST", "/v1/orgs/{x}/dags/chain/cutover", "user", {"pointers": {"blocks": SLOT}}),
        ("GET", "/v1/orgs/{x}/members", "user", None),
        ("PUT", "/v1/orgs/acme/members/{x}", "user", {"roles": []}),
        ("DELETE", "/v1/orgs/acme/members/{x}", "user", None),
        ("GET", "/internal/admin/tasks/{x}", "platform", None),
        ("POST", "/internal/admin/tasks/{x}/cancel", "platform", None),
        ("GET", "/internal/task-fetch?task_id={x}", "platform", None),
        ("GET", "/internal/task-fetch?task_id=" + "{x}" + "&attempt={x}", "platform", None),
    ]
    for method, template, auth, body in templates:
        for segment in HOSTILE_SEGMENTS:
            path = template.replace("{x}", segment)
            raw = (
                None
                if body is None
                else with_slot(body, '"x"')
                if SLOT in json.dumps(body)
                else json.dumps(body).encode()
            )
            headers = surface.headers(auth)
            if raw is not None:
                headers = {**headers, "Content-Type": "application/json"}
            r = surface.t.request(method, path, raw=raw, headers=headers)
            assert r.status < 500, (method, path[:100], r)
            one_param = template.count("{x}") == 1
            if auth == "user" and one_param and segment in ("%00", "a%00b", "x" * 5000):
                field = template.split("{x}")[0].rsplit("/", 2)[-2]  # the segment's parameter
                err = _check_error(r, {422})
                assert err["field"] == USER_PARAMS[field], (path[:100], r)
            if r.status >= 400 and r.raw:
                assert not LEAK.search(r.raw.decode(errors="replace")), (path[:100], r)
    assert surface.snapshot() == before


def test_every_json_route_is_under_attack_here(surface: Surface) -> None:
    """The routes above are every route with a JSON body in docs/api/openapi.json (which
    tests/unit/test_openapi.py pins to make_app): a new JSON route must be added here."""
    spec = json.loads((Path(__file__).resolve().parents[2] / "docs/api/openapi.json").read_text())
    documented = {
        (method.upper(), template)
        for template, item in spec["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "requestBody" in op
    }

    def template_of(method: str, path: str) -> tuple[str, str] | None:
        concrete = path.split("?")[0]
        for m, template in documented:
            pattern = re.sub(r"\{[^/}]+\}", "[^/]+", template)  # templates hold no regex syntax
            if m == method and re.fullmatch(pattern, concrete):
                return m, template
        return None

    covered = {template_of(method, path) for method, path, *_ in surface.routes}
    assert None not in covered, "a route here is not in the OpenAPI document"
    assert covered == documented, sorted(documented - covered)
