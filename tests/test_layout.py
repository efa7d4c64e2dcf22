"""The package layout keeps its promises: every module says its job and is on the README's module map,
no module imports in a cycle at import time (a package's __init__ counts: it runs before the submodule
imported from it), the maths and the model import nothing of runs (not even inside a function), and
none grows past about 400 lines."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO

MAX_LINES = 400
# The README, under the module map: "Nothing imports upward: `algorithms/` and `model.py` know nothing of
# runs". Below: the modules (or packages) that form runs, from the objectives up to the commands.
MATHS = ("avatarl.algorithms", "avatarl.model")
RUN_LEVEL = ("avatarl.objectives", "avatarl.trainer", "avatarl.run", "avatarl.periodic", "avatarl.resume",
             "avatarl.checkpoint", "avatarl.run_dir", "avatarl.tracking", "avatarl.progress",
             "avatarl.report", "avatarl.cli", "avatarl.__main__", "avatarl.bench", "avatarl.launchers")


def modules(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package under `root`."""
    found = {}
    for path in sorted((root / "avatarl").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def within(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one of those packages."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def packages_above(name: str) -> list[str]:
    """The packages Python initialises before it runs module `name`: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


@dataclass
class Imports:
    """The package modules one module's imports run: when it is imported, and later (inside a function,
    or only for type checkers)."""

    now: set[str] = field(default_factory=set)
    later: set[str] = field(default_factory=set)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_imports(name: str, path: Path, known: set[str]) -> Imports:
    """What each import of `path` runs among the `known` modules: the module it names and every package
    above it (their __init__ runs first), except the packages above `name`, which are already running.
    `from p import x` names p.x when that is a module, else p (x is a name p defines)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    running = {name, *packages_above(name)}
    found = Imports()

    def add(named: list[str], deferred: bool) -> None:
        runs = {module for module in named if module != name}
        runs |= {above for module in named for above in packages_above(module) if above not in running}
        (found.later if deferred else found.now).update(runs & known)

    def walk(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, ast.Import):
            add([alias.name for alias in node.names], deferred)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package p.q is p.q.x
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            add([f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names],
                deferred)
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                walk(child, True)
            for child in node.orelse:
                walk(child, deferred)
        else:
            inside_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                walk(child, deferred or inside_function)

    walk(ast.parse(path.read_text()), False)
    return found


def import_graph(found: dict[str, Path]) -> dict[str, Imports]:
    return {name: read_imports(name, path, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        trail.pop()
        state[node] = "done"
        return None

    for name in sorted(edges):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def loaded_by(edges: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """{module: the import chain from `start` to it} for every module that importing `start` loads."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(edges[node] - set(chains)):
            chains[nxt] = [*chains[node], nxt]
            todo.append(nxt)
    del chains[start]
    return chains


def upward_imports(graph: dict[str, Imports]) -> list[str]:
    """Where the maths or the model reaches a run-level module: an import anywhere in the file (even in
    a function), or a module that importing it loads."""
    now = {name: imports.now for name, imports in graph.items()}
    problems = []
    for name in sorted(graph):
        if within(name, MATHS):
            problems += [f"{name} imports {target}" for target in sorted(graph[name].now | graph[name].later)
                         if within(target, RUN_LEVEL)]
            problems += [f"importing {name} loads {target}: " + " -> ".join(chain)
                         for target, chain in sorted(loaded_by(now, name).items())
                         if within(target, RUN_LEVEL) and target not in graph[name].now]
    return problems


def test_every_module_has_a_docstring_and_a_line_in_the_readme_map():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("<!-- modules:start -->"):readme.index("<!-- modules:end -->")]
    package = REPO / "avatarl"
    for path in modules().values():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring saying its job"
        relative = path.relative_to(package).as_posix()
        if relative.endswith("__init__.py") and relative != "__init__.py":
            continue  # a package's line names its modules
        if relative != "__init__.py":
            assert f"`{relative}`" in table, f"{relative} is missing from the README's module map"
    assert "`presets/`" in table


def test_no_import_cycle_and_no_long_module():
    found = modules()
    cycle = find_cycle({name: imports.now for name, imports in import_graph(found).items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in found.values()}
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_maths_and_the_model_import_nothing_of_runs():
    found = modules()
    for prefix in (*MATHS, *RUN_LEVEL):  # a renamed module must not leave the rule checking nothing
        assert any(within(name, [prefix]) for name in found), f"{prefix} names no module: update the rule"
    assert upward_imports(import_graph(found)) == []


def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return modules(root)


def test_the_reader_sees_imports_in_functions_blocks_and_classes_and_the_packages_they_run(tmp_path: Path):
    found = write_package(tmp_path, {
        "avatarl/__init__.py": "", "avatarl/b.py": "", "avatarl/c.py": "", "avatarl/e.py": "",
        "avatarl/pkg/__init__.py": "", "avatarl/pkg/leaf.py": "", "avatarl/pkg/d.py": "",
        "avatarl/pkg/a.py": (
            "from typing import TYPE_CHECKING\n"
            "import os\n"
            "from avatarl.pkg.leaf import thing\n"
            "try:\n    from avatarl import b\nexcept ImportError:\n    b = None\n"
            "if TYPE_CHECKING:\n    from avatarl.c import C\n"
            "def f():\n    from .d import x\n"
            "class K:\n    import avatarl.e\n"),
    })
    imports = read_imports("avatarl.pkg.a", found["avatarl.pkg.a"], set(found))
    assert imports == Imports(now={"avatarl.pkg.leaf", "avatarl.b", "avatarl.e"},
                              later={"avatarl.c", "avatarl.pkg.d"})
    outside = write_package(tmp_path / "two", {
        "avatarl/__init__.py": "", "avatarl/x.py": "from avatarl.pkg.leaf import y\n",
        "avatarl/pkg/__init__.py": "from avatarl.pkg.leaf import y\n", "avatarl/pkg/leaf.py": "",
        "avatarl/pkg/other.py": "from avatarl.pkg import leaf\nfrom avatarl.pkg import z\n",
    })
    from_outside = read_imports("avatarl.x", outside["avatarl.x"], set(outside))
    assert from_outside.now == {"avatarl.pkg", "avatarl.pkg.leaf"}
    # inside avatarl.pkg its own __init__ is already running, unless a name is taken from it
    assert read_imports("avatarl.pkg.other", outside["avatarl.pkg.other"], set(outside)).now == {
        "avatarl.pkg.leaf", "avatarl.pkg"}


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path):
    # tracking -> progress -> objectives/__init__ -> referee -> tracking: no module names the package,
    # and progress only imports objectives.base, yet importing it runs objectives/__init__ first.
    found = write_package(tmp_path, {
        "avatarl/__init__.py": "",
        "avatarl/tracking.py": "from avatarl.progress import pace\n",
        "avatarl/progress.py": "from avatarl.objectives.base import Method\n",
        "avatarl/objectives/__init__.py": "from avatarl.objectives.base import Method\n"
                                          "from avatarl.referee import Referee\n",
        "avatarl/objectives/base.py": "",
        "avatarl/referee.py": "from avatarl.tracking import log\n",
    })
    cycle = find_cycle({name: imports.now for name, imports in import_graph(found).items()})
    assert cycle == ["avatarl.objectives", "avatarl.referee", "avatarl.tracking", "avatarl.progress",
                     "avatarl.objectives"]


def test_an_upward_import_is_found_inside_a_function_and_behind_a_chain(tmp_path: Path):
    found = write_package(tmp_path, {
        "avatarl/__init__.py": "", "avatarl/trainer.py": "", "avatarl/run_dir.py": "",
        "avatarl/helper.py": "from avatarl.run_dir import layout\n",
        "avatarl/algorithms/__init__.py": "",
        "avatarl/algorithms/grpo.py": "def loss():\n    from avatarl.trainer import train\n",
        "avatarl/model.py": "from avatarl.helper import layout\n",
        "avatarl/algorithms/fine.py": "def load():\n    from avatarl.helper import layout\n",
    })
    assert upward_imports(import_graph(found)) == [
        "avatarl.algorithms.grpo imports avatarl.trainer",
        "importing avatarl.model loads avatarl.run_dir: avatarl.model -> avatarl.helper -> avatarl.run_dir"]
