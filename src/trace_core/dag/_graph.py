"""Graph rules of a DAG: who consumes whom, cycles, downstream closure, topological order."""

from __future__ import annotations

from collections.abc import Iterable

from trace_core import errors
from trace_core.dag._records import Dag, JobRef


def consumers(dag: Dag) -> dict[str, set[str]]:
    """Job name -> the jobs of ``dag`` that read one of its outputs."""
    out: dict[str, set[str]] = {name: set() for name in dag.jobs}
    for job in dag.jobs.values():
        for inp in job.inputs:
            if isinstance(inp.source, JobRef) and inp.source.job in out:
                out[inp.source.job].add(job.name)
    return out


def cycles(dag: Dag) -> list[list[str]]:
    """Every cycle among ``dag``'s jobs, each as the jobs along it (first job repeated last),
    one per strongly connected component, in job order."""
    graph = consumers(dag)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    order = list(dag.jobs)
    found = []
    for comp in sorted(components, key=lambda c: min(order.index(j) for j in c)):
        start = min(comp, key=order.index)
        path, seen = [start], {start}
        while True:  # walk inside the component until a job repeats
            nxt = min(
                (w for w in graph[path[-1]] if w in comp), key=lambda w: (w in seen, order.index(w))
            )
            path.append(nxt)
            if nxt in seen:
                break
            seen.add(nxt)
        found.append(path[path.index(path[-1]) :])
    return found


def downstream(dag: Dag, jobs: Iterable[str]) -> set[str]:
    """``jobs`` (those in ``dag``) and every job that reads from them, transitively."""
    graph = consumers(dag)
    todo = [j for j in jobs if j in graph]
    seen = set(todo)
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def topological_order(dag: Dag) -> list[str]:
    """Job names, producers before consumers (ties in file order). Raises ``ValidationFailed``
    on a cycle."""
    graph = consumers(dag)
    indegree = {j: 0 for j in graph}
    for targets in graph.values():
        for t in targets:
            indegree[t] += 1
    ready = [j for j in dag.jobs if indegree[j] == 0]
    out: list[str] = []
    while ready:
        j = ready.pop(0)
        out.append(j)
        for t in sorted(graph[j], key=list(dag.jobs).index):
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    if len(out) != len(graph):
        raise errors.ValidationFailed("the DAG has a cycle", field="jobs")
    return out
