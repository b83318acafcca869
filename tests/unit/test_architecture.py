"""The import graph of agp's packages (agpctl, agp_models, agp_data, tuning), read with
``ast`` from the source files, imports inside functions included:

- no import cycle anywhere;
- no private name (``_name``) of agpctl imported from outside its wing — a wing is the first
  sub-package below agpctl (agpctl.cli, agpctl.training, agpctl.cluster, agpctl.inference ...)
  or, for a module directly in agpctl/, that module itself; tuning/, tests/ and benchmarks/
  import no private agpctl names at all;
- agp_models and agp_data never import agpctl, tuning or each other (docs/DESIGN.md);
- agpctl's wings import only to their right in ``cli -> training -> inference -> cluster ->
  root modules`` (docs/DESIGN.md, "agpctl/ in wings"); root modules import no wing.

The checks are plain functions, each also run on a small synthetic case, so a broken checker
cannot pass silently.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PACKAGES = ("agpctl", "agp_models", "agp_data", "tuning")
APP = "agpctl"
# Folders of code outside the packages that imports them (tuning/ is checked as a package).
OUTSIDE = ("tests", "benchmarks")
INDEPENDENT = {"agp_models": ("agpctl", "tuning", "agp_data"), "agp_data": ("agpctl", "tuning", "agp_models")}
# agpctl's wings, left to right: a wing may import itself, the wings to its right and the root
# modules (agpctl/*.py). Entry points (``__main__``) may import anything.
WING_ORDER = ("agpctl.cli", "agpctl.api", "agpctl.training", "agpctl.inference", "agpctl.cluster")


# -- reading the source ---------------------------------------------------------------------
@dataclass(frozen=True)
class SourceModule:
    name: str  # dotted module name; a package is the name of its __init__
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, resolved to absolute (may be unknown / third party)
    names: tuple[str, ...]  # ``from target import names``; () for ``import target``
    line: int


def package_modules(root: Path, packages=PACKAGES) -> dict[str, SourceModule]:
    """Every module of ``packages`` under ``root``. A package directory shadows a module file
    of the same name (``x/`` over ``x.py``), as it does for Python's import system."""
    found: dict[str, SourceModule] = {}
    for package in packages:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            if not is_package and (path.with_suffix("") / "__init__.py").exists():
                continue  # x.py next to x/__init__.py: never imported
            found[name] = SourceModule(name, path, is_package)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def imports_of(source: str, module: str, is_package: bool = False, filename: str = "<source>") -> list[Import]:
    """Every import statement of ``source`` (at any depth: functions, classes, ``if`` blocks),
    relative imports resolved against ``module``."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(module, _absolute(node, module, is_package), tuple(a.name for a in node.names),
                                node.lineno))
    return found


def known_target(name: str, modules) -> str | None:
    """The longest prefix of ``name`` that is a known module, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def edges_of(imp: Import, modules) -> set[str]:
    """Modules (of ``modules``) that the import statement ``imp`` loads: ``from pkg import x``
    is an edge to ``pkg.x`` when that is a module, else to ``pkg``."""
    targets: set[str] = set()
    for name in imp.names:
        submodule = f"{imp.target}.{name}"
        if name != "*" and submodule in modules:
            targets.add(submodule)
        else:
            target = known_target(imp.target, modules)
            if target:
                targets.add(target)
    if not imp.names:
        target = known_target(imp.target, modules)
        if target:
            targets.add(target)
    targets.discard(imp.module)
    return targets


def import_graph(modules: dict[str, SourceModule]) -> tuple[dict[str, set[str]], list[Import]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    statements: list[Import] = []
    for name, mod in modules.items():
        for imp in imports_of(mod.path.read_text(encoding="utf-8"), name, mod.is_package, str(mod.path)):
            statements.append(imp)
            graph[name] |= edges_of(imp, modules)
    return graph, statements


# -- the checks ---------------------------------------------------------------------------------
def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(root: str) -> None:  # iterative: no recursion limit on big graphs
        nonlocal counter
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, inside it)."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {component}")  # pragma: no cover


def chain(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def wing(module: str, packages: set[str]) -> str:
    """agpctl.training.worker -> agpctl.training (a sub-package); agpctl.config -> itself."""
    parts = module.split(".")
    if parts[0] != APP or len(parts) == 1:
        return module
    first = f"{APP}.{parts[1]}"
    return first if first in packages else module


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(imp: Import, modules: dict[str, SourceModule], importer_wing: str | None) -> list[str]:
    """Private agpctl names (or private agpctl modules) that ``imp`` reaches across a wing;
    ``importer_wing`` None: the importer is outside agpctl, where every one is a violation."""
    if imp.target.split(".")[0] != APP:
        return []
    packages = {n for n, m in modules.items() if m.is_package}
    violations = []
    path_private = [p for p in imp.target.split(".") if _private(p)]
    names = [n for n in imp.names if _private(n)] + [".".join(path_private)] * bool(path_private)
    for name in names:
        source = known_target(imp.target, modules) or imp.target
        if importer_wing is None or wing(source, packages) != importer_wing:
            violations.append(f"{imp.module}:{imp.line}: from {imp.target} import {name}")
    return violations


def wing_rank(module: str, packages: set[str]) -> int | None:
    """Position from the right in WING_ORDER (root modules 0); None for an unknown wing."""
    owner = wing(module, packages)
    if owner in WING_ORDER:
        return len(WING_ORDER) - WING_ORDER.index(owner)
    return 0 if owner not in packages or owner == APP else None


def wing_order_violations(graph: dict[str, set[str]], packages: set[str]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module.split(".")[0] != APP or module.rpartition(".")[2] == "__main__":
            continue
        rank = wing_rank(module, packages)
        for target in sorted(targets):
            if target.split(".")[0] != APP or wing(target, packages) == wing(module, packages):
                continue
            target_rank = wing_rank(target, packages)
            if rank is not None and target_rank is not None and target_rank > rank:
                found.append(f"{module} -> {target}")
    return found


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def modules() -> dict[str, SourceModule]:
    found = package_modules(REPO_ROOT)
    assert {m.split(".")[0] for m in found} == set(PACKAGES), f"packages not found under {REPO_ROOT}"
    return found


@pytest.fixture(scope="module")
def graph_and_imports(modules):
    return import_graph(modules)


def outside_imports() -> list[Import]:
    """Imports of the code outside the packages that may use agpctl's public API only."""
    found = []
    for folder in OUTSIDE:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            found.extend(imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", str(path)))
    return found


# -- the architecture -----------------------------------------------------------------------------
def test_the_graph_sees_imports_inside_functions(graph_and_imports):
    graph, statements = graph_and_imports
    assert sum(len(targets) for targets in graph.values()) > 20
    assert any(imp.module.startswith(APP) for imp in statements)


def test_no_import_cycles(graph_and_imports):
    graph, _ = graph_and_imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(chain(c) for c in cycles)


def test_no_private_agpctl_names_across_wings(modules, graph_and_imports):
    _, statements = graph_and_imports
    packages = {n for n, m in modules.items() if m.is_package}
    violations = []
    for imp in statements:
        top = imp.module.split(".")[0]
        importer_wing = wing(imp.module, packages) if top == APP else None
        violations += private_imports(imp, modules, importer_wing)
    for imp in outside_imports():
        violations += private_imports(imp, modules, None)
    assert not violations, "private agpctl names imported from outside their wing:\n" + "\n".join(sorted(set(violations)))


@pytest.mark.parametrize("package", sorted(INDEPENDENT))
def test_library_packages_import_neither_the_application_nor_each_other(package, graph_and_imports):
    _, statements = graph_and_imports
    forbidden = INDEPENDENT[package]
    found = [f"{imp.module}:{imp.line}: imports {imp.target}" for imp in statements
             if imp.module.split(".")[0] == package and imp.target.split(".")[0] in forbidden]
    assert not found, f"{package} must not import {', '.join(forbidden)}:\n" + "\n".join(found)


def test_every_agpctl_sub_package_is_a_known_wing(modules):
    wings = {n for n, m in modules.items() if m.is_package and n.count(".") == 1 and n.startswith(APP + ".")}
    assert wings <= set(WING_ORDER), f"give {sorted(wings - set(WING_ORDER))} a place in WING_ORDER (docs/DESIGN.md)"


def test_wings_import_only_to_their_right(modules, graph_and_imports):
    graph, _ = graph_and_imports
    packages = {n for n, m in modules.items() if m.is_package}
    found = wing_order_violations(graph, packages)
    assert not found, ("imports against the wing order " + " -> ".join(WING_ORDER) + " -> root modules:\n"
                       + "\n".join(found))


# -- the checker on synthetic cases (it must be able to fail) -----------------------------------------
def test_cycle_finder_finds_a_two_module_cycle():
    cycles = find_cycles({"a": {"b"}, "b": {"a"}})
    assert cycles == [["a", "b", "a"]]
    assert chain(cycles[0]) == "a -> b -> a"


def test_cycle_finder_finds_long_cycles_and_self_loops_and_passes_a_dag():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_resolver_reads_relative_and_function_level_imports():
    modules = {name: SourceModule(name, Path(name), is_package)
               for name, is_package in [("agpctl", True), ("agpctl.training", True), ("agpctl.training.worker", False),
                                        ("agpctl.training.steps", False), ("agpctl.config", False),
                                        ("agpctl.inference", True), ("agpctl.inference.export", False)]}
    source = (
        "from . import steps\n"
        "from ..config import RunConfig\n"
        "def f():\n"
        "    import agpctl.inference.export\n"
        "    from agpctl.inference import export_model\n"
        "    import numpy\n"
    )
    statements = imports_of(source, "agpctl.training.worker")
    edges = set().union(*(edges_of(imp, modules) for imp in statements))
    assert edges == {"agpctl.training.steps", "agpctl.config", "agpctl.inference.export", "agpctl.inference"}
    package_relative = imports_of("from .worker import x\n", "agpctl.training", is_package=True)
    assert package_relative[0].target == "agpctl.training.worker"


def test_private_rule_knows_wings():
    modules = {name: SourceModule(name, Path(name), is_package)
               for name, is_package in [("agpctl", True), ("agpctl.training", True), ("agpctl.training.steps", False),
                                        ("agpctl.training.worker", False), ("agpctl.config", False),
                                        ("agpctl.cli", True), ("agpctl.cli.main", False)]}
    packages = {n for n, m in modules.items() if m.is_package}
    assert wing("agpctl.training.worker", packages) == "agpctl.training"
    assert wing("agpctl.config", packages) == "agpctl.config"
    within = Import("agpctl.training.worker", "agpctl.training.steps", ("_helper",), 1)
    across = Import("agpctl.cli.main", "agpctl.training.steps", ("_helper", "Trainer"), 1)
    root = Import("agpctl.training.worker", "agpctl.config", ("_build",), 1)
    assert private_imports(within, modules, wing(within.module, packages)) == []
    assert private_imports(across, modules, wing(across.module, packages)) == [
        "agpctl.cli.main:1: from agpctl.training.steps import _helper"]
    assert len(private_imports(root, modules, wing(root.module, packages))) == 1
    assert len(private_imports(Import("tests.x", "agpctl.config", ("_build",), 1), modules, None)) == 1
    assert private_imports(Import("tests.x", "agpctl.config", ("__version__", "RunConfig"), 1), modules, None) == []


def test_wing_order_rule_flags_leftward_and_root_to_wing_imports():
    packages = {"agpctl", "agpctl.cli", "agpctl.training", "agpctl.inference", "agpctl.cluster"}
    graph = {
        "agpctl.cli.train": {"agpctl.training.launch", "agpctl.config"},  # rightward: fine
        "agpctl.training.worker": {"agpctl.inference.scoring", "agpctl.training.steps"},  # fine
        "agpctl.inference.scoring": {"agpctl.training.steps"},  # leftward
        "agpctl.runs": {"agpctl.cluster.connect"},  # a root module into a wing
        "agpctl.__main__": {"agpctl.cli"},  # an entry point: fine
    }
    assert wing_order_violations(graph, packages) == ["agpctl.inference.scoring -> agpctl.training.steps",
                                                      "agpctl.runs -> agpctl.cluster.connect"]
