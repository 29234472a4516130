"""DAG files on disk: YAML in, ``trace_core.dag`` problems (with line numbers) out.

The YAML is read with PyYAML's safe loader (plain data only: no tags that build objects). A
key written twice in one mapping is refused (YAML itself would silently keep the last one),
reported like any other problem. Each problem gets the 1-based line of the value its path
names, or of the closest enclosing value the file has (a missing key points at its mapping).

The JSON Schema of the file format (``json_schema()``) ships in the package, for editors;
``trace_core.dag.validate`` is the authority (the schema cannot express cross-references,
cycles or the registry rules).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import yaml

from trace_core import errors
from trace_core.dag import (
    MAX_PATH,
    Dag,
    DatasetFacts,
    OperatorInfo,
    Problem,
    cap_problems,
    parse,
    validate,
)

#: The biggest DAG file read.
MAX_FILE_BYTES = 1024 * 1024
#: The most values (mappings, lists, scalars) a file may expand to, aliases counted per use.
MAX_VALUES = 100_000
_LAST_SEGMENT = re.compile(r"(\.[^.\[\]]*|\[[0-9]+\])$")


@attrs.frozen
class Loaded:
    """A DAG file as loaded: the plain document (None when unreadable), the problems of
    loading it, and the line of each path."""

    doc: object
    problems: tuple[Problem, ...]
    lines: Mapping[str, int]

    def line_of(self, path: str) -> int | None:
        """The line of ``path``, or of its closest enclosing path the file has."""
        while True:
            if path in self.lines:
                return self.lines[path]
            shorter = _LAST_SEGMENT.sub("", path)
            if shorter == path or not shorter:
                return self.lines.get("")
            path = shorter


class _TooLarge(Exception):
    """The document expands to more than ``MAX_VALUES`` values (YAML aliases)."""


def _key(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "?"


def _walk(
    node: yaml.Node, path: str, lines: dict[str, int], dups: list[Problem], budget: list[int]
) -> None:
    """Record the line of every path under ``node`` and every repeated key. A repeated key is
    reported at each repetition; the lines under it come from its last value (the one YAML
    keeps). Aliases are walked where they are used, each use counted against ``budget``."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        last = {_key(k): i for i, (k, _) in enumerate(node.value)}
        seen: set[str] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = _key(key_node)
            child = f"{path}.{key}" if path else key
            if key == "<<":  # a merge key: its mapping's keys land in this one
                _walk(value_node, path, lines, dups, budget)
                continue
            if key in seen:
                dups.append(
                    Problem(
                        child if len(child) <= MAX_PATH else child[: MAX_PATH - 3] + "...",
                        f"key {key[:60]!r} appears twice in this mapping",
                        "keep one: YAML would silently use the last",
                        line=key_node.start_mark.line + 1,
                    )
                )
            seen.add(key)
            if i == last[key]:
                lines[child] = key_node.start_mark.line + 1
                _walk(value_node, child, lines, dups, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", lines, dups, budget)


def load_text(text: str) -> Loaded:
    """Parse YAML ``text`` into a plain document. Never raises: syntax errors, duplicate keys
    and oversized input come back as problems (and ``doc`` None on a syntax error)."""
    if len(text.encode()) > MAX_FILE_BYTES:
        return Loaded(None, (Problem("", f"a DAG file is at most {MAX_FILE_BYTES} bytes"),), {})
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        dups: list[Problem] = []
        if node is not None:
            _walk(node, "", lines, dups, [MAX_VALUES])
        doc = loader.construct_document(node) if node is not None else None
    except _TooLarge:
        return Loaded(
            None,
            (Problem("", f"the file expands to more than {MAX_VALUES} values (YAML aliases?)"),),
            {},
        )
    except RecursionError:
        return Loaded(None, (Problem("", "the file nests too deeply"),), {})
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return Loaded(
            None,
            (
                Problem(
                    "",
                    f"not valid YAML: {exc.problem or exc.context}",
                    line=mark.line + 1 if mark else None,
                ),
            ),
            {},
        )
    except yaml.YAMLError as exc:
        return Loaded(None, (Problem("", f"not valid YAML: {exc}"),), {})
    finally:
        loader.dispose()
    return Loaded(doc, tuple(dups), lines)


def check_text(
    text: str,
    *,
    operators: Mapping[str, OperatorInfo] | None = None,
    datasets: Mapping[str, DatasetFacts] | None = None,
) -> list[Problem]:
    """Every problem of the DAG file ``text`` (loading and ``trace_core.dag.validate``), each
    with its line; empty when the file is valid. Never raises."""
    loaded = load_text(text)
    if loaded.doc is None and loaded.problems:
        return list(loaded.problems)
    found = list(loaded.problems) + validate(loaded.doc, operators=operators, datasets=datasets)
    return cap_problems(
        [p if p.line else attrs.evolve(p, line=loaded.line_of(p.path)) for p in found]
    )


def read_text(path: Path) -> str:
    """A DAG file's text. Raises ``ValidationFailed`` (``field="file"``) when it cannot be read
    as UTF-8 text of at most ``MAX_FILE_BYTES``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.ValidationFailed(f"cannot read {path}: {exc.strerror}", field="file") from exc
    if len(data) > MAX_FILE_BYTES:
        raise errors.ValidationFailed(
            f"{path}: a DAG file is at most {MAX_FILE_BYTES} bytes", field="file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.ValidationFailed(f"{path} is not UTF-8 text", field="file") from exc


def check_file(
    path: Path,
    *,
    operators: Mapping[str, OperatorInfo] | None = None,
    datasets: Mapping[str, DatasetFacts] | None = None,
) -> list[Problem]:
    """``check_text`` of a file. Raises ``ValidationFailed`` when it cannot be read."""
    return check_text(read_text(path), operators=operators, datasets=datasets)


def load_dag(path: Path) -> Dag:
    """The ``Dag`` of a structurally valid file. Raises ``ValidationFailed`` (duplicate keys,
    YAML errors and structural problems; the first one's path is ``field``)."""
    loaded = load_text(read_text(path))
    if loaded.problems:
        first = loaded.problems[0]
        raise errors.ValidationFailed(
            f"{path}: {first.path or '<top>'}: {first.message}", field=first.path
        )
    return parse(loaded.doc)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of DAG files shipped in the package (``trace_core/schemas``)."""
    text = resources.files("trace_core").joinpath("schemas", "dag.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


__all__ = [
    "MAX_FILE_BYTES",
    "MAX_VALUES",
    "Loaded",
    "check_file",
    "check_text",
    "json_schema",
    "load_dag",
    "load_text",
    "read_text",
]
