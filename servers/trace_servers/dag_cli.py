"""``trace dag ...`` commands (mounted by ``trace_servers.cli``); offline, no server needed.

trace dag validate FILE [--json]    every problem of a DAG file, with its line, path and hint;
                                    exits 1 when there is any
trace dag diff OLD NEW [--json]     what changed between two DAG files, each change classified
                                    (materialization / execution / metadata), and the jobs a
                                    deploy would rebuild
trace dag schema                    print the JSON Schema of DAG files (for editors)

Operators are checked against the built-in ones (``trace_sdk.BUILTIN_OPERATORS``); dataset
names read with ``from: {dataset}`` and the one-producer rule are checked at deploy, against
the registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import attrs

from trace_core import errors
from trace_core.dag import Dag, OperatorInfo, Problem, affected_jobs, diff
from trace_lite import dag_files


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("dag", help="DAG files: validate, diff, schema")
    dsub = d.add_subparsers(dest="dag_cmd", required=True)
    v = dsub.add_parser("validate", help="check a DAG file; exit 1 listing every problem")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", help="print the problems as JSON")
    f = dsub.add_parser("diff", help="classify the changes between two DAG files")
    f.add_argument("old", type=Path)
    f.add_argument("new", type=Path)
    f.add_argument("--json", action="store_true", help="print the changes as JSON")
    dsub.add_parser("schema", help="print the JSON Schema of DAG files")


def builtin_operators() -> dict[str, OperatorInfo]:
    """The operators a worker runs out of the box, by name."""
    from trace_sdk import BUILTIN_OPERATORS

    return {
        name: OperatorInfo(name, (op.__doc__ or "").strip().split("\n")[0])
        for name, op in BUILTIN_OPERATORS.items()
    }


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


def cmd_dag(args: argparse.Namespace) -> int:
    match args.dag_cmd:
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
            old, new = _load(args.old, args.json), _load(args.new, args.json)
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
            width = max(len(c.path) for c in changes)
            for c in changes:
                print(
                    f"{c.kind.value:<16} {c.path:<{width}}  "
                    f"{json.dumps(c.old, default=str)} -> {json.dumps(c.new, default=str)}"
                )
            print(f"rebuild: {', '.join(rebuild) if rebuild else 'nothing'}")
            return 0
    raise SystemExit(f"unknown dag command {args.dag_cmd!r}")  # pragma: no cover
