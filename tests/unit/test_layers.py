"""Guards the package layers ("Layers you can see"): imports point down only.

    operator tools (cluster.cli, launcher, monitor, bench/, ...)
        -> roles (learner, actors, cache, replay)
            -> ground (cluster.config, wire, keys, errors, ...)

Rules: the ground imports no role and no operator tool; a role never imports an operator
tool; `learner` never imports `actors`; no import cycle between files, nor between packages
(the ground, the operator tools and each role package count as one package each).

The source is read with `ast` only, nothing from the project is imported. Every project
import counts as an edge: top-level, function-local and `if TYPE_CHECKING:` ones alike (the
latter two are noted in failure messages, since they are the cheapest to move).

The code does not follow every rule yet, so this is a ratchet: `KNOWN` lists today's
violations. A violation not in `KNOWN` fails, and so does an entry of `KNOWN` that no longer
occurs, so the list can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE_PACKAGES = ("learner", "actors", "cache", "replay")
PACKAGES = ("cluster", *ROLE_PACKAGES)

# The ground floor: what every role may use. `cluster` itself (its __init__ holds only
# `__version__`) belongs here too, since importing any cluster module runs it.
GROUND = frozenset(
    {
        "cluster",
        "cluster.config",
        "cluster.config_checks",
        "cluster.wire",
        "cluster.keys",
        "cluster.errors",
        "cluster.version",
        "cluster.curve",
        "cluster.telemetry",
        "cluster.redisconn",
        "cluster.lifecycle",
        "cluster.acl",
        "cluster.ports",
    }
)

GROUND_LAYER, ROLE_LAYER, TOOLS_LAYER = "ground", "role", "tools"

MOVE_DOWN = "move the shared piece down to the ground (a cluster module in GROUND) and import it from there"
FIX = {
    "ground imports a role": MOVE_DOWN,
    "ground imports an operator tool": MOVE_DOWN,
    "role imports an operator tool": MOVE_DOWN,
    "learner imports actors": "move the shared piece down to the ground, where both can import it",
    "file cycle": "break the cycle: move what both files need into a lower module both import",
    "package cycle": "make the arrows point one way: move the shared piece down to the ground",
}

# Today's violations. This set must only shrink: fix one, then remove its line here.
# The goal of the issue "Layers you can see" is an empty set.
KNOWN: frozenset[str] = frozenset(
    {
        # learner imports actors (9)
        "learner.algorithms -> actors.envs (learner imports actors)",
        "learner.algorithms.dqn -> actors.envs (learner imports actors)",
        "learner.algorithms.td3 -> actors.envs (learner imports actors)",
        "learner.export -> actors.envs (learner imports actors)",
        "learner.export -> actors.evaluator (learner imports actors)",
        "learner.export -> actors.explore (learner imports actors)",
        "learner.export -> actors.policy (learner imports actors)",
        "learner.obsnorm -> actors.envs (learner imports actors)",
        "learner.role -> actors.envs (learner imports actors)",
        # role imports an operator tool (3)
        "learner.export -> cluster.progress (role imports an operator tool)",
        "learner.export -> cluster.status (role imports an operator tool)",
        "learner.role -> cluster.hostplan (role imports an operator tool)",
        # file cycles (3)
        "cycle: cache.blob, cache.ledger",
        "cycle: learner.algorithms.dqn, learner.population",
        "cycle: learner.lead, learner.role",
        # package cycles (1): the learner -> tools imports above, against cli/monitor/report/bench -> learner
        "package cycle: cluster(tools), learner",
    }
)


@dataclass(frozen=True)
class Import:
    """One import statement of a project module, as found in the source."""

    src: str
    dst: str
    path: str
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`
    local: bool  # inside a function body

    def where(self) -> str:
        notes = [n for n, on in (("TYPE_CHECKING", self.type_checking), ("function-local", self.local)) if on]
        return f"{self.path}:{self.line}" + (f" ({', '.join(notes)})" if notes else "")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "tests" not in path.relative_to(ROOT).parts:
                files[module_name(path)] = path
    return files


def _resolve(name: str, known: Mapping[str, object]) -> str | None:
    """The most specific project module that `name` (a dotted import target) refers to."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    body: Iterable[ast.AST], type_checking: bool = False, local: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import under `body`, with whether it sits under TYPE_CHECKING or in a function."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_checking, local
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.body, True, local)
            yield from _import_nodes(node.orelse, type_checking, local)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_nodes(ast.iter_child_nodes(node), type_checking, True)
        else:
            yield from _import_nodes(ast.iter_child_nodes(node), type_checking, local)


def collect_imports(files: Mapping[str, Path]) -> list[Import]:
    found: list[Import] = []
    for src, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, type_checking, local in _import_nodes(tree.body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = src.split(".") if is_package else src.split(".")[:-1]
                    anchor = package[: len(package) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from a import b` imports module a.b when there is one, else a name from a
                targets = [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]
            rel = path.relative_to(ROOT).as_posix()
            resolved = {_resolve(t, files) for t in targets if t.split(".")[0] in PACKAGES}
            for dst in sorted(d for d in resolved if d is not None and d != src):
                found.append(Import(src, dst, rel, node.lineno, type_checking, local))
    return found


def layer_of(module: str) -> str:
    if module in GROUND:
        return GROUND_LAYER
    if module.split(".")[0] in ROLE_PACKAGES:
        return ROLE_LAYER
    return TOOLS_LAYER


def package_of(module: str) -> str:
    """The package-level unit: each role package, and the two halves of `cluster`."""
    top = module.split(".")[0]
    if top in ROLE_PACKAGES:
        return top
    return "cluster(ground)" if module in GROUND else "cluster(tools)"


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, each sorted."""
    nodes = sorted(set(graph) | {d for ds in graph.values() for d in ds})
    succ = {n: sorted(set(graph.get(n, ()))) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    work: list[tuple[str, Iterator[str]]] = []  # iterative DFS: (node, its successors left)

    def enter(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(succ[node])))

    for root in nodes:
        if root in index:
            continue
        enter(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                enter(child)
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def edge_rule(src: str, dst: str) -> str | None:
    """The layer rule the import src -> dst breaks, if any."""
    src_layer, dst_layer = layer_of(src), layer_of(dst)
    if src_layer == GROUND_LAYER and dst_layer == ROLE_LAYER:
        return "ground imports a role"
    if src_layer == GROUND_LAYER and dst_layer == TOOLS_LAYER:
        return "ground imports an operator tool"
    if src_layer == ROLE_LAYER and dst_layer == TOOLS_LAYER:
        return "role imports an operator tool"
    if src.split(".")[0] == "learner" and dst.split(".")[0] == "actors":
        return "learner imports actors"
    return None


class Finding(NamedTuple):
    rule: str
    edges: tuple[tuple[str, str], ...] = ()  # the imports behind it (a cycle: the ones inside it)


def check(graph: Mapping[str, Iterable[str]]) -> dict[str, Finding]:
    """Every violation in a module graph (module -> modules it imports), by its KNOWN string."""
    found: dict[str, Finding] = {}
    for src in sorted(graph):
        for dst in sorted(set(graph[src])):
            rule = edge_rule(src, dst)
            if rule is not None:
                found[f"{src} -> {dst} ({rule})"] = Finding(rule, ((src, dst),))
    for component in strongly_connected(graph):
        inside = tuple((s, d) for s in component for d in sorted(set(graph.get(s, ()))) if d in component)
        found[f"cycle: {', '.join(component)}"] = Finding("file cycle", inside)
    packages: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        for dst in dsts:
            if package_of(src) != package_of(dst):
                packages.setdefault(package_of(src), set()).add(package_of(dst))
    for component in strongly_connected(packages):
        found[f"package cycle: {', '.join(component)}"] = Finding("package cycle")
    return found


def ratchet(
    found: Mapping[str, Finding], known: Iterable[str], where: Callable[[str, str], list[str]] | None = None
) -> list[str]:
    """One line per new violation and per KNOWN entry that no longer occurs.

    `where(src, dst)` names the import statements behind an edge (shown after the line).
    """
    known = set(known)
    lines = []
    for violation in sorted(set(found) - known):
        rule, edges = found[violation]
        line = f"new: {violation}: breaks '{rule}'; fix: {FIX[rule]}"
        if edges and where is not None:
            line += " [" + "; ".join(site for edge in edges for site in where(*edge)) + "]"
        lines.append(line)
    lines += [f"fixed: {v!r} no longer occurs, remove it from KNOWN" for v in sorted(known - set(found))]
    return lines


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports(source_files())


def _graph(imports: Iterable[Import], files: Iterable[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in files}
    for imp in imports:
        graph[imp.src].add(imp.dst)
    return graph


def test_ground_modules_exist() -> None:
    files = source_files()
    assert not sorted(GROUND - set(files)), "GROUND names a module that is gone"


def test_layers_ratchet(imports: list[Import]) -> None:
    files = source_files()
    sites: dict[tuple[str, str], list[str]] = {}
    for imp in imports:
        sites.setdefault((imp.src, imp.dst), []).append(imp.where())
    problems = ratchet(check(_graph(imports, files)), KNOWN, lambda src, dst: sites[src, dst])
    if problems:
        pytest.fail("layer rules (tests/unit/test_layers.py):\n" + "\n".join(problems), pytrace=False)


def test_collects_local_and_type_checking_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import cluster.wire\n"
        "if TYPE_CHECKING:\n"
        "    from cluster.keys import Keys\n"
        "def f():\n"
        "    from cluster import acl\n"
    )
    facts = [(type(n).__name__, n.lineno, tc, local) for n, tc, local in _import_nodes(tree.body)]
    assert facts == [
        ("ImportFrom", 1, False, False),
        ("Import", 2, False, False),
        ("ImportFrom", 4, True, False),
        ("ImportFrom", 6, False, True),
    ]


def test_ratchet_catches_upward_import_and_cycle() -> None:
    graph = {
        "cluster.wire": {"cluster.errors"},
        "cluster.errors": set(),
        "cluster.keys": {"learner.role"},  # upward: ground -> role
        "learner.role": {"cluster.wire", "learner.a"},
        "learner.a": {"learner.b"},
        "learner.b": {"learner.a"},  # file cycle a -> b -> a
    }
    found = check(graph)
    assert "cluster.keys -> learner.role (ground imports a role)" in found
    assert "cycle: learner.a, learner.b" in found
    assert "package cycle: cluster(ground), learner" in found
    problems = ratchet(found, {"cycle: learner.a, learner.b", "cluster.cli -> learner.gone (x)"})
    assert any(p.startswith("new: cluster.keys -> learner.role") and MOVE_DOWN in p for p in problems)
    assert "fixed: 'cluster.cli -> learner.gone (x)' no longer occurs, remove it from KNOWN" in problems
    assert not any("new: cycle: learner.a, learner.b" in p for p in problems)


def test_clean_graph_passes() -> None:
    graph: dict[str, set[str]] = {
        "cluster.cli": {"learner.role", "cluster.config"},
        "learner.role": {"cluster.config", "replay.client"},
        "replay.client": {"cluster.wire"},
        "cluster.config": {"cluster.errors"},
    }
    assert check(graph) == {}
    assert ratchet(check(graph), set()) == []


def test_longer_cycle_and_each_rule() -> None:
    graph = {
        "actors.a": {"actors.b"},
        "actors.b": {"actors.c"},
        "actors.c": {"actors.a"},
        "learner.x": {"actors.a"},
        "replay.y": {"cluster.monitor"},
        "cluster.wire": {"cluster.cli"},
    }
    assert {finding.rule for finding in check(graph).values()} == {
        "file cycle",
        "learner imports actors",
        "role imports an operator tool",
        "ground imports an operator tool",
    }
    assert "cycle: actors.a, actors.b, actors.c" in check(graph)
