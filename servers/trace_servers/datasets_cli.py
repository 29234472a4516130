"""``trace users ...`` and ``trace datasets ...`` commands (mounted by ``trace_servers.cli``).

trace users token --sub alice [--ttl 3600]     mint a development user JWT (Lite issuer)
trace users add-member ORG SUBJECT [--roles r]  bootstrap membership (operator, direct DB)
trace datasets list|show|resolve|purge ...      the user API, with TRACE_USER_TOKEN
trace datasets clean-staging [--grace-s S]      delete staged objects of finished attempts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from trace_lite.config import LiteSettings
from trace_servers.user_calls import call_user_api


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("users", help="user tokens and org membership")
    usub = u.add_subparsers(dest="users_cmd", required=True)
    t = usub.add_parser("token", help="mint a development user JWT with the local issuer")
    t.add_argument("--sub", required=True)
    t.add_argument("--ttl", type=int, default=3600)
    m = usub.add_parser("add-member", help="set a member's roles (operator bootstrap)")
    m.add_argument("org")
    m.add_argument("subject")
    m.add_argument("--roles", default="", help="comma-separated, e.g. admin,analyst")
    d = sub.add_parser("datasets", help="datasets: list, show, resolve, purge, clean-staging")
    dsub = d.add_subparsers(dest="datasets_cmd", required=True)
    for name in ("list", "show", "resolve", "purge"):
        p = dsub.add_parser(name)
        p.add_argument("--org", default="default")
        if name == "show":
            p.add_argument("dataset")
        if name == "resolve":
            p.add_argument("datasets", nargs="+")
            p.add_argument("--pin-ttl-s", type=float, default=300)
        if name == "purge":
            p.add_argument("dataset")
            p.add_argument("version")
    c = dsub.add_parser("clean-staging")
    c.add_argument("--grace-s", type=float, default=3600.0)


async def _api(settings: LiteSettings, method: str, path: str, body: Any = None) -> Any:
    return await call_user_api(settings, method, path, body, deadline_s=10)


async def _clean(settings: LiteSettings, state_url: str, grace_s: float) -> dict[str, Any]:
    import attrs

    from trace_lite.datasets import Datasets
    from trace_lite.dispatcher import open_pool
    from trace_lite.local_store import LocalObjectStore

    pool = await open_pool(state_url, min_size=1, max_size=2)
    try:
        store = LocalObjectStore(
            settings.object_root, settings.dispatcher_url, settings.object_secret
        )
        ds = Datasets(pool, object_store=store)
        promoted = 0
        while n := await ds.promote_once():
            promoted += n
        total = {"attempts": 0, "deleted_objects": 0, "skipped": 0}
        while True:
            report = attrs.asdict(await ds.clean_staging(grace_s=grace_s))
            for k in total:
                total[k] += report[k]
            if report["attempts"] == 0:
                break
        return {"promoted": promoted, **total}
    finally:
        await pool.close()


async def _add_member(state_url: str, org: str, subject: str, roles: list[str]) -> Any:
    from trace_lite.datasets import Datasets
    from trace_lite.dispatcher import open_pool

    pool = await open_pool(state_url, min_size=1, max_size=2)
    try:
        return await Datasets(pool).set_member(None, org, subject, roles)
    finally:
        await pool.close()


def cmd_users(settings: LiteSettings, args: argparse.Namespace, state_url: str) -> int:
    from trace_lite.users import LocalUserIssuer

    if args.users_cmd == "token":
        print(LocalUserIssuer.init(settings.key_dir).token(args.sub, ttl_s=args.ttl))
        return 0
    roles = [r for r in args.roles.split(",") if r]
    print(json.dumps(asyncio.run(_add_member(state_url, args.org, args.subject, roles))))
    return 0


def cmd_datasets(settings: LiteSettings, args: argparse.Namespace, state_url: str) -> int:
    from trace_core import errors

    base = f"/v1/orgs/{getattr(args, 'org', 'default')}"
    try:
        match args.datasets_cmd:
            case "clean-staging":
                out = asyncio.run(_clean(settings, state_url, args.grace_s))
            case "list":
                out = asyncio.run(_api(settings, "GET", f"{base}/datasets"))
            case "show":
                out = asyncio.run(_api(settings, "GET", f"{base}/datasets/{args.dataset}"))
            case "resolve":
                out = asyncio.run(
                    _api(
                        settings,
                        "POST",
                        f"{base}/datasets/resolve",
                        {"datasets": args.datasets, "pin_ttl_s": args.pin_ttl_s},
                    )
                )
            case "purge":
                out = asyncio.run(
                    _api(
                        settings,
                        "POST",
                        f"{base}/datasets/{args.dataset}/versions/{args.version}/purge",
                    )
                )
            case _:
                raise SystemExit(f"unknown command {args.datasets_cmd}")
    except errors.TraceError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0
