"""The house's layering: imports among gvae's modules run one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gvae"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that a file imports anywhere in it (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gvae":
            if node.module == "gvae":  # from gvae import checkpoint
                found |= {a.name for a in node.names if a.name in modules}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gvae.")}
    return found - {path.stem}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    return {m: imports_of(package / f"{m}.py", modules) for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for dep in sorted(graph.get(module, ())):
            if cycle := visit(dep, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_no_import_cycle_among_gvaes_modules():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_a_function_local_import_that_closes_a_cycle_is_found(tmp_path):
    (tmp_path / "a.py").write_text("from gvae.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from gvae import a\n")
    assert find_cycle(import_graph(tmp_path)) == ["a", "b", "a"]


def test_the_schemas_and_primitives_import_nothing_above_them():
    graph = import_graph(PACKAGE)
    bottom = {"errors": set(), "files": set(), "rng": set(), "latents": {"rng"}, "nets": set(),
              "schedules": {"errors"}, "data": {"errors", "rng"}}
    for module, allowed in bottom.items():
        assert graph[module] <= allowed, module
