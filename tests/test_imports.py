"""The import structure of the package: no import cycles, and no library module imports a face (CLI, server).

Every module of zimage_mlx is parsed with `ast`, without importing it, and every import statement counts,
wherever it is: at module level, inside a function or a method, under `if` or `try`. An import inside a
function hides a cycle from Python at import time; it does not make the two modules any less entangled.

The faces are zimage_mlx.cli, zimage_mlx.cli_*, zimage_mlx.cli.* and the same for server: they may import
the library; the library must not import them.

The graph has an edge A -> B when A names B in an import: `import zimage_mlx.b`, `from zimage_mlx.b import x`,
`from .b import x`, `from . import b` (B = the subpackage or module b when there is one, else the package:
`from . import __version__` is an edge to zimage_mlx itself), `from ..b import x` in a subpackage. Importing
zimage_mlx.b.c also runs zimage_mlx/__init__.py and zimage_mlx/b/__init__.py; those implicit edges to the parent
packages are left out (a package's __init__ that imports its submodules lazily would otherwise close a cycle
with each of them).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "zimage_mlx"

# The import cycles that are known and tolerated, as pairs of modules: a strongly connected set of modules
# equal to a pair's two modules passes; anything larger or different fails.
KNOWN_CYCLES: set = set()  # none: any cycle fails

FACES = ("cli", "server")


# ----------------------------------------------------------------------------------------------
# The checker


def module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (its name is the folder's name)."""
    package_dir = Path(package_dir)
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if any(not p.isidentifier() for p in parts):  # not importable (e.g. a data folder)
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((root, *parts))] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an ImportFrom's module part stands for, in `module`."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{module}: relative import beyond the top-level package (level {node.level})")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package_dir: Path) -> dict[str, dict[str, list[str]]]:
    """{module: {imported module of the same package: ["file:line", ...]}} for every module of the package in
    `package_dir`, from every import statement in it (module level and inside functions)."""
    modules = module_names(package_dir)
    root = Path(package_dir).name
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        where = f"{path.relative_to(Path(package_dir).parent)}"

        def add(target: str, line: int) -> None:
            if target in modules and target != module:
                graph[module].setdefault(target, []).append(f"{where}:{line}")

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                subs = [f"{base}.{alias.name}" for alias in node.names]
                for sub in subs:
                    add(sub if sub in modules else base, node.lineno)
                if base != root and any(sub in modules for sub in subs) and base not in graph[module]:
                    add(base, node.lineno)  # `from . import x` in a subpackage runs its __init__ as well
    return graph


def _components(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return sorted(out)


def _a_cycle(graph: dict[str, dict], component: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component: [m0, m1, ..., m0] (shortest)."""
    members, start = set(component), component[0]
    previous, frontier = {start: None}, [start]
    while frontier:  # breadth first from start, inside the component, back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def find_cycles(graph: dict[str, dict[str, list[str]]], known=frozenset()) -> list[str]:
    """One line per import cycle (strongly connected set of modules) not in `known`: the modules, and one cycle
    through them with the file:line of each import."""
    allowed = {frozenset(pair) for pair in known}
    lines = []
    for component in _components(graph):
        if frozenset(component) in allowed:
            continue
        cycle = _a_cycle(graph, component)
        steps = " -> ".join(f"{a} ({graph[a][b][0]})" for a, b in zip(cycle, cycle[1:]))
        lines.append(f"{{{', '.join(component)}}}: {steps} -> {cycle[-1]}")
    return lines


def is_face(module: str) -> bool:
    """A CLI or server module: <package>.cli, <package>.cli_*, <package>.cli.*, the same for server."""
    parts = module.split(".")
    if len(parts) < 2:
        return False
    top = parts[1]
    return any(top == f or top.startswith(f + "_") for f in FACES)


def face_leaks(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """One line per import of a face module by a library module."""
    return [f"{m} imports {t} ({', '.join(graph[m][t])})"
            for m in sorted(graph) if not is_face(m) for t in sorted(graph[m]) if is_face(t)]


# ----------------------------------------------------------------------------------------------
# The package


def test_no_import_cycles():
    cycles = find_cycles(import_graph(PACKAGE_DIR), KNOWN_CYCLES)
    assert not cycles, "import cycles among zimage_mlx modules:\n" + "\n".join(cycles)


def test_library_modules_import_no_face():
    leaks = face_leaks(import_graph(PACKAGE_DIR))
    assert not leaks, "library modules import CLI/server modules:\n" + "\n".join(leaks)


def test_the_graph_sees_the_package():
    graph = import_graph(PACKAGE_DIR)
    assert {"zimage_mlx", "zimage_mlx.pipeline", "zimage_mlx.transformer", "zimage_mlx.fp16"} <= set(graph)
    assert "zimage_mlx.transformer" in graph["zimage_mlx.pipeline"]  # module level, relative
    assert "zimage_mlx.pipeline" in graph["zimage_mlx"]  # inside __getattr__: `from . import pipeline`


# ----------------------------------------------------------------------------------------------
# The checker on fake packages


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fakepkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_reports_a_cycle(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from .b import helper\n",
        "b.py": "def helper():\n    from . import a  # inside a function: still a cycle\n    return a\n",
        "c.py": "from .a import helper\n",  # imports into the cycle, is not part of it
    })
    graph = import_graph(root)
    cycles = find_cycles(graph)
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("{fakepkg.a, fakepkg.b}: fakepkg.a (fakepkg/a.py:1) -> fakepkg.b (fakepkg/b.py:2)"), \
        cycles
    assert find_cycles(graph, {("fakepkg.b", "fakepkg.a")}) == []  # the allow-list, either order
    assert find_cycles(graph, {("fakepkg.a", "fakepkg.c")}) == cycles  # ... only for that exact set


def test_checker_reports_a_longer_cycle_through_subpackages(tmp_path):
    root = _package(tmp_path, {
        "lib.py": "import fakepkg.sub.deep\n",
        "sub/__init__.py": "from . import deep  # fakepkg.sub.deep, not fakepkg.deep\n",
        "sub/deep.py": "from ..other import x\n",
        "other.py": "x = 1\nfrom .lib import y\n",
        "deep.py": "",
    })
    graph = import_graph(root)
    assert graph["fakepkg.sub"] == {"fakepkg.sub.deep": ["fakepkg/sub/__init__.py:1"]}
    assert graph["fakepkg.sub.deep"] == {"fakepkg.other": ["fakepkg/sub/deep.py:1"]}
    cycles = find_cycles(graph)
    assert cycles == ["{fakepkg.lib, fakepkg.other, fakepkg.sub.deep}: fakepkg.lib (fakepkg/lib.py:1) -> "
                      "fakepkg.sub.deep (fakepkg/sub/deep.py:1) -> fakepkg.other (fakepkg/other.py:2) -> fakepkg.lib"]


def test_checker_reports_a_library_module_importing_a_face(tmp_path):
    root = _package(tmp_path, {
        "cli.py": "from .lib import run\n",  # a face importing the library: fine
        "cli_extra.py": "from . import lib\n",
        "server/__init__.py": "from .app import serve\n",
        "server/app.py": "from ..lib import run\n",
        "lib.py": "def run():\n    from .cli import main  # the leak\n    return main\n",
        "tool.py": "import fakepkg.server.app\nfrom . import cli_extra\n",
    })
    graph = import_graph(root)
    assert graph["fakepkg.server"] == {"fakepkg.server.app": ["fakepkg/server/__init__.py:1"]}
    assert graph["fakepkg.server.app"] == {"fakepkg.lib": ["fakepkg/server/app.py:1"]}
    assert face_leaks(graph) == [
        "fakepkg.lib imports fakepkg.cli (fakepkg/lib.py:2)",
        "fakepkg.tool imports fakepkg.cli_extra (fakepkg/tool.py:2)",
        "fakepkg.tool imports fakepkg.server.app (fakepkg/tool.py:1)",
    ]
    assert [c.split(":")[0] for c in find_cycles(graph)] == ["{fakepkg.cli, fakepkg.lib}"]


def test_checker_sees_a_subpackage_module_importing_its_package(tmp_path):
    """`from . import views` in server/app.py runs server/__init__.py, which imports app: a cycle (the stop
    hook's checker counts it too)."""
    root = _package(tmp_path, {
        "server/__init__.py": "from .app import serve\n",
        "server/app.py": "from . import views\n",
        "server/views.py": "",
    })
    assert [c.split(":")[0] for c in find_cycles(import_graph(root))] == ["{fakepkg.server, fakepkg.server.app}"]


def test_face_names():
    assert all(is_face(m) for m in ("zimage_mlx.cli", "zimage_mlx.cli_train", "zimage_mlx.cli.generate",
                                    "zimage_mlx.server", "zimage_mlx.server_engine", "zimage_mlx.server.app"))
    assert not any(is_face(m) for m in ("zimage_mlx", "zimage_mlx.pipeline", "zimage_mlx.client",
                                        "zimage_mlx.serverless", "zimage_mlx.inputs"))


if __name__ == "__main__":  # python tests/test_imports.py [package dir]: print the cycles and the leaks
    import sys

    g = import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR)
    print("\n".join(find_cycles(g) + face_leaks(g)) or "no cycles, no leaks")
