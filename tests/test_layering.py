"""The package's floors (DESIGN.md): each imports only from floors below it, and no modules import each other in a
circle. Built from the source with `ast`, so a new upward import fails here before anyone has to find the knot."""

from __future__ import annotations

import ast
from pathlib import Path

import multihead_nb

PACKAGE = Path(multihead_nb.__file__).parent

# floor of each top-level part of the package; a module may import from its own floor and the floors below
FLOORS = {
    "errors": 0, "config": 0,
    "memory": 1, "testing": 1,
    "backends": 2,
    "engine": 3,
    "workspace": 4,
    "team": 5,
    "notebook": 6, "server": 6,
    "__init__": 7, "__main__": 7, "cli": 7,
}
# the only upward reaches, each a lazy import inside one method (DESIGN: "the only shortcuts that reach upward")
LAZY_UPWARD = {
    ("multihead_nb.workspace.workspace", "multihead_nb.team.team"),  # ws.team(...)
    ("multihead_nb.workspace.workspace", "multihead_nb.notebook.widgets.dashboard"),  # ws.dashboard()
    ("multihead_nb.workspace.workspace", "multihead_nb.server.app"),  # ws.serve(...)
    ("multihead_nb.team.run", "multihead_nb.notebook.widgets.figures"),  # run.plot()
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module, whether the import is inside a function) for every import of a package module, except
    those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool]] = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:  # `from . import x` imports the submodule x
                    sub = f"{target}.{alias.name}"
                    out.append((sub if sub in known else target, nested))
            elif isinstance(child, ast.Import):
                out.extend((a.name, nested) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return [(m, f) for m, f in out if m in known]


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_part_of_the_package_has_a_floor():
    unknown = {m.split(".")[1] for m in modules() if "." in m} - set(FLOORS)
    assert not unknown, f"top-level parts without a floor in FLOORS: {sorted(unknown)}"


def upward_imports(g: dict) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep, lazy in deps:
            if floor(dep) > floor(mod) and not (lazy and (mod, dep) in LAZY_UPWARD):
                bad.append(f"{mod} -> {dep}{' (in a function)' if lazy else ''}")
    return bad


def cycles(g: dict) -> list[list[str]]:
    # a package's __init__ re-exporting its children is not a cycle with them
    edges = {m: {d for d, _ in deps if d != m and not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    found = []

    def dfs(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m, [])
    return found


def test_no_floor_imports_a_higher_one():
    bad = upward_imports(graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_are_not_vacuous():
    """The real graph is seen (the engine's forward imports the backends' batch), and a planted upward import, a
    planted module-level copy of an allowed lazy one, and a planted cycle are caught."""
    g = graph()
    assert ("multihead_nb.backends.batch", False) in g["multihead_nb.engine.forward"]
    assert ("multihead_nb.team.team", True) in g["multihead_nb.workspace.workspace"]  # ws.team(), allowed
    planted = {**g, "multihead_nb.engine.engine": [*g["multihead_nb.engine.engine"], ("multihead_nb.team.run", False)]}
    assert upward_imports(planted) == ["multihead_nb.engine.engine -> multihead_nb.team.run"]
    eager = {**g, "multihead_nb.workspace.workspace": [("multihead_nb.team.team", False)]}
    assert upward_imports(eager) == ["multihead_nb.workspace.workspace -> multihead_nb.team.team"]
    loop = {**g, "multihead_nb.memory.arena": [*g["multihead_nb.memory.arena"], ("multihead_nb.memory.kv_layout", False)]}
    assert any("multihead_nb.memory.arena" in c for c in cycles(loop))
