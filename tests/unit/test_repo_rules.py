"""Repository rules, checked on the source tree itself.

* No import cycle among the modules of ``src/`` and ``servers/`` -- imports inside functions
  and under ``if TYPE_CHECKING:`` count as edges: moving an import into a function hides a cycle
  from Python, not from the design.
* Rows are read by name: no ``row[0]`` / ``r[3]`` / ``rows[i][j]`` / ``(await cur.fetchone())[0]``.
* Every source path the docs cite (``src/...``, ``servers/...``, ``tests/...``, ``scripts/...``,
  ``bench/...``, ``docs/...``, ``requirements/...`` in backticks, code blocks or links) exists.
* No code or doc cites "BRIEF" (the defaults are rows of ``docs/standards/operations.md``).
* The lock file pins every dependency ``pyproject.toml`` declares, at a version it allows.

Each rule has a test that feeds it a small bad example, so none of them passes by being blind.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CODE_ROOTS = ("src", "servers")

# --- import graph --------------------------------------------------------------------------


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``dotted.module.name -> file`` for every module under ``src/`` and ``servers/``."""
    out: dict[str, Path] = {}
    for base in CODE_ROOTS:
        for path in sorted((root / base).rglob("*.py")):
            parts = list(path.relative_to(root / base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or its closest enclosing known package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every known module ``module`` imports, wherever the import statement sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(t for a in node.names if (t := _known(a.name, modules)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _known(base, modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "; ".join(edges)


# Cycles that may remain while a module split is in progress; delete an entry when its cycle
# is gone, never add one. (The Dispatcher/datasets cycles of issue #7 are gone: empty.)
KNOWN_CYCLES: list[frozenset[str]] = []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the module scan found too few modules to be looking at the tree"
    new = [c for c in cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(describe(c, graph) for c in new)


def test_cycle_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "servers").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert describe(["pkg.a", "pkg.b", "pkg.c"], graph) == (
        "pkg.a -> pkg.b; pkg.b -> pkg.c; pkg.c -> pkg.a"
    )


# --- rows by name --------------------------------------------------------------------------

ROWISH = re.compile(r"^(r|row|rec|record|\w+_row)$")
ROWSISH = re.compile(r"^(rows|\w+_rows)$")
FETCH = {"fetchone", "fetchall", "fetchmany"}


def _int_index(node: ast.Subscript) -> bool:
    s = node.slice
    if isinstance(s, ast.UnaryOp) and isinstance(s.op, ast.USub):
        s = s.operand
    return isinstance(s, ast.Constant) and type(s.value) is int


def positional_row_reads(source: str) -> list[int]:
    """Lines that read a database row's column by position."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Subscript) or not _int_index(node):
            continue
        value = node.value
        while isinstance(value, ast.Await):
            value = value.value
        if (
            (isinstance(value, ast.Name) and ROWISH.match(value.id))
            or (
                isinstance(value, ast.Subscript)
                and isinstance(value.value, ast.Name)
                and ROWSISH.match(value.value.id)
            )
            or (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and value.func.attr in FETCH
            )
        ):
            lines.append(node.lineno)
    return sorted(lines)


def code_files() -> Iterator[Path]:
    for base in CODE_ROOTS:
        yield from sorted((ROOT / base).rglob("*.py"))


# Files that still read rows by position, with the most reads each may keep. Empty: every
# module reads rows by name (row classes) or unpacks single-column results (``(value,) = row``).
# Never add an entry.
POSITIONAL_ROWS_PENDING: dict[str, int] = {}


def test_rows_are_read_by_name() -> None:
    problems = []
    for path in code_files():
        rel = path.relative_to(ROOT).as_posix()
        lines = positional_row_reads(path.read_text())
        allowed = POSITIONAL_ROWS_PENDING.get(rel, 0)
        if len(lines) > allowed:
            problems.append(f"{rel}: {len(lines)} positional row reads (allowed {allowed}) {lines}")
    assert not problems, "read rows by name (row classes), not by position:\n" + "\n".join(problems)


def test_row_rule_flags_positional_reads() -> None:
    bad = (
        "async def f(cur, rows, task_row):\n"
        "    row = await cur.fetchone()\n"
        "    a = row[0]\n"
        "    b = [r[3] for r in rows]\n"
        "    c = rows[0][-1]\n"
        "    d = (await cur.fetchone())[0]\n"
        "    e = task_row[2]\n"
    )
    assert positional_row_reads(bad) == [3, 4, 5, 6, 7]
    good = "def f(row, rows, parts):\n    return row.task_id, rows[0], parts[1], row['x']\n"
    assert positional_row_reads(good) == []


# --- paths the docs cite -------------------------------------------------------------------

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CITED = re.compile(
    r"(?<![\w./<>-])((?:src|servers|tests|scripts|bench|docs|requirements)/[\w./*-]*)"
)
CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)")


def cited_paths(text: str) -> Iterator[str]:
    """Repository paths in code spans, code blocks and relative links of a Markdown text."""
    for span in CODE_SPAN.findall(text):
        for token in CITED.findall(span):
            yield re.split(r"::|:\d", token.rstrip(".,:;)"))[0]
    for link in LINK.findall(text):
        if "://" not in link and not link.startswith("mailto:"):
            yield "./" + link


def missing_paths(doc: Path, root: Path = ROOT) -> list[str]:
    missing = []
    for cited in cited_paths(doc.read_text()):
        if cited.startswith("./"):
            ok = (doc.parent / cited).exists()
        elif "*" in cited:
            ok = any(root.glob(cited))
        else:
            ok = (root / cited).exists()
        if not ok:
            missing.append(cited.removeprefix("./"))
    return missing


def test_docs_cite_only_paths_that_exist() -> None:
    cited = sum(len(list(cited_paths(d.read_text()))) for d in DOC_FILES)
    assert cited > 50, "the path scan found too few citations to be reading the docs"
    problems = [f"{d.relative_to(ROOT)}: {p}" for d in DOC_FILES for p in missing_paths(d)]
    assert not problems, "docs cite paths that do not exist:\n" + "\n".join(problems)


def test_path_rule_flags_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "here.py").write_text("")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "`src/here.py` and `src/gone.py`, `pytest tests/none/test_x.py::test_y`,\n"
        "```\nsrc/here.py  the module\nsrc/also_gone.py\n```\n"
        "[ok](src/here.py) [bad](src/nope.py) [web](https://example.org/src/x.py)\n"
    )
    assert missing_paths(doc, tmp_path) == [
        "src/gone.py",
        "tests/none/test_x.py",
        "src/also_gone.py",
        "src/nope.py",
    ]


# --- no "BRIEF" citations ------------------------------------------------------------------

BRIEF = re.compile(r"\bBRIEF\b")


def _text_files() -> Iterable[Path]:
    for base in ("src", "servers", "tests", "bench", "scripts", "docs"):
        for path in sorted((ROOT / base).rglob("*")):
            if path.suffix in {".py", ".md", ".sql", ".sh", ".yaml", ".toml", ".json"}:
                yield path
    yield ROOT / "README.md"


def test_no_brief_citations() -> None:
    this = Path(__file__).resolve()
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _text_files()
        if path.resolve() != this
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if BRIEF.search(line)
    ]
    assert not found, "cite docs/standards/operations.md rows, not BRIEF:\n" + "\n".join(found)


# --- the lock file -------------------------------------------------------------------------

LOCK = ROOT / "requirements" / "dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    own = canonicalize_name(project["name"])
    return [r for r in reqs if canonicalize_name(r.name) != own]


def test_lock_pins_every_declared_dependency() -> None:
    pins: dict[str, list[Version]] = {}
    for name, version in PIN.findall(LOCK.read_text()):
        pins.setdefault(canonicalize_name(name), []).append(Version(version))
    problems = []
    for req in declared_requirements():
        versions = pins.get(canonicalize_name(req.name), [])
        if not any(req.specifier.contains(v, prereleases=True) for v in versions):
            problems.append(f"{req} (lock has {[str(v) for v in versions] or 'nothing'})")
    assert not problems, (
        "requirements/dev.lock is out of date with pyproject.toml; run `bash scripts/lock`:\n"
        + "\n".join(problems)
    )
    assert {"pgqueuer", "procrastinate", "hatchling"} <= pins.keys()
