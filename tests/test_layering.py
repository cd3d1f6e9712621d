"""The layers stay layered: no module imports from a layer above its own.

From the bottom: the generic core (``aurora_loop/*.py``, ``parallel/``, ``callbacks/base.py``),
the model (``model/``), the data layer (``datasets/``), weather science (``weather/``), the
weather tasks (``tasks/``), the callbacks that plug into the loop, inference (``inference/``)
and the command line (``cli/``). Every import counts, including ones inside functions and
under ``TYPE_CHECKING``: a lazy import is still a dependency. docs/architecture.md states the
same rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> source directory (setup.cfg's package_dir).
SOURCES = {"aurora_loop": ROOT / "aurora_loop", "aurora_loop.callbacks": ROOT / "callbacks", "aurora_loop.datasets": ROOT / "datasets"}
LAYERS = ("core", "model", "datasets", "weather", "tasks", "callbacks", "inference", "cli")
# What each layer may import besides itself; the model stands alone but for the core's errors.
ALLOWED = {
    "core": set(),
    "model": {"core:aurora_loop.errors"},
    "datasets": {"core", "model"},
    "weather": {"core", "model", "datasets"},
    "tasks": {"core", "model", "datasets", "weather"},
    "callbacks": {"core", "model", "datasets", "weather", "tasks"},
    "inference": {"core", "model", "datasets", "weather", "tasks"},
    "cli": set(LAYERS),
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "parallel":
        return "core"
    if parts[1] == "callbacks":
        return "core" if parts[2:3] in ([], ["base"]) else "callbacks"
    return parts[1] if parts[1] in LAYERS else "core"


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = [p for p in path.relative_to(directory).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "aurora_loop" or name.startswith("aurora_loop.")}


def allowed(importer: str, imported: str) -> bool:
    source, target = layer_of(importer), layer_of(imported)
    if source == target:
        return True
    rules = ALLOWED[source]
    return target in rules or f"{target}:{imported}" in rules


def test_no_module_imports_from_a_layer_above_it():
    violations = [
        f"{module} ({layer_of(module)}) imports {imported} ({layer_of(imported)})"
        for module, path in modules().items()
        for imported in sorted(imports_of(path))
        if not allowed(module, imported)
    ]
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_the_layer_map_sees_every_layer():
    """The check above is only as good as the map: every layer holds modules, and the core
    really imports something (so the import scan works)."""
    found = modules()
    assert {layer_of(m) for m in found} == set(LAYERS)
    assert "aurora_loop.callbacks.base" in found and layer_of("aurora_loop.callbacks.base") == "core"
    assert any(imports_of(found["aurora_loop.trainer"]))


def test_a_violation_is_caught(tmp_path):
    """The rule rejects what it is meant to reject: the core reaching up into the weather layer,
    even lazily inside a function."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from aurora_loop.weather.losses import aurora_loss\n")
    (imported,) = imports_of(module)
    assert not allowed("aurora_loop.trainer", imported)
    assert allowed("aurora_loop.tasks.aurora", imported)
    assert not allowed("aurora_loop.inference.forecast", "aurora_loop.cli.train")
