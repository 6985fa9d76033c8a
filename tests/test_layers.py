"""The packages' layering: no import circle, and the bottom floor imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

from bridge.memory import InMemoryBroker
from server.compose import build_services
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "agents", "server", "scripts")


def import_graph() -> dict[str, set[str]]:
    """Each module of the packages, and the modules of the packages it imports
    (at any depth of its code, ``TYPE_CHECKING`` blocks and functions included)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.extend(alias.name for alias in node.names)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_the_bottom_floor_imports_nothing_above_it() -> None:
    graph = import_graph()
    upward = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith("bridge")
        for target in targets
        if not target.startswith("bridge")
    }
    assert upward == set()


def test_the_composition_root_wires_what_the_broker_reports_to_the_store(
    tmp_path: Path,
) -> None:
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'chat.db'}")
    services = build_services(settings)
    assert isinstance(services.broker, InMemoryBroker) and not services.broker.shared
    assert services.broker.on_run_lost == services.persistence.run_lost
    assert services.broker.stats().runs_in_memory == 0
