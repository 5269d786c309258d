"""The folders are the layers (docs/architecture.md): each may import only the ones below it.

config, jsonio, storage  <  model  <  algo  <  run  <  tools  <  distributed  <  service, cli
and api/ only through the service and the config types. Read from the source (ast), so a lazy
import inside a function counts too, except where a layer may reach up lazily: the run layer
starts the Ray backend a run asks for, and the CLI its commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dmsae_ray"
FOUNDATION = {"config", "jsonio", "storage"}
ORDER = ["model", "algo", "run", "tools", "distributed"]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every import in ``path``, absolute names."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            base = node.module
            # `from dmsae_ray import service` imports the module dmsae_ray.service
            names = [f"{base}.{a.name}" for a in node.names] if base == "dmsae_ray" else [base]
            found += [(n, id(node) in top) for n in names]
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dmsae_ray" or len(parts) < 2:
        return None
    return parts[1]


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


@pytest.mark.parametrize("layer", ORDER[:-1])
def test_no_layer_below_distributed_imports_ray_at_load(layer):
    for path in modules(layer):
        for name, top in imports(path):
            lazy_ok = layer in ("run",) and not top
            if name == "ray" or name.startswith("ray."):
                assert lazy_ok, f"{path.relative_to(REPO)} imports {name}"


@pytest.mark.parametrize("layer", ["model", "algo"])
def test_the_algorithm_and_model_never_touch_ray(layer):
    for path in modules(layer):
        for name, _ in imports(path):
            assert name.split(".")[0] != "ray", f"{path.relative_to(REPO)} imports {name}"


@pytest.mark.parametrize("layer", ORDER)
def test_each_layer_imports_only_the_layers_below(layer):
    allowed = FOUNDATION | set(ORDER[: ORDER.index(layer) + 1]) | {"__version__"}
    for path in modules(layer):
        for name, top in imports(path):
            other = layer_of(name)
            if other is None or other in allowed:
                continue
            # the run layer starts the backend a run asks for (Ray), when it asks
            if layer == "run" and other == "distributed" and not top:
                continue
            raise AssertionError(f"{path.relative_to(REPO)} imports {name} ({other} > {layer})")


def test_foundation_modules_import_no_layer():
    for stem in FOUNDATION:
        for name, _ in imports(PACKAGE / f"{stem}.py"):
            other = layer_of(name)
            assert other is None or other in FOUNDATION, f"{stem}.py imports {name}"


def test_api_imports_only_the_service_and_config_types():
    for path in sorted((REPO / "api").glob("*.py")):
        for name, _ in imports(path):
            if name.startswith("dmsae_ray"):
                assert name in ("dmsae_ray.service", "dmsae_ray.config"), (
                    f"{path.relative_to(REPO)} imports {name}"
                )


def test_no_module_is_left_flat_outside_the_layers():
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat == FOUNDATION | {"__init__", "service", "cli"}
