"""mft-plugin: minifinetuning (corrective self-distillation) on the Hugging Face stack.

Public API: :func:`get_objective`, :func:`get_mitigation`, :func:`load_config`, :func:`run`.
Attributes are resolved lazily (PEP 562) so that ``mft-run`` can validate a YAML before torch
and transformers are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mft_plugin.config.errors import ConfigError, load_config
    from mft_plugin.registry import Registry
    from mft_plugin.strategy import Mitigation, Objective

__all__ = ["ConfigError", "Mitigation", "Objective", "get_mitigation", "get_objective", "load_config", "run"]


def get_objective(name: str, **params: Any) -> Objective:
    """An objective by registered name, e.g. ``get_objective("mft", tau=0.25)``."""
    from mft_plugin.registry import default_registry

    return default_registry().get("objective", name).cls(**params)  # type: ignore[return-value]


def get_mitigation(name: str, **params: Any) -> Mitigation:
    """A mitigation by registered name, e.g. ``get_mitigation("replay", ratio=0.5, ...)``."""
    from mft_plugin.registry import default_registry

    return default_registry().get("mitigation", name).cls(**params)  # type: ignore[return-value]


def run(config: Any, registry: Registry | None = None) -> dict[str, Any]:
    """Train as the validated config says; return the final metrics (also in ``metrics.json``).

    Pass the ``registry`` given to :func:`load_config` when it was not the default one.
    """
    from mft_plugin.train.recipe import run as run_recipe

    return run_recipe(config, registry)


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "load_config"):
        from mft_plugin.config import errors as config_errors

        return getattr(config_errors, name)
    if name in ("Mitigation", "Objective"):
        from mft_plugin import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'mft_plugin' has no attribute {name!r}")
