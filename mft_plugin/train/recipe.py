"""One training run, top to bottom: config -> data -> model -> teacher -> Trainer -> outputs.

The order in which mitigations act is fixed here and only here: data stage, then model stage,
then (inside the Trainer's loss) their penalties.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments, set_seed

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.documents import load_all_documents, pack_documents, split_documents
from mft_plugin.eval.metrics import GENERAL, SPEC
from mft_plugin.files import atomic_write_text
from mft_plugin.loss.chunked import select_loss_impl
from mft_plugin.models.loading import load_frozen_teacher, load_model, load_tokenizer, save_merged_model
from mft_plugin.registry import Registry, default_registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher.cache import cached_teacher
from mft_plugin.teacher.sources import build_teacher
from mft_plugin.train.budget import Budget
from mft_plugin.train.checkpoints import resume_target
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.engine import Engine
from mft_plugin.train.outputs import (
    METRICS_FILE,
    best_evaluation,
    load_base_perplexities,
    prepare_output_dir,
    save_base_perplexities,
)
from mft_plugin.train.safety import SKIPPED_KEY, skipped_steps
from mft_plugin.train.signals import StopOnSignal, TrainingInterrupted
from mft_plugin.train.trainer import MFTTrainer

EVALUATIONS_PER_RUN = 10
SPEC_METRIC = f"eval_{SPEC}_ppl"
MERGED_DIR = "merged"  # merge_adapter: the adapter merged into the base, a plain transformers model


def build_strategies(config: MFTConfigBase, registry: Registry) -> tuple[Objective, list[Mitigation]]:
    objective = registry.get("objective", config.objective.name).cls(config.objective)
    mitigations = [registry.get("mitigation", spec.name).cls(spec) for spec in config.mitigations]
    return objective, mitigations  # type: ignore[return-value]


def build_datasets(config: MFTConfigBase, context: RecipeContext) -> tuple[Dataset, dict[str, Dataset]]:
    """Packed training blocks and the evaluation sets (``spec`` and ``general`` when configured)."""
    documents, held_out = split_documents(load_all_documents(config.datasets), config.val_set_size, config.seed)
    if config.test_datasets:
        held_out = load_all_documents(config.test_datasets)
    pack = lambda docs: pack_documents(docs, context.tokenizer, config.sequence_len)  # noqa: E731
    eval_sets = {SPEC: pack(held_out)} if held_out is not None else {}
    if config.general_eval_datasets:
        eval_sets[GENERAL] = context.packed_blocks(config.general_eval_datasets)
    return pack(documents), eval_sets


def training_arguments(
    config: MFTConfigBase, train_blocks: int, evaluate: bool, engine: Engine | None = None
) -> TrainingArguments:
    """Axolotl-style keys mapped onto ``TrainingArguments`` (best checkpoint by spec perplexity)."""
    steps_per_epoch = math.ceil(math.ceil(train_blocks / config.micro_batch_size) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
    # save_steps alone: evaluate at each save, since the best checkpoint is chosen among evaluated ones
    eval_steps = config.eval_steps or config.save_steps or max(1, total_steps // EVALUATIONS_PER_RUN)
    report_to = (["wandb"] if config.wandb_project else []) + (["tensorboard"] if config.use_tensorboard else [])
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps or config.warmup_ratio,
        optim=config.optimizer,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        fp16=config.fp16,
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps or eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=evaluate,
        metric_for_best_model=SPEC_METRIC if evaluate else None,
        greater_is_better=False if evaluate else None,
        report_to=report_to,
        run_name=config.wandb_name,
        project=config.wandb_project or "huggingface",
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        **(engine or Engine.from_config(config)).trainer_arguments(),  # DDP, FSDP2 or DeepSpeed; gloo without a GPU
    )


def run(config: MFTConfigBase, registry: Registry | None = None) -> dict[str, Any]:
    """Train as ``config`` says; write the model, the resolved config and ``metrics.json``.

    ``registry`` must be the one that validated ``config`` (default: the installed plugins).
    """
    registry = registry or default_registry()
    plugin_manager = registry.plugin_manager
    objective, mitigations = build_strategies(config, registry)
    output_dir = prepare_output_dir(config)
    set_seed(config.seed)

    tokenizer = load_tokenizer(config)
    engine = Engine.from_config(config)
    context = RecipeContext(config=config, tokenizer=tokenizer, output_dir=output_dir)
    train_blocks, eval_sets = build_datasets(config, context)
    for mitigation in mitigations:  # 1. data stage
        train_blocks = mitigation.prepare_data(train_blocks, context)

    # Before any weights load: under DeepSpeed ZeRO-3 from_pretrained then partitions them as they load.
    args = training_arguments(config, len(train_blocks), evaluate=SPEC in eval_sets, engine=engine)
    model: PreTrainedModel = load_model(config)
    for mitigation in mitigations:  # 2. model stage
        model = mitigation.prepare_model(model, context)
    chunked_loss = select_loss_impl(config, objective, model)  # loss_impl; fails here if it cannot apply
    collator = PaddingCollator(tokenizer.pad_token_id)
    own_dtype = config.teacher is not None and "dtype" in config.teacher.model_fields_set  # else the run's precision
    make_teacher = lambda: build_teacher(objective.needs_teacher, model, lambda: load_frozen_teacher(config), own_dtype)  # noqa: E731
    if config.teacher_cache is not None and objective.needs_teacher:  # p^T read from disk: no teacher model in memory
        teacher, train_blocks = cached_teacher(config, train_blocks, make_teacher, collator, args, model)
    else:
        teacher = make_teacher()

    trainer = MFTTrainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_sets.get(SPEC),  # the Trainer wants one; evaluate() uses all eval_sets
        data_collator=collator,
        processing_class=tokenizer,
        objective=objective,
        teacher=teacher,
        mitigations=mitigations,  # 3. loss stage: their penalties join the objective's loss
        eval_sets=eval_sets,
        skip_nonfinite_batches=config.skip_nonfinite_batches,
        budget=Budget.from_config(config),  # stops training, and bounds the choice of the final checkpoint
        chunked_loss=chunked_loss,
        engine=engine,  # places the teacher, and says when the base is measured
    )
    trainer.set_base_perplexities(  # measured once; cached for resumed runs and sweep siblings
        load_base_perplexities(output_dir, config), lambda measured: save_base_perplexities(output_dir, config, measured)
    )
    for mitigation in mitigations:
        mitigation.on_train_begin(trainer.model, context)
    plugin_manager.hook.mft_run_start(config=config, output_dir=str(output_dir))

    train_metrics = _train(trainer, config, output_dir)
    trainer.save_model(str(output_dir))  # with an adapter: the adapter alone, in peft's format
    if config.merge_adapter and trainer.is_world_process_zero():
        save_merged_model(config, output_dir, output_dir / MERGED_DIR)
    trainer.save_state()  # trainer_state.json: every evaluation, for the curves of `mft-run report`
    metrics = _final_metrics(trainer, train_metrics)
    if trainer.is_world_process_zero():
        atomic_write_text(output_dir / "config.yml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        atomic_write_text(output_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plugin_manager.hook.mft_run_end(config=config, output_dir=str(output_dir), metrics=metrics)
    return metrics


def _train(trainer: MFTTrainer, config: MFTConfigBase, output_dir: Path) -> dict[str, float]:
    """Train, resuming from a complete checkpoint if asked; the Trainer's training metrics.

    SIGINT/SIGTERM during training save a checkpoint after the current step, then raise
    :class:`TrainingInterrupted` (no final model nor ``metrics.json``: the run is not finished).
    """
    stop = StopOnSignal()
    trainer.add_callback(stop)
    with stop.installed():
        checkpoint = resume_target(config.resume_from_checkpoint, output_dir, main_process=trainer.args.should_save)
        result = trainer.train(resume_from_checkpoint=checkpoint)
    step = trainer.state.global_step
    if stop.stopped and step < trainer.state.max_steps:
        saved = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        raise TrainingInterrupted(stop.received or signal.SIGTERM, step, str(saved))
    return result.metrics


def _final_metrics(trainer: MFTTrainer, train_metrics: dict[str, float]) -> dict[str, Any]:
    """Base perplexities, the selected (best) evaluation with its S/DG/DG/S, and training stats."""
    metrics: dict[str, Any] = {f"base_{k}_ppl": v for k, v in trainer.base_perplexities.items()}
    metrics.update(train_metrics)
    metrics[SKIPPED_KEY] = skipped_steps(trainer.state.log_history)
    best = best_evaluation(trainer.state.log_history, trainer.state.best_model_checkpoint)
    if best is None and trainer.eval_sets:  # no evaluation, or none within the budget: the final model's
        best = trainer.paper_evaluation()
    metrics.update(best or {})
    evaluations = [entry for entry in trainer.state.log_history if SPEC_METRIC in entry]
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    if evaluations and stopped_early and (reason := trainer.budget.stop_reason(evaluations[-1])):
        metrics["stopped_by"] = reason  # max_degeneralization or target_specialization
    if best and trainer.budget.max_degeneralization is not None:
        metrics["within_budget"] = trainer.budget.admits(best)
    return metrics
