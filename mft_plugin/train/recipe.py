"""One training run, top to bottom: config -> data -> model -> teacher -> Trainer -> outputs.

The order in which mitigations act is fixed here and only here: data stage, then model stage,
then (inside the Trainer's loss) their penalties.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments, set_seed
from transformers.utils.import_utils import is_torch_tf32_available

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.packing import Records, lay_out, split_records, without_exact_duplicates
from mft_plugin.data.prepared import TRAIN, prepared_datasets
from mft_plugin.digest import data_key
from mft_plugin.eval.metrics import GENERAL, SPEC
from mft_plugin.loss.chunked import select_loss_impl
from mft_plugin.models.attention import check_packing
from mft_plugin.models.freezing import freeze_except
from mft_plugin.models.loading import (
    load_frozen_teacher,
    load_model,
    load_tokenizer,
    mixed_precision,
    save_merged_model,
)
from mft_plugin.registry import Registry, default_registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher.cache import plan_cache
from mft_plugin.teacher.sources import build_teacher
from mft_plugin.train.budget import Budget
from mft_plugin.train.checkpoints import is_final, restore_final, resume_target
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.engine import Engine
from mft_plugin.train.outputs import (
    SPEC_METRIC,
    begin_run,
    exclusive_output_dir,
    final_metrics,
    load_base_perplexities,
    prepare_output_dir,
    save_base_perplexities,
    write_run_files,
)
from mft_plugin.train.safety import check_finite_weights
from mft_plugin.train.signals import StopOnSignal, TrainingInterrupted
from mft_plugin.train.stopping import stopping_callbacks
from mft_plugin.train.trainer import MFTTrainer

logger = logging.getLogger(__name__)

EVALUATIONS_PER_RUN = 10
# transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name stays an alias
# until v6); our floor, 5.16 (Axolotl 0.19's), knows only the old one
CHECKPOINTING_ARGUMENT = next(
    name for name in ("activation_checkpointing", "gradient_checkpointing") if name in TrainingArguments.__dataclass_fields__
)
MERGED_DIR = "merged"  # merge_adapter: the adapter merged into the base, a plain transformers model


def build_strategies(config: MFTConfigBase, registry: Registry) -> tuple[Objective, list[Mitigation]]:
    objective = registry.get("objective", config.objective.name).cls(config.objective)
    mitigations = [registry.get("mitigation", spec.name).cls(spec) for spec in config.mitigations]
    return objective, mitigations  # type: ignore[return-value]


def build_datasets(config: MFTConfigBase, context: RecipeContext) -> tuple[Dataset, dict[str, Dataset]]:
    """Training rows and the evaluation sets: ``spec`` in the format (and masking) of its entries,
    ``general`` raw text, as the paper measures it (Sec. 3.1). Cached in ``dataset_prepared_path``."""

    def build() -> dict[str, Dataset]:
        def read(group: str) -> Records:  # Axolotl deduplicates before the val_set_size split, and each split
            records = context.records(getattr(config, group))
            return without_exact_duplicates(records, group) if config.dataset_exact_deduplication else records

        records, held_out = split_records(read("datasets"), config.val_set_size, config.seed)
        if config.test_datasets:
            held_out = read("test_datasets")
        eval_packing = config.sample_packing if config.eval_sample_packing is None else config.eval_sample_packing
        built = {TRAIN: lay_out(records, config.sequence_len, config.sample_packing)}
        if held_out is not None:
            held_out_name = "test_datasets" if config.test_datasets else "val_set_size"
            built[SPEC] = lay_out(held_out, config.sequence_len, eval_packing, held_out_name)
        if config.general_eval_datasets:
            built[GENERAL] = context.packed_blocks(config.general_eval_datasets)
        return built

    datasets = prepared_datasets(config.dataset_prepared_path, data_key(config), build)
    return datasets.pop(TRAIN), datasets


def _sampling_strategy(group_by_length: bool, curriculum_sampling: bool) -> str:
    """transformers' ``train_sampling_strategy`` (5.16 and later) for ``group_by_length`` / ``curriculum_sampling``
    (Axolotl's unshuffled order: the sequential sampler)."""
    return "sequential" if curriculum_sampling else "group_by_length" if group_by_length else "random"


def wandb_environment(config: MFTConfigBase) -> dict[str, str]:
    """Axolotl's ``wandb_*`` keys as the environment variables wandb and transformers' ``WandbCallback``
    read (``WANDB_ENTITY``, ``WANDB_WATCH``, ``WANDB_LOG_MODEL``, ...; ``axolotl.utils.wandb_``)."""
    keys = ("wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_mode", "wandb_watch", "wandb_log_model")
    return {key.upper(): value for key in keys if (value := getattr(config, key))} if config.reports_to_wandb else {}


def evaluation_intervals(config: MFTConfigBase, total_steps: int, evaluate: bool) -> tuple[int, int]:
    """``eval_steps`` and ``save_steps``, from the step keys or Axolotl's per-epoch ones.

    ``evals_per_epoch: n`` is Axolotl's fraction 1 / (n * num_epochs) of the run, which the Trainer
    rounds up to whole steps. When evaluating, a save falls on every (evals / saves per epoch)-th
    evaluation, since the best checkpoint is chosen among evaluated saves (the schema checks that one
    divides the other), and ``saves_per_epoch`` alone evaluates at each save; without evaluation,
    ``saves_per_epoch`` is Axolotl's fraction as well.
    """
    def per_epoch(count: int) -> int:
        return min(total_steps, math.ceil(total_steps / (count * config.num_epochs)))

    # save_steps (or saves_per_epoch) alone: evaluate at each save, since the best checkpoint is chosen among evaluated ones
    eval_steps = config.eval_steps or config.save_steps or max(1, total_steps // EVALUATIONS_PER_RUN)
    if evaluate and (config.evals_per_epoch or (config.saves_per_epoch and not config.eval_steps)):
        eval_steps = per_epoch(config.evals_per_epoch or config.saves_per_epoch)
    save_steps = config.save_steps or eval_steps
    if config.saves_per_epoch:
        every = config.evals_per_epoch // config.saves_per_epoch if evaluate and config.evals_per_epoch else None
        save_steps = eval_steps * every if every else per_epoch(config.saves_per_epoch)
    return eval_steps, save_steps


def training_arguments(
    config: MFTConfigBase, train_blocks: int, evaluate: bool, engine: Engine | None = None
) -> TrainingArguments:
    """Axolotl-style keys mapped onto ``TrainingArguments`` (best checkpoint by spec perplexity).

    Also exports the ``wandb_*`` keys to the environment, where the Trainer's wandb reporting reads them.
    """
    steps_per_epoch = math.ceil(math.ceil(train_blocks / config.micro_batch_size) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
    eval_steps, save_steps = evaluation_intervals(config, total_steps, evaluate)
    report_to = (["wandb"] if config.reports_to_wandb else []) + (["tensorboard"] if config.use_tensorboard else [])
    os.environ.update(wandb_environment(config))
    precision = mixed_precision(config)
    checkpointing_kwargs = config.gradient_checkpointing_kwargs
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine_with_min_lr" if config.cosine_min_lr_ratio is not None else config.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": config.cosine_min_lr_ratio} if config.cosine_min_lr_ratio is not None else None,
        warmup_steps=config.warmup_steps or config.warmup_ratio,
        optim=config.optimizer,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        tf32=None if config.tf32 and not is_torch_tf32_available() else config.tf32,  # inactive: said at the start
        **{CHECKPOINTING_ARGUMENT: bool(config.gradient_checkpointing)},  # offload: the offloading is a note
        **{f"{CHECKPOINTING_ARGUMENT}_kwargs": checkpointing_kwargs.model_dump(exclude_none=True) if checkpointing_kwargs else None},
        train_sampling_strategy=_sampling_strategy(config.group_by_length, config.curriculum_sampling),
        ddp_find_unused_parameters=config.ddp_find_unused_parameters,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        save_only_model=config.save_only_model,
        load_best_model_at_end=evaluate,
        metric_for_best_model=SPEC_METRIC if evaluate else None,
        greater_is_better=False if evaluate else None,
        report_to=report_to,
        run_name=config.wandb_name or config.wandb_run_id,
        project=config.wandb_project or "huggingface",
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        **(engine or Engine.from_config(config)).trainer_arguments(),  # DDP, FSDP2 or DeepSpeed; gloo without a GPU
    )


def run(
    config: MFTConfigBase, registry: Registry | None = None, then: Callable[[Path], None] | None = None
) -> dict[str, Any]:
    """Train as ``config`` says; write the model, the resolved config and ``metrics.json``.

    ``registry`` must be the one that validated ``config`` (default: the installed plugins). The
    run holds ``output_dir`` exclusively from start to end (``exclusive_output_dir``), ``then``
    included: it is called with ``output_dir`` after the run's files are written (``mft-run``
    prints its summary from them), so no other run can clear them before it has read them.
    """
    with exclusive_output_dir(Path(config.output_dir)):
        metrics = _run(config, registry or default_registry())
        if then is not None:
            then(Path(config.output_dir))
        return metrics


def _run(config: MFTConfigBase, registry: Registry) -> dict[str, Any]:
    objective, mitigations = build_strategies(config, registry)
    output_dir = prepare_output_dir(config)
    if (finished := begin_run(config, output_dir)) is not None:
        return finished
    set_seed(config.seed)
    for note in config.start_notes:
        logger.warning(note)

    tokenizer = load_tokenizer(config)
    engine = Engine.from_config(config)
    context = RecipeContext(config=config, tokenizer=tokenizer, output_dir=output_dir, registry=registry)
    train_blocks, eval_sets = build_datasets(config, context)
    for mitigation in mitigations:  # 1. data stage
        train_blocks = mitigation.prepare_data(train_blocks, context)

    # Before any weights load: under DeepSpeed ZeRO-3 from_pretrained then partitions them as they load.
    epoch_rows = next((len(order) for m in mitigations if (order := m.epoch_order(0)) is not None), len(train_blocks))
    args = training_arguments(config, epoch_rows, evaluate=SPEC in eval_sets, engine=engine)
    model: PreTrainedModel = load_model(config)
    if config.unfrozen_parameters:  # Axolotl's partial freezing; the teacher stays the whole frozen base
        freeze_except(model, config.unfrozen_parameters)
    for mitigation in mitigations:  # 2. model stage
        model = mitigation.prepare_model(model, context)
    chunked_loss = select_loss_impl(config, objective, model)  # loss_impl; fails here if it cannot apply
    check_packing(config, model)  # packed records kept apart by this model, or packing refused
    collator = PaddingCollator(tokenizer.pad_token_id, config.sequence_len if config.pad_to_sequence_len else None)
    own_dtype = config.teacher is not None and "dtype" in config.teacher.model_fields_set  # else the run's precision
    make_teacher = lambda: build_teacher(objective.needs_teacher, model, lambda: load_frozen_teacher(config), own_dtype)  # noqa: E731
    cache, teacher = None, None
    if config.teacher_cache is not None and objective.needs_teacher:  # p^T read from disk: no teacher model in memory
        cache, train_blocks = plan_cache(config, train_blocks, collator, model)
    # ZeRO-3: only the training engine runs the partitioned teacher, so its cache is built when training begins
    cache_in_training = cache is not None and engine.runs_weights_only_in_training
    if cache is None:
        teacher = make_teacher()
    elif not cache_in_training:
        teacher = cache.built_by_main(make_teacher, args)

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
        quadratic_warmup=config.lr_quadratic_warmup,
        callbacks=stopping_callbacks(config),  # loss_watchdog_*, early_stopping_patience
    )
    if cache_in_training:
        placed = lambda: trainer.engine.place_teacher(make_teacher(), trainer.accelerator)  # noqa: E731
        trainer.teacher_at_train_begin(lambda: cache.built_in_lockstep(placed, trainer.accelerator))
    trainer.set_base_perplexities(  # measured once; cached for resumed runs and sweep siblings
        load_base_perplexities(output_dir, config, eval_sets),
        lambda measured: save_base_perplexities(output_dir, config, eval_sets, measured),
    )
    for mitigation in mitigations:
        mitigation.on_train_begin(trainer.model, context)
    registry.notify("mft_run_start", config=config, output_dir=str(output_dir))

    train_metrics = _train(trainer, config, output_dir)
    check_finite_weights(trainer.model)  # NaN weights are never saved as a result
    trainer.save_model(str(output_dir))  # with an adapter: the adapter alone, in peft's format
    if config.merge_adapter and trainer.is_world_process_zero():
        save_merged_model(config, output_dir, output_dir / MERGED_DIR)
    trainer.save_state()  # trainer_state.json: every evaluation, for the curves of `mft-run report`
    metrics = final_metrics(trainer, train_metrics)
    if trainer.is_world_process_zero():
        write_run_files(output_dir, config.model_dump(mode="json"), metrics)
    registry.notify("mft_run_end", config=config, output_dir=str(output_dir), metrics=metrics)
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
        if checkpoint is not None and is_final(Path(checkpoint)):  # killed after its last checkpoint
            restore_final(trainer, Path(checkpoint), config.engine_name)
            return {}
        result = trainer.train(resume_from_checkpoint=checkpoint)
    step = trainer.state.global_step
    if stop.stopped and step < trainer.state.max_steps:
        saved = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        raise TrainingInterrupted(stop.received or signal.SIGTERM, step, str(saved))
    return result.metrics

