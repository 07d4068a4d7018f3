"""``MFTPlugin``: the Axolotl ``BasePlugin`` (Axolotl 0.19's interface) that runs MFT in ``axolotl train``.

Hooks used, in the order Axolotl calls them: ``get_input_args`` (our keys join Axolotl's
schema), ``register`` (the strategies are built and checked against the rest of the config,
before any data or weights load; the best-checkpoint keys are set), ``load_datasets`` (Axolotl's own
datasets, composed by a data-stage mitigation such as replay), ``get_trainer_cls`` (the MFT
trainer on top of Axolotl's; with ``teacher_cache:`` it builds the cache when created), ``post_trainer_create`` (the base perplexities, cached in ``base_perplexity.json`` under mft-run's
key of the evaluation rows and the base, mitigations' ``on_train_begin``, and the startup line in Axolotl's log), ``post_train`` (``metrics.json``
as mft-run writes it, from the same code: :func:`mft_plugin.train.outputs.final_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from mft_plugin.axolotl.bridge import (
    NO_KV_CACHE,
    announcement,
    axolotl_teacher_cache,
    best_checkpoint_keys,
    composed_training_set,
    config_view,
    data_stage,
    evaluation_sets,
    loss_chooser,
    plugin_args,
    refusal,
    required_keys,
    resolved_config,
    run_config,
    run_context,
    scheduled_steps,
    trainer_class,
)
from mft_plugin.registry import default_registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.train.budget import Budget
from mft_plugin.train.engine import Engine
from mft_plugin.train.outputs import final_metrics, load_base_perplexities, save_base_perplexities, write_run_files
from mft_plugin.train.recipe import build_strategies
from mft_plugin.train.trainer import MFTTrainer

LOG = logging.getLogger("axolotl.integrations.mft_plugin")  # under Axolotl's logger: in its log, rank 0
TRAIN_METRICS = "train_runtime"  # the Trainer's last log entry, its TrainOutput metrics, has this key


def teacher_loader(cfg: Any) -> Callable[[PreTrainedModel, PreTrainedTokenizerBase | None], PreTrainedModel]:
    """Full finetuning's teacher, built by Axolotl's own ``ModelLoader`` as it builds the student (its added
    tokens and embedding resize, attention implementation, dtype, quantization, config and RoPE overrides) and
    as it builds DPO's reference model (``reference_model=True``: no adapter), without a KV cache
    (:data:`NO_KV_CACHE`). A bare ``from_pretrained(base_model)`` would differ from the student's base
    wherever Axolotl changed it: with ``tokens`` added, a vocabulary of another size."""
    from axolotl.loaders import ModelLoader

    def load(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedModel:
        teacher, _ = ModelLoader(cfg, tokenizer, reference_model=True).load()
        teacher.config.update(NO_KV_CACHE)
        return teacher

    return load


class MFTPlugin(BasePlugin):
    """``plugins: [mft_plugin.axolotl.MFTPlugin]`` plus ``objective:``/``mitigations:`` keys."""

    def __init__(self) -> None:
        super().__init__()
        self.args: BaseModel | None = None
        self.objective: Objective | None = None
        self.mitigations: list[Mitigation] = []
        self.trainer: MFTTrainer | None = None

    def get_input_args(self) -> str:
        return "mft_plugin.axolotl.MFTArgs"

    def register(self, cfg: dict[str, Any]) -> None:
        registry = default_registry()
        self.args = plugin_args(cfg, registry)
        self.objective, self.mitigations = build_strategies(self.args, registry)  # type: ignore[arg-type]
        if problem := refusal(cfg, self.mitigations):
            raise problem  # before any data or weights load; `mft-run axolotl` says it in one line, exit 2
        for key, (value, _) in required_keys(cfg, self.mitigations).items():
            cfg[key] = value
        for key, value in best_checkpoint_keys(cfg).items():
            cfg[key] = value

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        """Axolotl's own datasets, then the data-stage mitigations' composition (replay), as mft-run composes
        its training set; the steps Axolotl schedules are counted as Axolotl counts them without packing
        (:func:`mft_plugin.axolotl.bridge.scheduled_steps`), over the rows one composed epoch draws. None
        (Axolotl loads as usual) without such a mitigation, and for ``axolotl preprocess``."""
        if preprocess or not data_stage(self.mitigations):
            return None
        from axolotl.common.datasets import TrainDatasetMeta, load_datasets
        from axolotl.loaders import load_tokenizer

        meta = load_datasets(cfg=cfg)
        train, epoch_rows = composed_training_set(cfg, self.mitigations, meta.train_dataset, load_tokenizer(cfg))
        total_num_steps = scheduled_steps(cfg, epoch_rows)
        LOG.info("mft_plugin.axolotl.MFTPlugin: training set composed by %s: %d rows, %d per epoch, %d steps",
                 [m.name for m in data_stage(self.mitigations)], len(train), epoch_rows, total_num_steps)  # fmt: skip
        return TrainDatasetMeta(train_dataset=train, eval_dataset=meta.eval_dataset, total_num_steps=total_num_steps)

    def get_trainer_cls(self, cfg: Any) -> type[Trainer]:
        from axolotl.core.trainers.base import AxolotlTrainer

        engine = Engine.from_config(config_view(cfg))  # the teacher is sharded as Axolotl shards the student
        sets = lambda tokenizer, spec: evaluation_sets(self.args, cfg, tokenizer, spec)  # noqa: E731
        budget = Budget(cfg.get("max_degeneralization"), cfg.get("target_specialization"))
        chooser = loss_chooser(cfg, self.args, self.objective)
        cache = axolotl_teacher_cache(cfg, self.args)  # built by the trainer from Axolotl's training set, before the first step
        return trainer_class(AxolotlTrainer, self.objective, self.mitigations, teacher_loader(cfg), engine, sets, budget, chooser, cache)

    def post_trainer_create(self, cfg: Any, trainer: Trainer) -> None:
        self.trainer = trainer  # type: ignore[assignment]
        out, sets, config = Path(cfg["output_dir"]), trainer.eval_sets, run_config(cfg, self.args)  # type: ignore[arg-type, attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        trainer.set_base_perplexities(  # type: ignore[attr-defined]
            load_base_perplexities(out, config, sets),  # mft-run's cache, under the same key of the rows and the base
            lambda measured: save_base_perplexities(out, config, sets, measured) if trainer.is_world_process_zero() else None,
        )
        context = run_context(cfg, trainer.processing_class)
        for mitigation in self.mitigations:
            mitigation.on_train_begin(trainer.model, context)
        LOG.info(announcement(trainer))  # type: ignore[arg-type]

    def post_train(self, cfg: Any, model: Any) -> None:
        trainer, self.trainer = self.trainer, None  # Axolotl 0.19 calls post_train twice: write once
        if trainer is None or self.args is None:
            return
        train_metrics = next(
            ({k: v for k, v in entry.items() if k != "step"} for entry in reversed(trainer.state.log_history) if TRAIN_METRICS in entry), {}
        )
        metrics = final_metrics(trainer, train_metrics)
        trainer.save_state()  # trainer_state.json: every evaluation, for the curves of `mft-run report`
        if trainer.is_world_process_zero():
            write_run_files(Path(cfg["output_dir"]), resolved_config(cfg, self.args), metrics)
            LOG.info("mft_plugin.axolotl.MFTPlugin: metrics.json written to %s: %s", cfg["output_dir"], metrics)
