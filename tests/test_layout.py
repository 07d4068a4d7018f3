"""The package's layout tells the story of a run: no stage imports a later one, and nothing imports in a circle.

Every import counts, at module level, inside a function or under ``TYPE_CHECKING``: a cycle through
a lazy import is still a cycle for whoever reads or moves the code (README "Layout").
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.tiny import REPO

PACKAGE = REPO / "mft_plugin"
# The plugin contract first, then the stages of one run in order, then what drives runs.
STAGES = [
    {"strategy", "hookspecs", "registry", "files"},
    {"config"},
    {"data"},
    {"models"},
    {"digest"},  # the key of every cache: the rows and the model as it is held (config, files, precision)
    {"teacher"},
    {"loss"},
    {"eval"},
    {"train"},
    {"report"},
    {"sweep"},
    {"axolotl"},
    {"cli"},
    {"__init__"},
]
# Declared interfaces that reach down the story: the contract's default loss is the paper's formula.
DECLARED = {("mft_plugin.strategy", "mft_plugin.loss.corrected")}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every ``mft_plugin`` module ``path`` imports, wherever the import statement stands
    (``from mft_plugin.loss import corrected`` imports ``mft_plugin.loss.corrected``, not the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mft_plugin"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mft_plugin"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(modules)) & set(modules) - {name} for name, path in modules.items()}


def stage(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return next(index for index, names in enumerate(STAGES) if top in names)


def test_every_module_belongs_to_a_stage() -> None:
    for module in graph():
        assert stage(module) >= 0, module


def test_no_module_imports_a_later_stage() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if stage(target) > stage(module) and (module, target) not in DECLARED
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_core_never_names_a_concrete_strategy() -> None:
    """Built-ins register through entry points like any plugin; the core talks to the registry only."""
    named = [str(path) for path in PACKAGE.rglob("*.py") if "mft_plugin.strategies" in path.read_text(encoding="utf-8")]
    assert named == []
