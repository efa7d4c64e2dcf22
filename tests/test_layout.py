"""The package layout keeps its promises: every module says its job and is on the README's module map,
no module imports in a cycle at import time, and none grows past about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "avatarl"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_time_edges(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports at module level (imports inside functions run later)."""
    edges = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("avatarl"):
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.startswith("avatarl")]
        else:
            continue
        edges.update(t for t in targets if t in known and t != name)
    return edges


def test_every_module_has_a_docstring_and_a_line_in_the_readme_map():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("<!-- modules:start -->"):readme.index("<!-- modules:end -->")]
    for path in modules().values():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring saying its job"
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.endswith("__init__.py") and relative != "__init__.py":
            continue  # a package's line names its modules
        if relative != "__init__.py":
            assert f"`{relative}`" in table, f"{relative} is missing from the README's module map"
    assert "`presets/`" in table


def test_no_import_cycle_and_no_long_module():
    found = modules()
    graph = {name: import_time_edges(name, path, set(found)) for name, path in found.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in found.values()}
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
