"""The house's layering: imports among gvae's modules and its Hydra plugins run one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gvae", "hydra_plugins")  # gvae/ and hydra_plugins/gvae_plugins/, every module in them


def module_name(root: Path, path: Path) -> str:
    """gvae/tasks/vae.py -> gvae.tasks.vae; a package's __init__.py -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The known modules that a file imports anywhere in it (function-local imports included):
    `from a.b import c` is a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = [p for package in packages for p in (root / package).rglob("*.py")]
    modules = {module_name(root, p): p for p in files}
    # A package's __init__ importing its own modules is how a package is assembled, not a layer.
    return {m: {d for d in imports_of(p, set(modules))
                if not (p.name == "__init__.py" and d.startswith(m + "."))}
            - {m} for m, p in modules.items()}


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


def test_no_import_cycle_among_gvae_and_its_hydra_plugins():
    graph = import_graph(ROOT)
    assert "hydra_plugins.gvae_plugins.packed_launcher" in graph and "gvae.tasks.sbn" in graph
    assert find_cycle(graph) is None


def test_a_function_local_import_that_closes_a_cycle_is_found(tmp_path):
    (tmp_path / "gvae").mkdir()
    (tmp_path / "gvae" / "a.py").write_text("from gvae.b import x\n")
    (tmp_path / "gvae" / "b.py").write_text("def f():\n    from gvae import a\n")
    assert find_cycle(import_graph(tmp_path, ("gvae",))) == ["gvae.a", "gvae.b", "gvae.a"]


def test_a_cycle_through_a_hydra_plugin_is_found(tmp_path):
    (tmp_path / "gvae").mkdir()
    (tmp_path / "hydra_plugins" / "p").mkdir(parents=True)
    (tmp_path / "gvae" / "train.py").write_text("from hydra_plugins.p.launcher import L\n")
    (tmp_path / "hydra_plugins" / "p" / "launcher.py").write_text("def f():\n    from gvae.train import g\n")
    assert find_cycle(import_graph(tmp_path)) == ["gvae.train", "hydra_plugins.p.launcher", "gvae.train"]


def test_the_schemas_and_primitives_import_nothing_above_them():
    graph = import_graph(ROOT)
    bottom = {"errors": set(), "files": set(), "rng": set(), "roles": set(), "latents": {"rng"},
              "nets": set(), "schedules": {"errors", "roles"}, "data": {"errors", "rng"},
              "objective": set(), "pictures": set()}
    for module, allowed in bottom.items():
        assert graph[f"gvae.{module}"] <= {f"gvae.{a}" for a in allowed}, module


def test_only_the_entry_module_registers_plugins_and_the_launcher_is_below_it():
    graph = import_graph(ROOT)
    importers = {m for m, deps in graph.items() if "hydra_plugins.gvae_plugins.packed_launcher" in deps}
    assert importers == {"gvae.train"}
    assert not any(m == "gvae.train" for deps in graph.values() for m in deps)  # nothing imports the entry
