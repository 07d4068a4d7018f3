"""``MFTPlugin``: the Axolotl ``BasePlugin`` (Axolotl 0.19's interface) that runs MFT in ``axolotl train``.

Hooks used, in the order Axolotl calls them: ``get_input_args`` (our keys join Axolotl's
schema), ``register`` (the strategies are built and checked against the rest of the config,
before any data or weights load), ``get_trainer_cls`` (the MFT trainer on top of Axolotl's),
``post_trainer_create`` (mitigations' ``on_train_begin``, e.g. EWC's Fisher).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import Trainer

from mft_plugin.axolotl.bridge import (
    config_view,
    frozen_copy_loader,
    run_context,
    selected_strategies,
    trainer_class,
    unsupported,
)
from mft_plugin.registry import default_registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.train.engine import Engine


class MFTPlugin(BasePlugin):
    """``plugins: [mft_plugin.axolotl.MFTPlugin]`` plus ``objective:``/``mitigations:`` keys."""

    def __init__(self) -> None:
        super().__init__()
        self.objective: Objective | None = None
        self.mitigations: list[Mitigation] = []

    def get_input_args(self) -> str:
        return "mft_plugin.axolotl.MFTArgs"

    def register(self, cfg: dict[str, Any]) -> None:
        self.objective, self.mitigations = selected_strategies(cfg, default_registry())
        problems = unsupported(cfg, self.mitigations)
        if problems:
            raise ValueError("mft_plugin.axolotl.MFTPlugin:\n  " + "\n  ".join(problems))

    def get_trainer_cls(self, cfg: Any) -> type[Trainer]:
        from axolotl.core.trainers.base import AxolotlTrainer

        engine = Engine.from_config(config_view(cfg))  # the teacher is sharded as Axolotl shards the student
        return trainer_class(AxolotlTrainer, self.objective, self.mitigations, frozen_copy_loader(cfg), engine)

    def post_trainer_create(self, cfg: Any, trainer: Trainer) -> None:
        context = run_context(cfg, trainer.processing_class)
        for mitigation in self.mitigations:
            mitigation.on_train_begin(trainer.model, context)
