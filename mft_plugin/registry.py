"""The plugin manager and the name -> strategy lookup built from it.

Entry points are loaded one by one (not with pluggy's ``load_setuptools_entrypoints``) so that a
plugin that fails to import, raises in its hook, returns something that is not a strategy, or
claims a name another plugin already has is *recorded* against its distribution instead of
breaking every run: the run fails only if it selects that very strategy, and ``mft-run --list``
shows the problem.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

from mft_plugin import hookspecs
from mft_plugin.strategy import Mitigation, Objective, Strategy, StrategyParams

ENTRY_POINT_GROUP = "mft_plugin"
Kind = Literal["objective", "mitigation"]
_BASE_CLASS: dict[Kind, type[Strategy]] = {"objective": Objective, "mitigation": Mitigation}
_HOOK_NAME: dict[Kind, str] = {
    "objective": "mft_register_objectives",
    "mitigation": "mft_register_mitigations",
}


class UnknownStrategyError(LookupError):
    """A name that no (working) plugin provides."""


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy and the distribution it comes from."""

    name: str
    kind: Kind
    cls: type[Strategy]
    distribution: str

    @property
    def params_model(self) -> type[StrategyParams]:
        return self.cls.Params


@dataclass(frozen=True)
class PluginProblem:
    """A plugin (or one strategy of it) that could not be used, and why."""

    distribution: str
    message: str
    strategy_name: str | None = None


@dataclass
class Registry:
    """Every usable strategy by kind and name, plus the problems met while collecting them."""

    entries: dict[Kind, dict[str, StrategyEntry]] = field(
        default_factory=lambda: {"objective": {}, "mitigation": {}}
    )
    problems: list[PluginProblem] = field(default_factory=list)
    conflicts: dict[tuple[Kind, str], list[str]] = field(default_factory=dict)

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: Kind, name: str) -> StrategyEntry:
        """The strategy of this kind and name, or an error that lists what is available."""
        if (kind, name) in self.conflicts:
            dists = " and ".join(self.conflicts[(kind, name)])
            raise UnknownStrategyError(
                f"{kind} {name!r} is provided by more than one plugin ({dists}); uninstall one of them"
            )
        if name in self.entries[kind]:
            return self.entries[kind][name]
        broken = [p for p in self.problems if p.strategy_name == name]
        if broken:
            raise UnknownStrategyError(f"{kind} {name!r} is unusable: {broken[0].message}")
        raise UnknownStrategyError(
            f"unknown {kind} {name!r}; available: {', '.join(self.names(kind)) or '(none)'}"
            + "".join(f"\n  (plugin {p.distribution} failed to load: {p.message})" for p in self.problems)
        )

    def add(self, kind: Kind, cls: Any, distribution: str) -> None:
        problem = _strategy_problem(kind, cls)
        name = getattr(cls, "name", None)
        if problem:
            self.problems.append(PluginProblem(distribution, problem, name if isinstance(name, str) else None))
            return
        if (kind, name) in self.conflicts:
            self.conflicts[(kind, name)].append(distribution)
        elif name in self.entries[kind]:
            first = self.entries[kind].pop(name)
            self.conflicts[(kind, name)] = [first.distribution, distribution]
        else:
            self.entries[kind][name] = StrategyEntry(name, kind, cls, distribution)


def _strategy_problem(kind: Kind, cls: Any) -> str | None:
    """Why ``cls`` is not a valid strategy of ``kind``, or None if it is."""
    base = _BASE_CLASS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"returned {cls!r}, which is not a subclass of {base.__module__}.{base.__name__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return f"{cls.__name__} has no valid `name` (got {name!r}; need an identifier string)"
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return f"{cls.__name__}.Params must be a pydantic model (StrategyParams subclass)"
    if "name" in params.model_fields:
        return f"{cls.__name__}.Params may not declare a `name` field (it is the strategy selector)"
    return None


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh PluginManager with our hookspecs and nothing registered yet."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def load_entry_point_plugins(manager: pluggy.PluginManager) -> list[PluginProblem]:
    """Register every ``mft_plugin`` entry point; return the ones that failed to import."""
    problems: list[PluginProblem] = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution = entry_point.dist.name if entry_point.dist else entry_point.value
        if manager.get_plugin(entry_point.name) is not None or manager.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=entry_point.name)
        except Exception as error:  # a broken plugin must not take the others down
            problems.append(PluginProblem(distribution, f"failed to import: {type(error).__name__}: {error}"))
            continue
        _DISTRIBUTIONS[id(plugin)] = distribution
    return problems


# plugin object id -> distribution name, for plugins that came from entry points
_DISTRIBUTIONS: dict[int, str] = {}


def distribution_of(manager: pluggy.PluginManager, plugin: object) -> str:
    """The distribution a plugin came from, or its registered name for inline plugins."""
    return _DISTRIBUTIONS.get(id(plugin)) or manager.get_name(plugin) or repr(plugin)


def collect_strategies(manager: pluggy.PluginManager, problems: list[PluginProblem] | None = None) -> Registry:
    """Ask each registered plugin for its strategies, one implementation at a time."""
    registry = Registry(problems=list(problems or []))
    for kind, hook_name in _HOOK_NAME.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            distribution = distribution_of(manager, impl.plugin)
            try:
                classes = impl.function()
            except Exception as error:
                registry.problems.append(
                    PluginProblem(distribution, f"{hook_name} raised {type(error).__name__}: {error}")
                )
                continue
            if not isinstance(classes, (list, tuple)):
                registry.problems.append(PluginProblem(distribution, f"{hook_name} must return a list, got {classes!r}"))
                continue
            for cls in classes:
                registry.add(kind, cls, distribution)
    return registry


_DEFAULT: tuple[pluggy.PluginManager, Registry] | None = None


def default_registry() -> Registry:
    """The registry of all installed plugins, built once per process."""
    return default_plugin_manager_and_registry()[1]


def default_plugin_manager_and_registry() -> tuple[pluggy.PluginManager, Registry]:
    global _DEFAULT
    if _DEFAULT is None:
        manager = make_plugin_manager()
        problems = load_entry_point_plugins(manager)
        _DEFAULT = (manager, collect_strategies(manager, problems))
    return _DEFAULT


def build_strategy(registry: Registry, kind: Kind, name: str, **params: Any) -> Strategy:
    """Instantiate a strategy by name with validated parameters."""
    entry = registry.get(kind, name)
    return entry.cls(**params)


def strategy_listing(registry: Registry) -> list[dict[str, Any]]:
    """Rows for ``mft-run --list``: name, kind, distribution, parameters with their defaults."""
    rows = []
    for kind in ("objective", "mitigation"):
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            params = {
                key: (None if f.is_required() else f.get_default(call_default_factory=True))
                for key, f in entry.params_model.model_fields.items()
            }
            rows.append({"name": name, "kind": kind, "distribution": entry.distribution, "params": params})
    return rows
