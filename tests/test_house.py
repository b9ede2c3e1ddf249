"""The house: imports inside worker/ point one way. A module that imports another which
(directly or through others) imports it back is a decision split across two rooms; every
import counts, at the top of a file or inside a function, since a late import hides a circle
rather than removing it. And the SQL lives in worker/db/: the command line, the console, the
reports and the demo call its functions, they do not build queries."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "worker"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from pkg import name`
                # on the package (or the module) itself.
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in modules else node.module)
            for target in targets:
                found = known(target) if target.startswith("worker") else None
                if found and found not in (name, "worker"):
                    graph[name].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_worker() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "worker.recon.runs" in graph["worker.tasks"]  # it reads them
    assert circles(graph) == []


def test_the_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Outside worker/db/ (and the domain that calls it), what may come from SQLAlchemy: its
# errors, the Session type a service takes, and make_url. Model classes stay importable: the
# services return them, and reading a returned row is not a query.
CALLERS = ("worker.cli", "worker.reports", "worker.web", "worker.demo")
ALLOWED_SQLALCHEMY = {
    "sqlalchemy.exc": None,  # any name
    "sqlalchemy.orm": {"Session"},
    "sqlalchemy.engine": {"make_url"},
}
QUERY_METHODS = {"execute", "scalar", "scalars", "query"}


def query_building(path: Path) -> list[str]:
    """What in this file builds or runs SQL itself: a query construct imported, a statement
    executed on a session."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            allowed = ALLOWED_SQLALCHEMY.get(node.module or "", set())
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if allowed is not None and a.name not in allowed
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in QUERY_METHODS
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
    return found


def test_sql_lives_in_db() -> None:
    callers = {
        name: path
        for path in PACKAGE.rglob("*.py")
        if (name := module_name(path)).startswith(CALLERS)
    }
    assert "worker.cli.balance_cmd" in callers and "worker.demo" in callers
    offenders = {name: found for name, path in callers.items() if (found := query_building(path))}
    assert offenders == {}


def test_the_sql_finder_finds_a_query(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from sqlalchemy import select\nfrom sqlalchemy.exc import SQLAlchemyError\n"
        "from sqlalchemy.orm import Session, aliased\nsession.execute(select(1))\n",
        encoding="utf-8",
    )
    assert query_building(sample) == [
        "sqlalchemy.select",
        "sqlalchemy.orm.aliased",
        "line 4: .execute(...)",
    ]
