"""``trace udf init|build|test|deploy|runner`` (mounted by ``trace_servers.cli``).

    trace udf init NAME [--dir DIR]          scaffold a Python UDF (handler, manifest, input)
    trace udf build [DIR] [--out FILE]       package a bundle; prints name, digest, bytes
    trace udf test [DIR] [--input FILE]      run the handler locally (trace_udf.testing)
    trace udf deploy [DIR] --org ORG         build and upload to the org's bundle store; prints
                                             the reference a DAG job uses
    trace udf runner [--listen HOST:PORT]    run the Lite UDF runner (trace_lite.udf)

A bundle directory holds ``trace-udf.json`` (``docs/architecture/udf.md``). Python bundles are
built from the directory's ``*.py`` files (and packages) plus the vendored ``trace_udf``; Node
and Rust bundles pack the directory's files as they are (built beforehand by the language's
own tools), the ``entry`` executable for Rust.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from trace_core import errors, udf
from trace_lite.config import LiteSettings
from trace_servers.signals import stop_event

log = logging.getLogger("trace.udf")

_HANDLER = '''"""{name}: a Trace UDF (docs/architecture/udf.md)."""

from trace_udf import Context


def handler(ctx: Context) -> dict | None:
    """Read the granted input, emit rows to a buffered dataset, return a small result."""
    rows = ctx.query("SELECT * FROM " + ctx.payload["input"]) if "input" in ctx.payload else []
    out = [{{"n": i, "doubled": 2 * i}} for i in range(int(ctx.payload.get("n", 3)))]
    if "output" in ctx.payload:
        ctx.emit_rows(ctx.payload["output"], out)
    ctx.emit_event("{name}.done", {{"rows": len(out)}}, key="done")
    return {{"read": len(rows), "emitted": len(out)}}
'''


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("udf", help="UDF bundles: scaffold, build, test, deploy; the Lite runner")
    usub = u.add_subparsers(dest="udf_cmd", required=True)
    i = usub.add_parser("init", help="scaffold a Python UDF")
    i.add_argument("name")
    i.add_argument("--dir", default=None)
    b = usub.add_parser("build", help="package a bundle")
    b.add_argument("dir", nargs="?", default=".")
    b.add_argument("--out", default=None)
    t = usub.add_parser("test", help="run the handler locally")
    t.add_argument("dir", nargs="?", default=".")
    t.add_argument("--input", default=None, help='JSON file {"payload": {}, "datasets": {}}')
    d = usub.add_parser("deploy", help="build and upload to the org's bundle store")
    d.add_argument("dir", nargs="?", default=".")
    d.add_argument("--org", default="default")
    r = usub.add_parser("runner", help="run the Lite UDF runner")
    r.add_argument("--listen", default="127.0.0.1:8471")
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--isolation", choices=["auto", "netns", "none"], default="auto")
    r.add_argument("--no-warm", action="store_true", help="one environment per invocation")
    r.add_argument("--work-dir", default=None)


def manifest_of(directory: Path) -> udf.Manifest:
    """The directory's checked ``trace-udf.json``. Raises ``ValidationFailed``."""
    path = directory / udf.MANIFEST_NAME
    if not path.is_file():
        raise errors.ValidationFailed(f"no {udf.MANIFEST_NAME} in {directory}", field="dir")
    return udf.parse_manifest(path.read_bytes())


def build(directory: Path) -> tuple[udf.Manifest, bytes]:
    """Package the bundle of ``directory``. Raises ``ValidationFailed``."""
    from trace_lite.udf.bundles import pack, python_bundle

    manifest = manifest_of(directory)
    files: dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        if rel.as_posix() == udf.MANIFEST_NAME or rel.parts[0] in ("dist", "tests", "trace_udf"):
            continue
        if manifest.language is udf.Language.PYTHON and path.suffix not in (".py", ".json"):
            continue
        files[rel.as_posix()] = path.read_bytes()
    if manifest.language is udf.Language.PYTHON:
        return manifest, python_bundle(manifest, files)
    if manifest.entry not in files:
        raise errors.ValidationFailed(
            f"entry {manifest.entry!r} is not in {directory}", field="entry"
        )
    files[udf.MANIFEST_NAME] = json.dumps(manifest.to_json(), sort_keys=True, indent=2).encode()
    executables = frozenset({manifest.entry} if manifest.language is udf.Language.RUST else ())
    return manifest, pack(files, executables)


def cmd_init(args: argparse.Namespace) -> int:
    name = args.name
    target = Path(args.dir or name)
    if target.exists() and any(target.iterdir()):
        print(f"{target} exists and is not empty", file=sys.stderr)
        return 2
    manifest = udf.Manifest(name, udf.Language.PYTHON, "handler.handler", "", udf.Limits())
    udf.parse_manifest(json.dumps(manifest.to_json()).encode())  # the name is valid
    target.mkdir(parents=True, exist_ok=True)
    (target / udf.MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    (target / "handler.py").write_text(_HANDLER.format(name=name))
    (target / "input.json").write_text(
        json.dumps({"payload": {"n": 3, "output": f"{name.replace('-', '_')}_rows"}}, indent=2)
        + "\n"
    )
    print(json.dumps({"created": str(target)}))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    manifest, data = build(directory)
    digest = udf.digest_of(data)
    out = Path(args.out) if args.out else directory / "dist" / f"{manifest.name}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(
        json.dumps(
            {
                "name": manifest.name,
                "digest": digest,
                "path": str(out.resolve()),
                "bytes": len(data),
            }
        )
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from trace_udf import testing
    from trace_udf.runtime import load_handler

    directory = Path(args.dir).resolve()
    manifest = manifest_of(directory)
    if manifest.language is not udf.Language.PYTHON:
        print(
            "trace udf test runs Python handlers; use the language's SDK harness", file=sys.stderr
        )
        return 2
    doc: dict[str, Any] = {}
    input_path = Path(args.input) if args.input else directory / "input.json"
    if input_path.is_file():
        doc = json.loads(input_path.read_text())
    sys.path.insert(0, str(directory))
    handler = load_handler(manifest.handler)
    result = testing.run(handler, doc.get("payload", {}), datasets=doc.get("datasets", {}))
    print(
        json.dumps(
            {
                "result": result.result,
                "rows": result.rows,
                "batch_keys": result.batch_keys,
                "final_events": result.final_events,
            },
            indent=2,
            default=str,
        )
    )
    return 0


async def _deploy(settings: LiteSettings, org: str, key: str, data: bytes) -> str:
    from trace_lite.dispatcher import open_pool
    from trace_lite.orgs import Orgs
    from trace_servers import profiles

    state_url = settings.database_url
    if not state_url:
        from trace_lite.embedded_pg import default_database_urls

        state_url = default_database_urls(settings.home / "pg")[0]
    pool = await open_pool(state_url, min_size=1, max_size=2)
    try:
        org_id = await Orgs(pool).org_id(org, create=True)
        parts = await profiles.dispatcher_parts(settings, pool)
        try:
            full_key = key.format(org_id=org_id)
            await parts.object_store.put(full_key, data)
        finally:
            await parts.close()
    finally:
        await pool.close()
    return full_key


def cmd_deploy(settings: LiteSettings, args: argparse.Namespace) -> int:
    manifest, data = build(Path(args.dir))
    ref = udf.BundleRef(manifest.name, udf.digest_of(data))
    key = udf.bundle_key_for("{org_id}", ref)
    stored = asyncio.run(_deploy(settings, args.org, key, data))
    print(
        json.dumps(
            {
                "name": ref.name,
                "digest": ref.digest,
                "key": stored,
                "job": {
                    "operator": "udf",
                    "runtime": "lambda",
                    "config": {"bundle": {"name": ref.name, "digest": ref.digest}},
                },
            }
        )
    )
    return 0


async def _serve(settings: LiteSettings, args: argparse.Namespace) -> None:
    from aiohttp import web

    from trace_lite.udf import Runner, RunnerConfig, netns_available

    isolation = args.isolation
    if isolation == "auto":
        isolation = "netns" if netns_available() else "none"
    elif isolation == "netns" and not netns_available():
        raise SystemExit("--isolation netns needs root and unshare")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="trace-udf-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o711)
    python = sys.executable
    if isolation == "netns":  # runtimes run as nobody: an interpreter everyone may execute
        python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
    config = RunnerConfig(
        dispatcher_url=settings.dispatcher_url,
        work_dir=work,
        isolation=isolation,
        bundle_url_prefix=settings.dispatcher_url + "/o/",
        python=python,
        node=shutil.which("node"),
        concurrency=args.concurrency,
        keep_warm=not args.no_warm,
    )
    runner = Runner(config)
    await runner.start()
    app = web.Application(client_max_size=512 * 1024)
    app.add_routes(runner.routes())
    site_runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await site_runner.setup()
    host, _, port = args.listen.rpartition(":")
    await web.TCPSite(site_runner, host or "127.0.0.1", int(port)).start()
    stop = stop_event()
    log.info("udf runner listening", extra={"listen": args.listen, "isolation": isolation})
    try:
        await stop.wait()
    finally:
        await site_runner.cleanup()
        await runner.close()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def cmd_udf(settings: LiteSettings, args: argparse.Namespace) -> int:
    try:
        match args.udf_cmd:
            case "init":
                return cmd_init(args)
            case "build":
                return cmd_build(args)
            case "test":
                return cmd_test(args)
            case "deploy":
                return cmd_deploy(settings, args)
            case "runner":
                from trace_servers import logs

                # the runner holds no platform credential and no database URL
                for name in (
                    "TRACE_PLATFORM_TOKEN",
                    "TRACE_DATABASE_URL",
                    "TRACE_DATA_DATABASE_URL",
                ):
                    os.environ.pop(name, None)
                logs.setup("udf-runner")
                asyncio.run(_serve(settings, args))
                return 0
    except errors.ValidationFailed as exc:
        print(f"{exc.field}: {exc.message}" if exc.field else exc.message, file=sys.stderr)
        return 2
    return 2
