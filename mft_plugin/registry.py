"""The plugin manager and the name -> strategy lookup built from it.

Entry points are loaded one by one (not with pluggy's ``load_setuptools_entrypoints``) so that a
plugin that fails to import, raises in its hook, returns something that is not a strategy, or
claims a name another plugin already has is *recorded* against its distribution instead of
breaking every run: the run fails only if it selects that very strategy, and ``mft-run --list``
shows the problem.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

from mft_plugin import hookspecs
from mft_plugin.strategy import DataFormat, Mitigation, Objective, Strategy, StrategyParams

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mft_plugin"
Kind = Literal["objective", "mitigation", "format"]
_BASE_CLASS: dict[Kind, type[Strategy]] = {"objective": Objective, "mitigation": Mitigation, "format": DataFormat}
_HOOK_NAME: dict[Kind, str] = {
    "objective": "mft_register_objectives",
    "mitigation": "mft_register_mitigations",
    "format": "mft_register_data_formats",
}


class UnknownStrategyError(LookupError):
    """A name that no (working) plugin provides."""


def suggestion(word: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or "" (for misspelled names and keys)."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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
    """Every usable strategy by kind and name, plus the problems met while collecting them.

    It keeps the plugin manager it was collected from: a run resolves its strategies and calls
    its event hooks (``mft_run_start``/``mft_run_end``) through the same plugins that validated
    its config.
    """

    plugin_manager: PluginManager
    entries: dict[Kind, dict[str, StrategyEntry]] = field(
        default_factory=lambda: {kind: {} for kind in _BASE_CLASS}
    )
    problems: list[PluginProblem] = field(default_factory=list)
    conflicts: dict[tuple[Kind, str], list[str]] = field(default_factory=dict)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of an event hook (``mft_run_start``/``mft_run_end``), each isolated.

        A logger plugin whose hook raises must not fail (nor, at the end, undo) a run: its error is
        logged naming its distribution and the other implementations still run.
        """
        for impl in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as error:  # noqa: BLE001 (an observer's failure is reported, not fatal)
                distribution = self.plugin_manager.distribution_of(impl.plugin)
                logger.error("plugin %s: %s raised %s: %s (ignored)", distribution, hook_name, type(error).__name__, error)

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
            problem = broken[0]
            raise UnknownStrategyError(f"{kind} {name!r} is unusable: plugin {problem.distribution}: {problem.message}")
        raise UnknownStrategyError(
            f"unknown {kind} {name!r}; available: {', '.join(self.names(kind)) or '(none)'}"
            + suggestion(str(name), self.names(kind))
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
    try:  # an undefined annotation would break every config's validation, a raising default the listing
        params.model_rebuild()
        [f.get_default(call_default_factory=True) for f in params.model_fields.values() if not f.is_required()]
    except Exception as error:
        return f"{cls.__name__}.Params cannot be used: {type(error).__name__}: {str(error).splitlines()[0]}"
    return None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with our hookspecs, remembering the distribution of each entry-point plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}  # registered plugin name -> distribution name

    def distribution_of(self, plugin: object) -> str:
        """The distribution a plugin came from, or its registered name for inline plugins."""
        name = self.get_name(plugin) or repr(plugin)
        return self.distributions.get(name, name)


def make_plugin_manager() -> PluginManager:
    """A fresh PluginManager with our hookspecs and nothing registered yet."""
    return PluginManager()


def load_entry_point_plugins(
    manager: PluginManager, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None
) -> list[PluginProblem]:
    """Register each ``mft_plugin`` entry point (default: all installed); return the ones that failed.

    Unlike pluggy's loader, an entry point whose name is already taken by another plugin is
    reported, not silently skipped.
    """
    problems: list[PluginProblem] = []
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in entry_points:
        distribution = entry_point.dist.name if entry_point.dist else entry_point.value
        if manager.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        # a broken plugin must not take the others down, not even one calling sys.exit or raising
        # KeyboardInterrupt at import (a Ctrl-C at that moment is the user's, but cannot be told apart)
        except (Exception, SystemExit, KeyboardInterrupt) as error:
            problems.append(PluginProblem(distribution, f"failed to import: {type(error).__name__}: {error}"))
            continue
        registered = manager.get_plugin(entry_point.name)
        if registered is plugin or manager.is_registered(plugin):
            continue  # loaded before (under this or another entry point name)
        if registered is not None:
            message = f"entry point name {entry_point.name!r} is taken by {manager.distribution_of(registered)}"
            problems.append(PluginProblem(distribution, message))
            continue
        try:
            manager.register(plugin, name=entry_point.name)
        except pluggy.PluginValidationError as error:  # e.g. a hook implementation with a wrong signature
            message = "; ".join(str(error).splitlines())  # pluggy's message spans three lines
            problems.append(PluginProblem(distribution, f"invalid hook implementation: {message}"))
            continue
        manager.distributions[entry_point.name] = distribution
    return problems


def collect_strategies(manager: PluginManager, problems: list[PluginProblem] | None = None) -> Registry:
    """Ask each registered plugin for its strategies, one implementation at a time."""
    registry = Registry(manager, problems=list(problems or []))
    for kind, hook_name in _HOOK_NAME.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            distribution = manager.distribution_of(impl.plugin)
            try:
                classes = impl.function()
            except Exception as error:
                registry.problems.append(
                    PluginProblem(distribution, f"{hook_name} raised {type(error).__name__}: {error}")
                )
                continue
            if not isinstance(classes, (list, tuple)):
                message = f"{hook_name} must return a list, got {classes!r}"
                registry.problems.append(PluginProblem(distribution, message))
                continue
            for cls in classes:
                registry.add(kind, cls, distribution)
    return registry


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The registry of all installed plugins (with their plugin manager), built once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        manager = make_plugin_manager()
        _DEFAULT = collect_strategies(manager, load_entry_point_plugins(manager))
    return _DEFAULT


def strategy_listing(registry: Registry) -> list[dict[str, Any]]:
    """Rows for ``mft-run --list``: name, kind, distribution, parameters with their defaults."""
    rows = []
    for kind in _BASE_CLASS:
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            params = {
                key: (None if f.is_required() else f.get_default(call_default_factory=True))
                for key, f in entry.params_model.model_fields.items()
            }
            rows.append({"name": name, "kind": kind, "distribution": entry.distribution, "params": params})
    return rows
