"""Imports inside amos_fused go one way: the graph of its modules' imports, function-level
(lazy) imports included, has no cycle; and only the backend registry (backends.py) imports the
backend modules."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "amos_fused"
# the package's modules: amos_fused/*.py, and kernels/*.py installed as amos_fused.kernels (setup.py)
FOLDERS = {PACKAGE: ROOT / "amos_fused", f"{PACKAGE}.kernels": ROOT / "kernels"}
EXTENSIONS = {f"{PACKAGE}._C"}  # compiled (setup.py): imports nothing of the package

# Known cycles (none): an edge listed here would be left out of the check.
ALLOWED = set()


def modules():
    """{module name: path (None for an extension)} of every module of the package."""
    found = dict.fromkeys(EXTENSIONS)
    for package, folder in FOLDERS.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(name, path, known):
    """The package's modules that module `name` imports anywhere in its file."""
    if path is None:
        return set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from base import x`: module base.x when that is a module, else base itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c -> the package's module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges):
    """A cycle of `edges` ({node: set of nodes}) as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read():
    """The parser sees top-level, relative and function-level imports (so the next test can fail)."""
    g = graph()
    assert "amos_fused.optimizer" in g["amos_fused"]
    assert "amos_fused.kernels.amos_triton" in g["amos_fused.triton_backend"]
    assert {"amos_fused.cpp_backend", "amos_fused.triton_backend"} <= g["amos_fused.backends"]  # lazy ones
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_go_one_way():
    g = graph()
    edges = {name: {t for t in targets if (name, t) not in ALLOWED} for name, targets in g.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle inside amos_fused: " + " -> ".join(cycle)


def test_only_the_registry_imports_the_backends():
    """One backend registry: everything reaches the backend modules through backends.py."""
    backend_modules = {"amos_fused.cpp_backend", "amos_fused.triton_backend"}
    for name, targets in graph().items():
        if name != "amos_fused.backends":
            assert not targets & backend_modules, f"{name} imports {sorted(targets & backend_modules)}"
