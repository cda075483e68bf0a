"""The package's layers import one way (ARCHITECTURE.md), and no two modules import each other.

Every module of onerec_jax is parsed with `ast` (nothing is imported); absolute and relative
imports are resolved, those inside functions included. A module may import its own layer or
lower ones; `evaluation/` may not import `training/` (same layer, one direction). Imports under
`if TYPE_CHECKING:` count for the layers but not for cycles (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "onerec_jax"

# Bottom to top; the longest matching prefix of a module's name gives its layer.
LAYERS = {
    "onerec_jax": 0,  # the package's __init__: a docstring and the version
    "onerec_jax.errors": 0,
    "onerec_jax.data": 1,
    "onerec_jax.parallel": 2,
    "onerec_jax.models": 3,
    "onerec_jax.tokenize": 4,
    "onerec_jax.training": 5,
    "onerec_jax.evaluation": 5,
    "onerec_jax.defaults": 6,
    "onerec_jax.runs": 6,
    "onerec_jax.modes": 6,
    "onerec_jax.recommend": 6,
    "onerec_jax.serve": 6,  # over recommend (same layer)
    "onerec_jax.explain": 6,  # under recommend (same layer)
    "onerec_jax.update": 6,  # over runs and training
    "onerec_jax.align": 6,  # over runs, training and evaluation
    "onerec_jax.distributed": 6,
    "onerec_jax.main": 7,
}
# (importer prefix, imported prefix) pairs refused although the layers allow them.
FORBIDDEN = (("onerec_jax.evaluation", "onerec_jax.training"),)


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package_dir`."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """(node, runs at import time or in a call: False under `if TYPE_CHECKING:`) for each import."""
    out = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append((node, runtime))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(tree, True)
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]):
    """[(imported onerec_jax module, line, runtime)] of module `name` at `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, runtime in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                for a in node.names
            ]
        for target in targets:
            if target == "onerec_jax" or target.startswith("onerec_jax."):
                while target not in modules and "." in target:  # `import a.b.c` of a name
                    target = target.rpartition(".")[0]
                if target != name:
                    found.append((target, node.lineno, runtime))
    return found


def layer(module: str) -> int | None:
    best = max(
        (p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None
    )
    return None if best is None else LAYERS[best]


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """'importer -> imported, line N (layer a < b)' for every upward or forbidden import."""
    modules = module_names(package_dir)
    problems = []
    for name, path in modules.items():
        if layer(name) is None:
            problems.append(f"{name}: in no layer; add it to LAYERS in tests/test_layers.py")
            continue
        for target, line, _ in imported_modules(name, path, modules):
            if layer(target) is None:
                continue  # reported as a module of its own
            if layer(target) > layer(name):
                problems.append(
                    f"{name} -> {target}, line {line} (layer {layer(name)} imports {layer(target)})"
                )
            elif any(_in(name, a) and _in(target, b) for a, b in FORBIDDEN):
                problems.append(f"{name} -> {target}, line {line} (forbidden direction)")
    return problems


def import_cycles(package_dir: Path = PACKAGE_DIR) -> list[list[str]]:
    """Every set of two or more modules that import each other (strongly connected components)."""
    modules = module_names(package_dir)
    graph = {
        name: sorted({t for t, _, runtime in imported_modules(name, path, modules) if runtime})
        for name, path in modules.items()
    }
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def test_every_module_imports_only_its_layer_or_lower():
    problems = layer_violations()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "onerec_jax"
    (pkg / "data").mkdir(parents=True)
    (pkg / "training").mkdir()
    for init in (pkg, pkg / "data", pkg / "training"):
        (init / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "training" / "train.py").write_text("from ..data import reader\n")
    (pkg / "data" / "reader.py").write_text(
        "from . import tables\n\ndef f():\n    from onerec_jax.training import train\n"
    )
    (pkg / "data" / "tables.py").write_text("import onerec_jax.errors\nfrom .reader import f\n")
    assert layer_violations(pkg) == [
        "onerec_jax.data.reader -> onerec_jax.training.train, line 4 (layer 1 imports 5)"
    ]
    assert import_cycles(pkg) == [
        ["onerec_jax.data.reader", "onerec_jax.data.tables", "onerec_jax.training.train"]
    ]
