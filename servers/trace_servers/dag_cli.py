"""``trace dag ...`` commands (mounted by ``trace_servers.cli``); offline, no server needed.

trace dag validate FILE [--json]    every problem of a DAG file, with its line, path and hint;
                                    exits 1 when there is any
trace dag diff OLD NEW [--json]     what changed between two DAG files, each change classified
                                    (materialization / execution / metadata), and the jobs a
                                    deploy would rebuild
trace dag schema                    print the JSON Schema of DAG files (for editors)

Offline, operators are checked against the built-in ones (``trace_sdk.BUILTIN_OPERATORS``,
and ``trace_lite.chain.operators.LITE_OPERATORS`` that a Lite worker adds); dataset names read with ``from: {dataset}`` and the one-producer rule are checked at deploy,
against the registry.

Against a running Dispatcher (``TRACE_DISPATCHER_URL``), as the user of ``TRACE_USER_TOKEN``:

trace dag deploy FILE --org ORG [--dry-run]   deploy a new version (nothing when unchanged);
                                              exit 1 listing every problem the server found
trace dag diff FILE --org ORG                 what deploying FILE would change and rebuild
trace dag list --org ORG                      the org's DAGs and their active versions
trace dag show NAME --org ORG                 the active version's spec and datasets
trace dag versions NAME --org ORG             every version of a DAG
trace dag trigger ORG DAG JOB [--payload JSON] [--run-id ID]
                                              run a source job of the active version
trace dag rollback ORG NAME                   restore the previous version and its pointer
                                              set; cancel the rolled-back version's work
trace dag cancel ORG NAME (--run RUN_ID | --version N)
                                              cancel a run's or a version's unfinished tasks
trace dag status ORG NAME [--json]            the active version and each job's task counts,
                                              with a progress bar of finished tasks, and the
                                              rebuild of a staged version
trace dag invalidate ORG DATASET (--range START:END | --key KEY) [--version UUID]
                                              rerun the DAG tasks that read a replaced range
                                              or partition of the dataset, transitively
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs

from trace_core import errors
from trace_core.dag import Dag, OperatorInfo, Problem, affected_jobs, diff
from trace_lite import dag_files
from trace_servers.user_calls import user_token


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("dag", help="DAG files: validate, diff, schema")
    dsub = d.add_subparsers(dest="dag_cmd", required=True)
    v = dsub.add_parser("validate", help="check a DAG file; exit 1 listing every problem")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", help="print the problems as JSON")
    f = dsub.add_parser(
        "diff",
        help="classify the changes between two DAG files (OLD NEW), or between the active "
        "version and FILE (FILE --org ORG)",
    )
    f.add_argument("files", type=Path, nargs="+", metavar="FILE")
    f.add_argument("--org", help="diff FILE against the org's active version of its DAG")
    f.add_argument("--json", action="store_true", help="print the changes as JSON")
    dsub.add_parser("schema", help="print the JSON Schema of DAG files")
    dp = dsub.add_parser("deploy", help="deploy a DAG file to an org (a new immutable version)")
    dp.add_argument("file", type=Path)
    dp.add_argument("--org", required=True)
    dp.add_argument("--dry-run", action="store_true", help="show the diff, deploy nothing")
    dp.add_argument("--json", action="store_true", help="print the answer (or problems) as JSON")
    ls = dsub.add_parser("list", help="the org's DAGs")
    ls.add_argument("--org", required=True)
    t = dsub.add_parser("trigger", help="run a source job of a DAG's active version")
    t.add_argument("org")
    t.add_argument("dag")
    t.add_argument("job")
    t.add_argument("--payload", default="{}", help="a JSON object merged over the job's config")
    t.add_argument("--run-id", help="the run's durable id: the same id never runs twice")
    rb = dsub.add_parser(
        "rollback", help="restore a DAG's previous version and pointer set; cancel its work"
    )
    rb.add_argument("org")
    rb.add_argument("name")
    cn = dsub.add_parser("cancel", help="cancel a DAG run's or version's unfinished tasks")
    cn.add_argument("org")
    cn.add_argument("name")
    which = cn.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a run id (a trigger's --run-id, or a schedule slot)")
    which.add_argument("--version", type=int, help="a version number")
    st = dsub.add_parser("status", help="a DAG's active version and task counts per job")
    st.add_argument("org")
    st.add_argument("name")
    st.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    iv = dsub.add_parser(
        "invalidate", help="rerun the DAG tasks that read a replaced range of a dataset"
    )
    iv.add_argument("org")
    iv.add_argument("dataset")
    scope = iv.add_mutually_exclusive_group(required=True)
    scope.add_argument("--range", help="the replaced block range START:END (half-open)")
    scope.add_argument("--key", help="the replaced partition key")
    iv.add_argument("--version", help="the dataset version (default: the active one)")
    for name in ("show", "versions"):
        p = dsub.add_parser(name, help=f"{name} a deployed DAG")
        p.add_argument("name")
        p.add_argument("--org", required=True)


def builtin_operators() -> dict[str, OperatorInfo]:
    """The operators a worker runs out of the box, by name."""
    from trace_lite.alert_operators import ALERT_OPERATORS
    from trace_lite.chain.operators import LITE_OPERATORS
    from trace_sdk import BUILTIN_OPERATORS

    builtin = {
        name: OperatorInfo(name, (op.__doc__ or "").strip().split("\n")[0])
        for name, op in BUILTIN_OPERATORS.items()
    }
    # and those a Lite worker adds over the state database (trace_lite.chain.operators)
    lite = LITE_OPERATORS | ALERT_OPERATORS  # alerting: trace_lite.alert_operators
    return builtin | {name: OperatorInfo(name, doc) for name, doc in lite.items()}


def _problems(path: Path) -> list[Problem]:
    try:
        return dag_files.check_file(path, operators=builtin_operators())
    except errors.ValidationFailed as exc:
        return [Problem("", exc.message)]


def _print_problems(path: Path, problems: list[Problem], as_json: bool) -> None:
    if as_json:
        body = {"file": str(path), "problems": [attrs.asdict(p) for p in problems]}
        print(json.dumps(body, indent=2))
        return
    for p in problems:
        print(p.render(str(path)), file=sys.stderr)
    print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)


def _load(path: Path, as_json: bool) -> Dag | None:
    problems = _problems(path)
    if problems:
        _print_problems(path, problems, as_json)
        return None
    return dag_files.load_dag(path)


async def _call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One user-API call with ``TRACE_USER_TOKEN``: ``(status, decoded JSON body)``."""
    import aiohttp

    headers = {"Authorization": f"Bearer {user_token()}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url.rstrip("/") + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def _remote(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        return asyncio.run(_call(url, method, path, body))
    except OSError as exc:
        raise SystemExit(f"cannot reach the Dispatcher at {url}: {exc}") from exc


def _deploy(args: argparse.Namespace, url: str, *, dry_run: bool) -> int:
    """``deploy`` / ``diff FILE --org``: send the file's document; print what the server did,
    or every problem it found, with the file's line numbers."""
    try:
        loaded = dag_files.load_text(dag_files.read_text(args.file))
    except errors.ValidationFailed as exc:
        _print_problems(args.file, [Problem("", exc.message)], args.json)
        return 1
    if loaded.problems:
        _print_problems(args.file, list(loaded.problems), args.json)
        return 1
    query = "?dry_run=true" if dry_run else ""
    status, body = _remote(url, "POST", f"/v1/orgs/{args.org}/dags{query}", {"spec": loaded.doc})
    if status >= 400:
        found = body.get("details", {}).get("problems") if isinstance(body, dict) else None
        if isinstance(found, list) and found:
            problems = [
                Problem(p["path"], p["message"], p.get("hint", ""), loaded.line_of(p["path"]))
                for p in found
            ]
            _print_problems(args.file, problems, args.json)
        else:
            print(json.dumps(body), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    _print_changes(body["changes"], body["rebuild"])
    if body.get("abandoned"):
        print(f"abandoned the rebuild of version {body['abandoned']['version']}")
    if dry_run:
        print(f"active version: {body['version']} (dry run: nothing deployed)")
    elif body.get("staged_version") is not None:
        print(
            f"staged {body['dag']} version {body['staged_version']}: rebuilding "
            f"{', '.join(body['rebuild'])} ({body['rebuild_tasks']} task(s) replayed); version "
            f"{body['version']} stays active until the cutover (trace dag status)"
        )
    elif body["created"]:
        print(f"deployed {body['dag']} version {body['version']} ({body['digest'][:12]})")
    else:
        print(f"{body['dag']} unchanged: version {body['version']} stays active")
    return 0


def _print_changes(changes: list[dict[str, Any]], rebuild: list[str]) -> None:
    if not changes:
        print("no changes")
    else:
        width = max(len(c["path"]) for c in changes)
        for c in changes:
            print(
                f"{c['kind']:<16} {c['path']:<{width}}  "
                f"{json.dumps(c['old'], default=str)} -> {json.dumps(c['new'], default=str)}"
            )
    print(f"rebuild: {', '.join(rebuild) if rebuild else 'nothing'}")


def _get(url: str, path: str) -> int:
    status, body = _remote(url, "GET", path)
    print(json.dumps(body, indent=2), file=sys.stdout if status < 400 else sys.stderr)
    return 0 if status < 400 else 1


#: The states a task does not leave (``trace_core.lifecycle.TERMINAL_STATES``) count as done.
_DONE = ("completed", "failed", "canceled")


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#####-------]  5/12`` (an empty job shows an empty bar)."""
    filled = width * done // total if total else 0
    return f"[{'#' * filled}{'-' * (width - filled)}] {done:>{len(str(total))}}/{total}"


def render_status(body: dict[str, Any]) -> str:
    """``trace dag status`` as text: the active pair, one line per job (a bar of its finished
    tasks and the counts that are not zero), and other versions' unfinished tasks."""
    lines = [
        f"{body['dag']}: active version {body['active_version']}, "
        f"pointer set {body['active_generation']}"
    ]
    jobs: dict[str, dict[str, int]] = body["jobs"]
    width = max((len(j) for j in jobs), default=0)
    for job, counts in jobs.items():
        total = sum(counts.values())
        done = sum(counts.get(s, 0) for s in _DONE)
        shown = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
        lines.append(f"  {job:<{width}}  {progress_bar(done, total)}  {shown or 'no tasks'}")
    rebuilding = body.get("rebuilding")
    for version, counts in body["other_versions"].items():
        if rebuilding and version == str(rebuilding["version"]):
            continue  # shown below, job by job
        shown = ", ".join(f"{s} {n}" for s, n in counts.items())
        lines.append(f"  version {version} (not active): {shown}")
    if rebuilding:
        held = rebuilding["waiting_events"]
        lines.append(
            f"rebuilding version {rebuilding['version']} (pointer set "
            f"{rebuilding['generation']}): cuts over when every rebuilt job is done; "
            f"{held} event(s) waiting"
            + ("; BLOCKED: a rebuild task failed or was canceled" if rebuilding["blocked"] else "")
        )
        staged: dict[str, dict[str, int]] = rebuilding["jobs"]
        width = max((len(j) for j in staged), default=0)
        for job, counts in staged.items():
            total = sum(counts.values())
            done = counts.get("completed", 0)
            shown = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
            lines.append(f"  {job:<{width}}  {progress_bar(done, total)}  {shown or 'no tasks'}")
    return "\n".join(lines)


def _post(url: str, path: str) -> int:
    status, body = _remote(url, "POST", path)
    print(json.dumps(body, indent=2), file=sys.stdout if status < 400 else sys.stderr)
    return 0 if status < 400 else 1


def cmd_dag(args: argparse.Namespace, dispatcher_url: str = "") -> int:
    """Run ``trace dag ...``; ``dispatcher_url`` serves the commands that talk to a server."""
    match args.dag_cmd:
        case "deploy":
            return _deploy(args, dispatcher_url, dry_run=args.dry_run)
        case "list":
            return _get(dispatcher_url, f"/v1/orgs/{args.org}/dags")
        case "show":
            return _get(dispatcher_url, f"/v1/orgs/{args.org}/dags/{args.name}")
        case "versions":
            return _get(dispatcher_url, f"/v1/orgs/{args.org}/dags/{args.name}/versions")
        case "trigger":
            try:
                payload = json.loads(args.payload)
            except ValueError as exc:
                raise SystemExit(f"--payload is not JSON: {exc}") from exc
            if not isinstance(payload, dict):
                kind = "null" if payload is None else type(payload).__name__
                raise SystemExit(f'--payload must be a JSON object such as {{"n": 4}}, not {kind}')
            body = {"payload": payload, "run_id": args.run_id}
            path = f"/v1/orgs/{args.org}/dags/{args.dag}/jobs/{args.job}/trigger"
            status, out = _remote(dispatcher_url, "POST", path, body)
            print(json.dumps(out, indent=2), file=sys.stdout if status < 400 else sys.stderr)
            return 0 if status < 400 else 1
        case "rollback":
            return _post(dispatcher_url, f"/v1/orgs/{args.org}/dags/{args.name}/versions/rollback")
        case "cancel":
            base = f"/v1/orgs/{args.org}/dags/{args.name}"
            if args.run is not None:
                return _post(dispatcher_url, f"{base}/runs/{quote(args.run, safe='')}/cancel")
            return _post(dispatcher_url, f"{base}/versions/{args.version}/cancel")
        case "status":
            status, body = _remote(
                dispatcher_url, "GET", f"/v1/orgs/{args.org}/dags/{args.name}/status"
            )
            if status >= 400 or args.json:
                print(json.dumps(body, indent=2), file=sys.stdout if status < 400 else sys.stderr)
            else:
                print(render_status(body))
            return 0 if status < 400 else 1
        case "invalidate":
            scope: dict[str, Any] = {"key": args.key, "version": args.version}
            if args.range is not None:
                start, sep, end = args.range.partition(":")
                if not sep or not start.isdigit() or not end.isdigit():
                    raise SystemExit("--range takes START:END, e.g. 100:200")
                scope |= {"start": int(start), "end": int(end)}
            path = f"/v1/orgs/{args.org}/datasets/{args.dataset}/invalidate"
            status, out = _remote(dispatcher_url, "POST", path, scope)
            print(json.dumps(out, indent=2), file=sys.stdout if status < 400 else sys.stderr)
            return 0 if status < 400 else 1
        case "schema":
            print(json.dumps(dag_files.json_schema(), indent=2))
            return 0
        case "validate":
            dag = _load(args.file, args.json)
            if dag is None:
                return 1
            if args.json:
                print(json.dumps({"file": str(args.file), "problems": []}))
            else:
                print(
                    f"{args.file}: ok (DAG {dag.name!r}: {len(dag.jobs)} job(s), "
                    f"{len(dag.publish)} published dataset(s))"
                )
            return 0
        case "diff":
            if args.org is not None:
                if len(args.files) != 1:
                    raise SystemExit("trace dag diff FILE --org ORG takes one file")
                args.file = args.files[0]
                return _deploy(args, dispatcher_url, dry_run=True)
            if len(args.files) != 2:
                raise SystemExit("trace dag diff takes OLD NEW (or FILE --org ORG)")
            old, new = _load(args.files[0], args.json), _load(args.files[1], args.json)
            if old is None or new is None:
                return 1
            changes = diff(old, new)
            rebuild = sorted(affected_jobs(new, changes))
            if args.json:
                body = {
                    "changes": [{**attrs.asdict(c), "kind": c.kind.value} for c in changes],
                    "rebuild": rebuild,
                }
                print(json.dumps(body, indent=2, default=str))
                return 0
            if not changes:
                print("no changes")
                return 0
            _print_changes([{**attrs.asdict(c), "kind": c.kind.value} for c in changes], rebuild)
            return 0
    raise SystemExit(f"unknown dag command {args.dag_cmd!r}")  # pragma: no cover
