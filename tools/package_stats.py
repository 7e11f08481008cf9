#!/usr/bin/env python3
"""The shape of the liverseg package, read from its source (nothing is imported):

    python tools/package_stats.py [PACKAGE_DIR]

prints the modules and their lines, the modules over 500 lines, the ten longest functions, the
imports of liverseg's own modules made inside functions (and whether each defers a heavy
library: TensorFlow, Keras, Beam or an optional runtime), and the import cycles among the
modules when imports inside functions are counted too. tests/test_package.py checks the rules
with the same functions: no cycle, and a liverseg module imported inside a function only where
that defers a heavy library (the module loads one at its top, and the importer does not).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# Libraries a module may import inside a function (they are slow to load, or optional extras),
# and the liverseg modules that load one of them at their top may be imported so too.
HEAVY = (
    "tensorflow",
    "keras",
    "apache_beam",
    "tensorboard",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "openvino",
    "ai_edge_litert",
    "highdicom",
)


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module name (a liverseg module or a third-party top-level package)
    line: int
    lazy: bool  # inside a function


def modules(root: Path) -> dict[str, Path]:
    """liverseg module name -> file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in a module: liverseg modules (a `from liverseg import x` of a submodule is
    that submodule) and third-party top-level packages; `lazy` when inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(name, _resolve(alias.name, known), child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                for alias in child.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                    found.append(Import(name, _resolve(target, known), child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return [i for i in found if i.imported != name and not _type_checking_only(tree, i.line)]


def _resolve(dotted: str, known: set[str]) -> str:
    if dotted.split(".")[0] != "liverseg":
        return dotted.split(".")[0]
    while dotted not in known and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _type_checking_only(tree: ast.Module, line: int) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            if node.lineno <= line <= max(getattr(n, "end_lineno", node.lineno) for n in node.body):
                return True
    return False


def graph(root: Path) -> tuple[dict[str, Path], list[Import]]:
    mods = modules(root)
    return mods, [i for name, path in mods.items() for i in imports(name, path, set(mods))]


def heavy_at_top(mods: dict[str, Path], edges: list[Import]) -> set[str]:
    """The liverseg modules whose top-level imports load a heavy library, directly or through
    other liverseg modules (a package's import loads its __init__ too)."""
    top = {m: {i.imported for i in edges if i.importer == m and not i.lazy} for m in mods}
    heavy: set[str] = set()
    changed = True
    while changed:
        changed = False
        for m, deps in top.items():
            if m not in heavy and any(d in HEAVY or d in heavy for d in deps):
                heavy.add(m)
                changed = True
    return heavy


def cycles(mods: dict[str, Path], edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing
    itself), every import counted: each is an import circle."""
    nxt = {m: sorted({i.imported for i in edges if i.importer == m and i.imported in mods}) for m in mods}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in nxt[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    sys.setrecursionlimit(10000)
    for m in mods:
        if m not in index:
            strong(m)
    return out


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((child.end_lineno - child.lineno + 1, f"{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def main(root: Path) -> None:
    mods, edges = graph(root)
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    print(f"modules: {len(mods)}, lines: {sum(lines.values()):,}")
    print("over 500 lines:", ", ".join(f"{m} ({n})" for m, n in sorted(lines.items(), key=lambda x: -x[1]) if n > 500))
    longest = sorted(((n, f"{m}.{f}") for m, p in mods.items() for n, f in functions(p)), reverse=True)[:10]
    print("longest functions:", ", ".join(f"{f} ({n})" for n, f in longest))
    heavy = heavy_at_top(mods, edges)
    lazy = sorted({(i.importer, i.imported) for i in edges if i.lazy and i.imported in mods})
    light = [(a, b) for a, b in lazy if b not in heavy or a in heavy]
    print(f"in-function import pairs of liverseg modules: {len(lazy)} ({len(light)} defer no heavy library)")
    for a, b in light:
        print(f"  {a} -> {b}")
    found = cycles(mods, edges)
    print(f"import cycles (imports inside functions counted): {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "liverseg")
