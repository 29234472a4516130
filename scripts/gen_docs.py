"""Regenerate the generated blocks in ``docs/`` from the kernel's transition tables.

A generated block sits between two markers::

    <!-- BEGIN GENERATED: name -->
    ...
    <!-- END GENERATED: name -->

and is rewritten from code; everything outside the markers is hand-written.

    python scripts/gen_docs.py           rewrite stale blocks in place
    python scripts/gen_docs.py --check   exit 1 and name the stale blocks (used by
                                         tests/unit/test_docs_current.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from trace_core import lifecycle, outbox

ROOT = Path(__file__).resolve().parent.parent


def lifecycle_diagram() -> str:
    return "```mermaid\n" + lifecycle.mermaid_diagram() + "\n```"


def lifecycle_table() -> str:
    rows = ["| state | event | target |", "|---|---|---|"]
    for (state, event), target in lifecycle.TRANSITIONS.items():
        if isinstance(target, tuple):
            shown = f"`{target[0].value}` if attempts are left, else `{target[1].value}`"
        else:
            shown = f"`{target.value}`"
        rows.append(f"| `{state.value}` | `{event.value}` | {shown} |")
    return "\n".join(rows)


def outbox_table() -> str:
    rows = ["| state | event | possible targets |", "|---|---|---|"]
    for (state, event), targets in outbox.TRANSITIONS.items():
        shown = ", ".join(f"`{t.value}`" for t in targets)
        rows.append(f"| `{state.value}` | `{event.value}` | {shown} |")
    return "\n".join(rows)


#: file (relative to the repository root) -> block name -> generator.
BLOCKS: dict[str, dict[str, Callable[[], str]]] = {
    "docs/architecture/task_lifecycle.md": {
        "lifecycle": lifecycle_diagram,
        "lifecycle-table": lifecycle_table,
        "outbox": outbox_table,
    },
}


def render(text: str, blocks: dict[str, Callable[[], str]], path: str) -> str:
    """``text`` with every named block replaced. Raises ``ValueError`` for a missing marker."""
    for name, make in blocks.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n).*?(<!-- END GENERATED: "
            rf"{re.escape(name)} -->)",
            re.DOTALL,
        )
        if not pattern.search(text):
            raise ValueError(f"{path}: markers for generated block {name!r} not found")
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale(root: Path = ROOT) -> list[str]:
    """Paths whose generated blocks differ from what the code generates now."""
    out = []
    for rel, blocks in BLOCKS.items():
        current = (root / rel).read_text()
        if render(current, blocks, rel) != current:
            out.append(rel)
    return out


def write(root: Path = ROOT) -> list[str]:
    """Rewrite stale files; returns their paths."""
    changed = stale(root)
    for rel in changed:
        path = root / rel
        path.write_text(render(path.read_text(), BLOCKS[rel], rel))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"stale generated docs: {rel} (run: python scripts/gen_docs.py)", file=sys.stderr)
        return 1 if bad else 0
    for rel in write():
        print(f"regenerated {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
