"""The import layering of `jaxlora` (the library) and `runner` (the application).

Imports point down, never up or sideways:

    runner.cli                 the command line: parses arguments, picks a command
      -> runner.commands.*     one module per command; no command imports another
        -> runner.* services   what the commands share (recipe, run folder, reports, ...)
          -> jaxlora.*         the library, usable without the application
            ...  jaxlora.models    import no training or data code
            ...  jaxlora.runtime   the lowest layer: imports nothing above jaxlora.errors

and `runner.run_folder` (reading and writing a run folder's files) imports no
JAX at all, not even through the project modules it imports, so that looking
at a run folder is fast and works without an accelerator stack.

Each rule is one test below (`test_rule_*`); a failure names the module(s) and
the import line(s) to change. Two more rules keep functions small and readable:
at most 8 parameters, and a docstring on every function longer than 30 lines.

Where to start reading: `build_graph` reads every module's imports with `ast`
(module level, inside functions and inside `if TYPE_CHECKING:` alike) into a
`Graph`; the `check_*` functions take a `Graph` and return the violations as
lines of text; the `test_rule_*` functions run them on this repository, and the
`test_selftest_*` functions run them on small fake trees, so that no rule can
pass because the machinery saw nothing.

Pure standard library; reads files only, imports none of the project's code.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("jaxlora", "runner")
JAX_LIBRARIES = frozenset({"jax", "jaxlib", "flax", "optax", "orbax"})
MAX_PARAMETERS = 8
MAX_LINES_WITHOUT_DOCSTRING = 30


# --------------------------------------------------------------------------------------
# The import graph
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """One imported name: a project module or an external top-level package."""

    target: str
    line: int
    in_function: bool  # inside a function body (a lazy import)


@dataclass(repr=False)
class Module:
    """One project module: its file, syntax tree and imports."""

    name: str           # dotted: jaxlora/data/__init__.py is "jaxlora.data"
    path: Path          # relative to the root, e.g. jaxlora/data/__init__.py
    is_package: bool    # an __init__.py
    source: str
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)    # project modules
    external: list[Import] = field(default_factory=list)   # top-level names (jax, os, ...)

    def __repr__(self) -> str:
        return f"Module({self.name})"


@dataclass(repr=False)
class Graph:
    """The project's modules and, per module, the project modules it imports."""

    root: Path
    modules: dict[str, Module]

    def __repr__(self) -> str:
        return f"Graph({self.root}, {len(self.modules)} modules)"

    def edges(self, name: str) -> dict[str, list[int]]:
        """The project modules `name` imports -> the line numbers of those imports."""
        out: dict[str, list[int]] = {}
        module = self.modules.get(name)
        for imp in module.imports if module else ():
            out.setdefault(imp.target, []).append(imp.line)
        return out

    def where(self, name: str, lines: list[int]) -> str:
        """`path:line[,line...]` of imports in module `name`."""
        return f"{self.modules[name].path.as_posix()}:{','.join(map(str, sorted(set(lines))))}"


def is_project(name: str) -> bool:
    """Whether a dotted name lies in one of the project's packages."""
    return any(name == pkg or name.startswith(pkg + ".") for pkg in PROJECT_PACKAGES)


def module_name(relative: Path) -> tuple[str, bool]:
    """The dotted module name of a file under the root, and whether it is a package."""
    parts = list(relative.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _imports_in(tree: ast.AST):
    """Every Import/ImportFrom node of the tree, with whether it is inside a function."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _resolve_from(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module name that `from <...> import` names (None: beyond the top)."""
    if node.level == 0:
        return node.module
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".") if package else []
    up = node.level - 1
    if up >= len(parts):
        return None
    base = parts[:len(parts) - up]
    if node.module:
        base += node.module.split(".")
    return ".".join(base)


def build_graph(root: Path) -> Graph:
    """Read every module of the project packages under `root` and their imports.

    `import a.b.c` is an edge to `a.b.c`; `from a.b import x` an edge to `a.b.x`
    when that is a project module, else to `a.b`; relative imports are resolved
    against the importing module's package. Importing a submodule adds no edge to
    its parent packages (otherwise every re-exporting `__init__` would be a false
    cycle). A module importing itself adds no edge. External imports are kept as
    their top-level name (`jax.numpy` -> `jax`).
    """
    root = Path(root)
    modules: dict[str, Module] = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") for part in relative.parts):
                continue
            name, is_package = module_name(relative)
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(relative))
            modules[name] = Module(name, relative, is_package, source, tree)

    for module in modules.values():
        for node, in_function in _imports_in(module.tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(module, node)
                if base is None:
                    continue
                if not is_project(base):
                    targets = [base]
                else:
                    targets = [f"{base}.{alias.name}"
                               if alias.name != "*" and f"{base}.{alias.name}" in modules else base
                               for alias in node.names]
            for target in dict.fromkeys(targets):
                if is_project(target):
                    if target != module.name:
                        module.imports.append(Import(target, node.lineno, in_function))
                else:
                    module.external.append(Import(target.split(".")[0], node.lineno, in_function))
    return Graph(root, modules)


@functools.cache
def repo_graph() -> Graph:
    """This repository's graph, built once per test session."""
    return build_graph(REPO_ROOT)


# --------------------------------------------------------------------------------------
# Cycles
# --------------------------------------------------------------------------------------

def strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm (iterative), over the project modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    successors = {name: [t for t in graph.edges(name) if t in graph.modules]
                  for name in graph.modules}

    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(successors[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors[child])))
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
                components.append(sorted(component))
    return components


@dataclass(frozen=True)
class Cycle:
    """One concrete import cycle: modules[0] -> ... -> modules[-1] == modules[0]."""

    modules: tuple[str, ...]
    locations: tuple[str, ...]  # `path:line imports target`, one per arrow

    @property
    def chain(self) -> str:
        return " -> ".join(self.modules)


def shortest_cycle(graph: Graph, start: str, members: set[str]) -> Cycle:
    """The shortest cycle from `start` back to it through `members` (breadth first)."""
    parent: dict[str, str] = {start: ""}
    queue = deque([start])
    closing = None
    while queue and closing is None:
        node = queue.popleft()
        for target in graph.edges(node):
            if target == start:
                closing = node
                break
            if target in members and target not in parent:
                parent[target] = node
                queue.append(target)
    path = [start]
    node = closing
    while node != start:
        path.insert(1, node)
        node = parent[node]
    path.append(start)
    locations = tuple(f"{graph.where(a, graph.edges(a)[b])} imports {b}"
                      for a, b in zip(path, path[1:]))
    return Cycle(tuple(path), locations)


def find_cycles(graph: Graph) -> list[Cycle]:
    """Concrete cycles for every strongly connected component of two or more modules:
    the shortest cycle through its first module (alphabetical order), then one through
    each module no cycle reported so far passes, so that every member is named."""
    cycles = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        covered: set[str] = set()
        for start in component:
            if start not in covered:
                cycle = shortest_cycle(graph, start, set(component))
                covered.update(cycle.modules)
                cycles.append(cycle)
    return cycles


def check_no_cycles(graph: Graph) -> list[str]:
    return [f"{cycle.chain}\n" + "".join(f"      {loc}\n" for loc in cycle.locations)
            for cycle in find_cycles(graph)]


# --------------------------------------------------------------------------------------
# The layering rules: each returns its violations as text, [] when the rule holds
# --------------------------------------------------------------------------------------

def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _forbidden_imports(graph: Graph, importers, forbidden) -> list[str]:
    """`path:line: module imports target` for each edge from an importer to a forbidden target."""
    return [f"{graph.where(name, lines)}: {name} imports {target}"
            for name in sorted(graph.modules) if importers(name)
            for target, lines in sorted(graph.edges(name).items()) if forbidden(target)]


def check_library_without_application(graph: Graph) -> list[str]:
    return _forbidden_imports(graph, lambda m: _in(m, "jaxlora"), lambda t: _in(t, "runner"))


def check_runtime_is_lowest(graph: Graph) -> list[str]:
    if not any(_in(name, "jaxlora.runtime") for name in graph.modules):
        return ["no module jaxlora.runtime (jaxlora/runtime.py or jaxlora/runtime/) was found"]
    return _forbidden_imports(
        graph, lambda m: _in(m, "jaxlora.runtime"),
        lambda t: _in(t, "jaxlora") and t != "jaxlora.errors" and not _in(t, "jaxlora.runtime"))


TRAINING_AND_DATA = ("jaxlora.train", "jaxlora.optim", "jaxlora.data", "jaxlora.evaluate",
                     "jaxlora.checkpoint", "jaxlora.tasks")


def check_models_without_training(graph: Graph) -> list[str]:
    if not any(_in(name, "jaxlora.models") for name in graph.modules):
        return ["no module jaxlora.models was found"]
    return _forbidden_imports(graph, lambda m: _in(m, "jaxlora.models"),
                              lambda t: any(_in(t, p) for p in TRAINING_AND_DATA))


def check_run_folder_without_jax(graph: Graph, module: str = "runner.run_folder") -> list[str]:
    """Every JAX import reachable from `module`, with the chain of imports that reaches it.

    Besides the imports, a module's parent packages count as reached: Python runs
    `jaxlora/__init__.py` before `jaxlora.errors`, so JAX imported there would load.
    """
    if module not in graph.modules:
        path = module.replace(".", "/") + ".py"
        return [f"{path} does not exist yet: the target layout has the module {module} "
                "that reads and writes a run folder's files"]
    parent: dict[str, tuple[str, str]] = {module: ("", "")}  # reached -> (from, how)
    queue = deque([module])
    while queue:
        node = queue.popleft()
        steps = [(t, f"{graph.where(node, lines)} imports {t}")
                 for t, lines in sorted(graph.edges(node).items())]
        parts = node.split(".")
        steps += [(pkg, f"(Python runs the package {pkg} before {node})")
                  for pkg in (".".join(parts[:i]) for i in range(1, len(parts)))]
        for target, how in steps:
            if target in graph.modules and target not in parent:
                parent[target] = (node, how)
                queue.append(target)

    violations = []
    for reached in parent:  # breadth-first order: the nearest first
        jax_imports = [imp for imp in graph.modules[reached].external
                       if imp.target in JAX_LIBRARIES]
        if not jax_imports:
            continue
        chain, hows, node = [reached], [], reached
        while node != module:
            node, how = parent[node]
            chain.insert(0, node)
            hows.insert(0, how)
        libraries = sorted({imp.target for imp in jax_imports})
        lines = [imp.line for imp in jax_imports]
        text = f"{module} reaches {', '.join(libraries)} via {' -> '.join(chain)}\n"
        text += "".join(f"      {how}\n" for how in hows)
        text += f"      {graph.where(reached, lines)} imports {', '.join(libraries)}\n"
        violations.append(text)
    return violations


def check_commands_layer(graph: Graph) -> list[str]:
    violations = []
    if not (graph.root / "runner" / "commands").is_dir():
        violations.append("runner/commands/ does not exist yet: the target layout has one module "
                          "per command, runner.commands.<command>, imported only by runner.cli")
    if "runner.cli" not in graph.modules:
        violations.append("runner/cli.py does not exist")
    violations += _forbidden_imports(graph, lambda m: True, lambda t: t == "runner.cli")
    violations += _forbidden_imports(graph, lambda m: m != "runner.cli",
                                     lambda t: _in(t, "runner.commands"))
    return violations


# --------------------------------------------------------------------------------------
# Function size rules
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Function:
    """One def (not a lambda) with what the size rules need."""

    path: Path
    line: int
    name: str          # qualified: Class.method, outer.inner
    parameters: int    # self/cls of a method not counted
    lines: int         # def line to last line, decorators excluded
    has_docstring: bool

    def at(self) -> str:
        return f"{self.path.as_posix()}:{self.line} {self.name}"


def count_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    """Positional-only + positional + keyword-only + *args + **kwargs, less a
    method's first parameter when it is `self` or `cls`."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    count = (len(positional) + len(args.kwonlyargs)
             + (args.vararg is not None) + (args.kwarg is not None))
    if is_method and positional and positional[0].arg in ("self", "cls"):
        count -= 1
    return count


def functions_in(tree: ast.AST, path: Path) -> list[Function]:
    """Every function and method of a module, nested ones included."""
    found = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append(Function(path, child.lineno, name, count_parameters(child, in_class),
                                      child.end_lineno - child.lineno + 1,
                                      ast.get_docstring(child) is not None))
                visit(child, name + ".", False)
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".", True)
            else:
                visit(child, prefix, in_class)

    visit(tree, "", False)
    return found


def all_functions(graph: Graph) -> list[Function]:
    return [f for name in sorted(graph.modules)
            for f in functions_in(graph.modules[name].tree, graph.modules[name].path)]


def check_parameter_counts(graph: Graph) -> list[str]:
    return [f"{f.at()} ({f.parameters} parameters)"
            for f in all_functions(graph) if f.parameters > MAX_PARAMETERS]


def check_long_functions_documented(graph: Graph) -> list[str]:
    return [f"{f.at()} ({f.lines} lines)" for f in all_functions(graph)
            if f.lines > MAX_LINES_WITHOUT_DOCSTRING and not f.has_docstring]


def _report(header: str, violations: list[str]) -> str:
    body = "".join(v if v.endswith("\n") else v + "\n" for v in violations)
    return f"{header}\n{textwrap.indent(body, '  ')}"


def fail_if(header: str, violations: list[str]) -> None:
    """Fail the test with the header and one violation per line (no traceback: the
    message says what to fix)."""
    if violations:
        pytest.fail(_report(header, violations), pytrace=False)


# --------------------------------------------------------------------------------------
# The rules, on this repository
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> Graph:
    return repo_graph()


def test_rule_1_no_import_cycles(graph):
    """No import cycle between project modules.

    A cycle makes import order matter (a partly initialised module, an
    ImportError that depends on which module was imported first) and means the
    two modules are one layer in practice. Inside a package, submodules import
    siblings by their own module names, never from the package `__init__`.
    """
    violations = check_no_cycles(graph)
    fail_if(
        f"{len(violations)} import cycle(s); break each by moving what both sides need into a "
        "lower module (or import the sibling submodule rather than the package):", violations)


def test_rule_2_library_does_not_import_application(graph):
    """`jaxlora` never imports `runner`: the library is usable without the application."""
    violations = check_library_without_application(graph)
    fail_if("jaxlora imports runner; move what it needs into jaxlora, or pass it in:", violations)


def test_rule_3_runtime_is_the_lowest_layer(graph):
    """`jaxlora.runtime` (module or package) imports no `jaxlora` module but
    `jaxlora.errors` and its own `jaxlora.runtime.*`: everything else builds on it."""
    violations = check_runtime_is_lowest(graph)
    fail_if("jaxlora.runtime imports from above it; take the value as an argument instead:",
            violations)


def test_rule_4_models_import_no_training_or_data_code(graph):
    """`jaxlora.models` imports none of train, optim, data, evaluate, checkpoint,
    tasks: a model is built and loaded without the training machinery."""
    violations = check_models_without_training(graph)
    fail_if("jaxlora.models imports training or data code:", violations)


def test_rule_5_run_folder_imports_no_jax(graph):
    """`runner.run_folder` imports no JAX (jax, jaxlib, flax, optax, orbax),
    directly or through any project module it imports: reading a run folder is
    fast and needs no accelerator stack. The module must exist."""
    violations = check_run_folder_without_jax(graph)
    fail_if(
        "runner.run_folder reaches JAX (imports inside functions count too): move the code "
        "that needs JAX out of run_folder and out of the modules it imports:", violations)


def test_rule_6_imports_point_down_from_the_command_line(graph):
    """No project module imports `runner.cli`, and only `runner.cli` imports
    `runner.commands` and `runner.commands.*`: a command never imports another
    command; what two commands share lives below both. runner/commands/ must exist."""
    violations = check_commands_layer(graph)
    fail_if(
        "imports pointing up from the commands (move the shared code into a service module "
        "below the commands):", violations)


def test_rule_7_at_most_8_parameters(graph):
    """No function takes more than 8 parameters (self/cls not counted): more means a
    settings object or a smaller function is missing."""
    violations = check_parameter_counts(graph)
    fail_if(f"functions with more than {MAX_PARAMETERS} parameters:", violations)


def test_rule_8_long_functions_have_docstrings(graph):
    """A function longer than 30 lines (def to last line) has a docstring saying
    what it does: a reader should not have to read 30 lines to find out."""
    violations = check_long_functions_documented(graph)
    fail_if(f"functions longer than {MAX_LINES_WITHOUT_DOCSTRING} lines without a docstring:",
            violations)


def test_the_real_graph_is_not_empty(graph):
    """The rules above see the whole project: the known modules and imports are there."""
    assert "jaxlora.errors" in graph.modules
    assert "runner.cli" in graph.modules
    assert len(graph.modules) >= 20, sorted(graph.modules)
    assert sum(len(m.imports) for m in graph.modules.values()) >= 40
    assert any(imp.target == "jax" for m in graph.modules.values() for imp in m.external)


def test_the_real_graph_sees_function_level_imports(graph):
    """The graph holds imports made inside functions (the CLI's lazy imports), and
    every indented `from jaxlora|runner ...` / `import jaxlora|runner ...` line of
    the sources (outside strings) is one of the imports it recorded."""
    assert any(imp.in_function for m in graph.modules.values() for imp in m.imports), (
        "no function-level project import found in jaxlora/ or runner/")
    indented_import = re.compile(rf"^\s+(from|import)\s+({'|'.join(PROJECT_PACKAGES)})\b")
    missed = []
    for module in graph.modules.values():
        in_strings = {line for node in ast.walk(module.tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      for line in range(node.lineno, node.end_lineno + 1)}
        recorded = {imp.line for imp in module.imports}
        for number, line in enumerate(module.source.splitlines(), start=1):
            if (indented_import.match(line) and number not in in_strings
                    and number not in recorded):
                missed.append(f"{module.path.as_posix()}:{number}: {line.strip()}")
    fail_if("indented project imports the graph did not see:", missed)


# --------------------------------------------------------------------------------------
# Self-tests: the machinery on small fake trees
# --------------------------------------------------------------------------------------

def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


FAKE_TREE = {
    "jaxlora/__init__.py": "",
    "jaxlora/errors.py": "class E(Exception): pass\n",
    "jaxlora/a.py": """
        import jaxlora.b
        """,
    "jaxlora/b.py": """
        import os


        def f():
            from jaxlora import a
            return a
        """,
    "jaxlora/c.py": """
        import jax.numpy as jnp
        from flax import nnx
        from jaxlora.pkg import x
        from .pkg import sub
        from . import errors
        """,
    "jaxlora/pkg/__init__.py": """
        from jaxlora.pkg.sub import x
        from . import other
        """,
    "jaxlora/pkg/sub.py": """
        from .other import y
        x = y
        """,
    "jaxlora/pkg/other.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from ..errors import E
        y = 1
        """,
}


@pytest.fixture
def fake(tmp_path) -> Graph:
    return build_graph(write_tree(tmp_path, FAKE_TREE))


def test_selftest_graph_edges(fake):
    """The builder finds exactly these edges: module level, in a function, under
    TYPE_CHECKING, `from package import submodule` vs `from package import name`,
    relative imports from a module and from a package `__init__`."""
    assert sorted(fake.modules) == ["jaxlora", "jaxlora.a", "jaxlora.b", "jaxlora.c",
                                    "jaxlora.errors", "jaxlora.pkg", "jaxlora.pkg.other",
                                    "jaxlora.pkg.sub"]
    edges = {name: fake.edges(name) for name in fake.modules if fake.edges(name)}
    assert edges == {
        "jaxlora.a": {"jaxlora.b": [1]},
        "jaxlora.b": {"jaxlora.a": [5]},
        "jaxlora.c": {"jaxlora.pkg": [3], "jaxlora.pkg.sub": [4], "jaxlora.errors": [5]},
        "jaxlora.pkg": {"jaxlora.pkg.sub": [1], "jaxlora.pkg.other": [2]},
        "jaxlora.pkg.sub": {"jaxlora.pkg.other": [1]},
        "jaxlora.pkg.other": {"jaxlora.errors": [3]},
    }
    assert [(i.target, i.in_function) for i in fake.modules["jaxlora.b"].imports] == [
        ("jaxlora.a", True)]
    assert {i.target for i in fake.modules["jaxlora.c"].external} == {"jax", "flax"}
    assert {i.target for i in fake.modules["jaxlora.b"].external} == {"os"}


def test_selftest_cycles(fake):
    """The a <-> b cycle is found, with its lines; the re-exporting package is no cycle."""
    cycles = find_cycles(fake)
    assert [c.chain for c in cycles] == ["jaxlora.a -> jaxlora.b -> jaxlora.a"]
    assert cycles[0].locations == ("jaxlora/a.py:1 imports jaxlora.b",
                                   "jaxlora/b.py:5 imports jaxlora.a")
    assert not any("jaxlora.pkg" in c.modules for c in cycles)  # the re-exporting __init__
    message = check_no_cycles(fake)[0]
    assert "jaxlora.a -> jaxlora.b -> jaxlora.a" in message and "jaxlora/b.py:5" in message


def test_selftest_longer_cycle_through_package_init(tmp_path):
    """A submodule importing from its own package `__init__` that re-exports it is a cycle."""
    graph = build_graph(write_tree(tmp_path, {
        "runner/__init__.py": "",
        "runner/p/__init__.py": "from runner.p.s import f\n",
        "runner/p/s.py": "def f():\n    from runner.p import t\n",
        "runner/p/t.py": "from runner.p import f\n",
    }))
    assert [c.chain for c in find_cycles(graph)] == [
        "runner.p -> runner.p.s -> runner.p.t -> runner.p"]


def test_selftest_every_member_of_a_component_is_in_a_reported_cycle(tmp_path):
    """a <-> b and b <-> c are one component; both cycles are reported, so c is named."""
    graph = build_graph(write_tree(tmp_path, {
        "jaxlora/__init__.py": "",
        "jaxlora/a.py": "from jaxlora import b\n",
        "jaxlora/b.py": "from jaxlora import a, c\n",
        "jaxlora/c.py": "import jaxlora.b\n",
    }))
    assert [sorted(c) for c in strongly_connected_components(graph) if len(c) > 1] == [
        ["jaxlora.a", "jaxlora.b", "jaxlora.c"]]
    assert [c.chain for c in find_cycles(graph)] == ["jaxlora.a -> jaxlora.b -> jaxlora.a",
                                                     "jaxlora.c -> jaxlora.b -> jaxlora.c"]


def test_selftest_layering_rules_catch_violations(tmp_path):
    """Each layering rule reports a violation planted in a fake tree, with its line."""
    graph = build_graph(write_tree(tmp_path, {
        "jaxlora/__init__.py": "",
        "jaxlora/errors.py": "",
        "jaxlora/data.py": "from runner import recipe\n",
        "jaxlora/util.py": "import optax\n",
        "jaxlora/runtime/__init__.py": "from jaxlora.runtime import mesh\n",
        "jaxlora/runtime/mesh.py": ("from jaxlora import errors\n\n"
                                    "def f():\n    import jaxlora.data\n"),
        "jaxlora/models/__init__.py": "from jaxlora.models import bert\n",
        "jaxlora/models/bert.py": "import jaxlora.runtime.mesh\nfrom jaxlora.data import x\n",
        "runner/__init__.py": "",
        "runner/recipe.py": "",
        "runner/cli.py": "from runner.commands import run, show\n",
        "runner/commands/__init__.py": "",
        "runner/commands/run.py": "from runner.commands import show\n",
        "runner/commands/show.py": "import runner.run_folder\n",
        "runner/run_folder.py": "from runner import recipe\nfrom jaxlora import util\n",
        "runner/plan.py": "import runner.cli\n",
    }))
    assert check_library_without_application(graph) == [
        "jaxlora/data.py:1: jaxlora.data imports runner.recipe"]
    assert check_runtime_is_lowest(graph) == [
        "jaxlora/runtime/mesh.py:4: jaxlora.runtime.mesh imports jaxlora.data"]
    assert check_models_without_training(graph) == [
        "jaxlora/models/bert.py:2: jaxlora.models.bert imports jaxlora.data"]
    run_folder = check_run_folder_without_jax(graph)
    assert len(run_folder) == 1
    assert run_folder[0].startswith("runner.run_folder reaches optax via "
                                    "runner.run_folder -> jaxlora.util\n")
    assert "runner/run_folder.py:2 imports jaxlora.util" in run_folder[0]
    assert "jaxlora/util.py:1 imports optax" in run_folder[0]
    assert check_commands_layer(graph) == [
        "runner/plan.py:1: runner.plan imports runner.cli",
        "runner/commands/run.py:1: runner.commands.run imports runner.commands.show",
    ]


def test_selftest_missing_modules_fail(tmp_path):
    """A missing runner/run_folder.py or runner/commands/ is a violation, not a skip;
    JAX imported in a parent package `__init__` counts as reached."""
    graph = build_graph(write_tree(tmp_path, {
        "jaxlora/__init__.py": "import jax\n",
        "jaxlora/errors.py": "",
        "runner/__init__.py": "",
        "runner/cli.py": "",
    }))
    assert check_run_folder_without_jax(graph)[0].startswith("runner/run_folder.py does not exist")
    assert check_commands_layer(graph)[0].startswith("runner/commands/ does not exist")
    assert check_runtime_is_lowest(graph) and check_models_without_training(graph)
    write_tree(tmp_path, {"runner/run_folder.py": "from jaxlora.errors import E\n"})
    [violation] = check_run_folder_without_jax(build_graph(tmp_path))
    assert "via runner.run_folder -> jaxlora.errors -> jaxlora\n" in violation
    assert "jaxlora/__init__.py:1 imports jax" in violation


def test_selftest_parameter_counter():
    """self of a method is not counted; *args and **kwargs are; lambdas are not functions."""
    tree = ast.parse(textwrap.dedent("""
        class C:
            def f(self, a, b=1, *args, c, d=2, **kw):
                pass

            @classmethod
            def g(cls, a, /, b):
                return lambda p, q, r, s, t, u, v, w, x, y: None

        def h(self, a, b, c, d, e, f, g):
            def inner(a, b, c, d, e, f, g, h, i):
                pass
    """))
    found = {f.name: f.parameters for f in functions_in(tree, Path("m.py"))}
    assert found == {"C.f": 6, "C.g": 2, "h": 8, "h.inner": 9}


def test_selftest_size_rules(tmp_path):
    """A 31-line function without a docstring is reported, a 30-line one or a
    documented one is not; decorators do not count; > 8 parameters is reported."""
    body = "".join(f"    x{i} = {i}\n" for i in range(29))  # 29 lines
    graph = build_graph(write_tree(tmp_path, {
        "jaxlora/__init__.py": "",
        "jaxlora/m.py": (
            f"def thirty_one():\n{body}    return 0\n\n"                # lines 1-31
            f"@decorator\ndef thirty():\n{body}\n"                       # def on 34, to 63
            f'def documented():\n    """Doc."""\n{body}    return 0\n\n'  # lines 65-96
            "def nine(a, b, c, d, e, f, g, h, i):\n    pass\n"          # line 98
        ),
    }))
    assert check_long_functions_documented(graph) == ["jaxlora/m.py:1 thirty_one (31 lines)"]
    assert check_parameter_counts(graph) == ["jaxlora/m.py:98 nine (9 parameters)"]
