"""Hook specifications of mft-plugin (pluggy project ``mft_plugin``).

Hooks are for *discovery* and *events*. A plugin contributes strategy classes through the three
``mft_register_*`` hooks (objectives, mitigations, data formats); what a strategy does lives in its methods (see ``mft_plugin.strategy``),
because pluggy calls every implementation of a hook while a run uses only the strategies its YAML
selects. Built-in strategies are an ordinary plugin registered through the ``mft_plugin`` entry
point group, exactly as a third-party package would be.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "mft_plugin"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mft_register_objectives() -> list[type]:
    """Return the :class:`mft_plugin.strategy.Objective` subclasses this plugin provides.

    Called once when the registry is built (before any config is validated, since the YAML's
    ``objective:`` choices come from here).
    """


@hookspec
def mft_register_mitigations() -> list[type]:
    """Return the :class:`mft_plugin.strategy.Mitigation` subclasses this plugin provides.

    Called once when the registry is built.
    """


@hookspec
def mft_register_data_formats() -> list[type]:
    """Return the :class:`mft_plugin.strategy.DataFormat` subclasses this plugin provides.

    Called once when the registry is built: each ``datasets:`` entry's ``type`` is one of their names.
    """


@hookspec
def mft_run_start(config: Any, output_dir: str) -> None:
    """Called after the config is validated and the models are loaded, before the first step.

    For loggers and experiment trackers; the return value is ignored.
    """


@hookspec
def mft_run_end(config: Any, output_dir: str, metrics: dict[str, float]) -> None:
    """Called after training, evaluation and saving, with the metrics written to ``metrics.json``."""
