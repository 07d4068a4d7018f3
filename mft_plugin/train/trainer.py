"""``MFTTrainer``: a Hugging Face Trainer whose loss is teacher + objective + mitigation penalties.

Everything else (optimizer, schedule, gradient accumulation, mixed precision, checkpoints,
``accelerate launch`` with DDP/FSDP/DeepSpeed, progress bars, logging) is the Trainer's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from mft_plugin.data.batches import REPLAY_COLUMN, MicroBatchSampler, model_inputs
from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
from mft_plugin.eval.metrics import paper_metrics, perplexity
from mft_plugin.loss.chunked import ChunkedLoss
from mft_plugin.loss.corrected import masked_mean
from mft_plugin.loss.plain import plain_token_losses
from mft_plugin.models.forms import has_adapters, missing_untied_keys
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher.sources import InPrecision, Teacher
from mft_plugin.train.budget import Budget, BudgetStop
from mft_plugin.train.checkpoints import finish_checkpoint
from mft_plugin.train.engine import Engine
from mft_plugin.train.safety import SKIPPED_KEY, NonFiniteGuard, skipped_steps
from mft_plugin.train.schedules import cosine_with_quadratic_warmup


class MFTTrainer(Trainer):
    # compute_loss divides by the labelled tokens of the whole optimizer step (num_items_in_batch, across
    # accumulation and ranks), as the Trainer does for a model's own loss: the Trainer must not divide again
    loss_is_scaled_for_ga = True

    # Private Trainer methods overridden here, each a break to check on the next transformers release;
    # none has a public hook or callback that could do the same (read in transformers 5.24 and 5.16):
    # - _get_num_items_in_batch: the step's labelled tokens as *our* loss counts them (shifted labels,
    #   every rank); the Trainer's own count is the only value it passes to compute_loss.
    # - _get_train_sampler: replay's whole-micro-batch shuffle; get_train_dataloader is public but would
    #   copy the Trainer's whole dataloader setup (workers, seeds, accelerate's prepare) to change one argument.
    # - _get_grad_norm: the non-finite gradient check needs the clipped norm before the optimizer step;
    #   on_pre_optimizer_step runs at that moment but is not given the norm (it would be recomputed).
    # - _save_checkpoint: the completeness manifest must exist before old checkpoints are rotated away,
    #   and the rotation happens inside it, before on_save.
    # - _issue_warnings_after_load: the Trainer warns that a tied lm_head is missing from a checkpoint.
    # - _determine_best_metric: the best checkpoint chosen among evaluations within the budget; on_evaluate
    #   runs after the Trainer has recorded the best metric.

    def __init__(
        self,
        *args: Any,
        objective: Objective,
        teacher: Teacher | None,
        mitigations: Sequence[Mitigation] = (),
        eval_sets: dict[str, Dataset] | None = None,
        skip_nonfinite_batches: bool = False,
        budget: Budget | None = None,
        chunked_loss: ChunkedLoss | None = None,
        engine: Engine | None = None,
        quadratic_warmup: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.quadratic_warmup = quadratic_warmup  # Axolotl's lr_quadratic_warmup (lr_scheduler: cosine)
        self.objective = objective
        self.chunked_loss = chunked_loss  # None: the plain loss from [batch, seq, vocab] logits
        self.engine = engine or Engine()
        self.teacher = self.engine.place_teacher(teacher, self.accelerator)  # sharded like the student where it is
        self.mitigations = list(mitigations)
        self._penalized_step: int | None = None  # the optimizer step whose loss holds the penalties
        self.eval_sets = eval_sets or {}
        self.base_perplexities: dict[str, float] = {}
        self.nonfinite = NonFiniteGuard(skip=skip_nonfinite_batches)
        self.budget = budget or Budget()
        if self.budget.active:
            self.add_callback(BudgetStop(self.budget))
        if self.pop_callback(ProgressCallback) is not None:  # the Trainer's bar, named
            self.add_callback(_TrainingBar())

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = shift_for_causal_lm(inputs["labels"])
        # the student's forward runs in the run's autocast (accelerate wraps it); so does the teacher's
        teacher = InPrecision(self.teacher, self.accelerator.autocast) if self.teacher is not None else None
        if self.chunked_loss is not None and not return_outputs:  # fused with the LM head, no logits made
            grad_scale = self._token_gradient(num_items_in_batch) if model.training else 1.0
            outputs, token_losses = None, self.chunked_loss(model, teacher, inputs, labels, grad_scale)
        else:
            outputs = model(**model_inputs(inputs))
            token_losses = plain_token_losses(self.objective, teacher, outputs.logits, inputs, labels)
        penalties = self._penalties(model)
        if num_items_in_batch is None or not model.training:  # one batch on its own (not a training step)
            loss = masked_mean(token_losses, labels) + sum(penalties.values())
        else:
            loss = self._step_share(token_losses, num_items_in_batch) + sum(penalties.values())
        if model.training:
            self.nonfinite.check_loss(self.state.global_step + 1, loss, self.objective.name, token_losses, penalties)
        return (loss, outputs) if return_outputs else loss

    def _penalties(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The mitigations' penalties, in training on an optimizer step's first micro-batch only.

        The weights do not change between the micro-batches of a step, so a penalty counted in full
        once per step is the same sum as its share in each, and is computed and differentiated once
        (its gradient joins the accumulated one before clipping, on every rank alike).
        """
        if model.training:
            if self._penalized_step == self.state.global_step:
                return {}
            self._penalized_step = self.state.global_step
        return {m.name: p for m in self.mitigations if (p := m.penalty(model)) is not None}

    def _token_gradient(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        """The gradient each token loss gets in an fp16 run's backward (loss scale x ranks / the step's
        tokens, as in :meth:`_step_share`), for the fused loss to scale p^S - p^C by before its fp16 casts;
        1 without a loss scaler."""
        scaler = self.accelerator.scaler
        if scaler is None or num_items_in_batch is None:
            return 1.0
        return scaler.get_scale() * self.accelerator.num_processes / max(int(num_items_in_batch), 1)

    def _step_share(self, token_losses: torch.Tensor, num_items_in_batch: torch.Tensor | int) -> torch.Tensor:
        """This micro-batch's share of the step's loss: its token losses summed over the labelled tokens of
        the whole step (all micro-batches, all ranks), times the ranks that the gradient is averaged over.
        Summed over micro-batches and averaged over ranks, it is the mean over the step's tokens."""
        count = torch.as_tensor(num_items_in_batch, device=token_losses.device).clamp(min=1)
        return token_losses.sum() / count * self.accelerator.num_processes

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """The labelled tokens of an optimizer step's micro-batches on every rank, as the loss counts them
        (shifted labels), whatever the model's ``forward`` accepts."""
        count = sum(valid_mask(shift_for_causal_lm(batch["labels"])).sum() for batch in batch_samples)
        count = torch.as_tensor(count, device=device)
        return self.accelerator.gather(count).sum() if self.accelerator.num_processes > 1 else count

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler | None:
        """A training set composed micro-batch by micro-batch (it has a replay column) is shuffled
        in whole micro-batches, so that each keeps its composition (``mft_plugin.data.batches``)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if REPLAY_COLUMN in getattr(dataset, "column_names", ()):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            compose = next((m.epoch_order for m in self.mitigations if m.epoch_order(0) is not None), None)
            return MicroBatchSampler(len(dataset), self.args.per_device_train_batch_size, seed, compose)
        return super()._get_train_sampler(train_dataset)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The Trainer's schedule, or Axolotl's cosine with a quadratic warmup (``lr_quadratic_warmup``)."""
        if self.quadratic_warmup and self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = cosine_with_quadratic_warmup(optimizer or self.optimizer, warmup, num_training_steps)
            self._created_lr_scheduler = True  # as the Trainer marks the schedules it makes
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm, checked before the optimizer step (``mft_plugin.train.safety``)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        step = self.state.global_step + 1
        if self.nonfinite.check_gradients(step, grad_norm, scaled=self.accelerator.scaler is not None):
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
            self.log({SKIPPED_KEY: skipped_steps(self.state.log_history) + 1})
        return grad_norm

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, then its completeness manifest, then the rotation of old ones.

        In that order, a kill at any moment leaves a complete checkpoint to resume from
        (``mft_plugin.train.checkpoints``); the Trainer itself would rotate before the manifest exists.
        """
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are written
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            finish_checkpoint(run_dir, self.state.global_step, limit, self.state.best_model_checkpoint)

    def perplexities(self, base: bool = False) -> dict[str, float]:
        """Token-level perplexity of the current model on each evaluation set.

        ``base``: of the unfinetuned model (paper Sec. 3.1), which with adapters is the student with them
        switched off; without adapters, call it before training.

        Every evaluation, the base's included, runs in the run's autocast and, where the loss is fused,
        through the chunked head: S and DG carry no precision offset, and no [batch, seq, vocab] logits are made.
        """
        switched_off = self.model.disable_adapter() if base and has_adapters(self.model) else contextlib.nullcontext()
        head = self.chunked_loss.head if self.chunked_loss is not None else None
        phase = "Base model perplexity" if base else "Evaluating perplexity"
        hidden = self.args.disable_tqdm or not self.is_local_process_zero()
        with switched_off, self.accelerator.autocast():
            return {
                name: perplexity(
                    self.model,
                    tqdm(self.get_eval_dataloader(dataset), desc=f"{phase} ({name})", leave=base, disable=hidden),
                    self.accelerator,
                    head,
                    self.chunked_loss is not None and self.chunked_loss.in_head,
                )
                for name, dataset in self.eval_sets.items()
            }

    def set_base_perplexities(
        self, cached: dict[str, float] | None, on_measured: Callable[[dict[str, float]], None]
    ) -> None:
        """The unfinetuned model's perplexities, against which S and DG are measured (paper Sec. 3.1).

        ``cached`` ones if given; otherwise measured now, before training, then passed to
        ``on_measured``. Under DeepSpeed ZeRO-3 the student's weights are partitioned from
        ``from_pretrained`` on and only the engine that ``train()`` builds can run them, so they
        are measured when training begins, before its first step.
        """
        if cached is not None:
            self.base_perplexities = cached
        elif self.engine.runs_weights_only_in_training:
            self.add_callback(_BaseAtTrainBegin(self, on_measured))
        else:
            self.base_perplexities = self.perplexities(base=True)
            on_measured(self.base_perplexities)

    def teacher_at_train_begin(self, make_teacher: Callable[[], Teacher]) -> None:
        """The teacher made by ``make_teacher()`` when training begins, before its first step, placed by the
        engine: under ZeRO-3 only the training engine that ``train()`` builds runs the weights (the teacher
        cache is built then, ``mft_plugin.teacher.cache.CachePlan.built_in_lockstep``)."""
        self.add_callback(_TeacherAtTrainBegin(self, make_teacher))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's warnings after loading a checkpoint, without the tied LM head: with tied
        embeddings the checkpoint holds ``lm_head.weight`` once, as the embedding, so it is not missing."""
        missing = missing_untied_keys(self.model, list(load_result.missing_keys))
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """The Trainer's best-checkpoint bookkeeping (least ``eval_spec_ppl``), blind to evaluations
        past the degeneralization budget: the final model is the best one *within* it (``mft_plugin.train.budget``)."""
        return self.budget.admits(metrics) and super()._determine_best_metric(metrics, trial)

    def paper_evaluation(self, prefix: str = "eval") -> dict[str, float]:
        """The current model's perplexities and its S, DG, DG/S against the base (paper Sec. 3.1)."""
        current = self.perplexities()
        metrics = {f"{prefix}_{name}_ppl": value for name, value in current.items()}
        metrics.update({f"{prefix}_{k}": v for k, v in paper_metrics(self.base_perplexities, current).items()})
        return metrics

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Perplexities on the specialized and general sets, plus S, DG and DG/S against the base."""
        metrics = self.paper_evaluation(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class _TrainingBar(ProgressCallback):
    """The Trainer's progress bar, named after what it counts, like the other phases' bars."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc="Training (steps)")
        self.current_step = 0


class _BaseAtTrainBegin(TrainerCallback):
    """Measures the base perplexities once the ZeRO-3 engine exists (``MFTTrainer.set_base_perplexities``)."""

    def __init__(self, trainer: MFTTrainer, on_measured: Callable[[dict[str, float]], None]) -> None:
        self.trainer = trainer
        self.on_measured = on_measured

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step > 0 and not has_adapters(self.trainer.model):
            raise RuntimeError(
                f"resume_from_checkpoint: under DeepSpeed ZeRO-3 the base model's perplexities are measured "
                f"when training starts, and this run resumes at step {state.global_step} with its weights "
                f"finetuned already and no base perplexities cached in {args.output_dir}; resume in the "
                "output_dir of the run that made the checkpoint (it cached them)"
            )
        self.trainer.base_perplexities = self.trainer.perplexities(base=True)
        self.on_measured(self.trainer.base_perplexities)


class _TeacherAtTrainBegin(TrainerCallback):
    """Makes the teacher once the ZeRO-3 engine exists (``MFTTrainer.teacher_at_train_begin``)."""

    def __init__(self, trainer: MFTTrainer, make_teacher: Callable[[], Teacher]) -> None:
        self.trainer = trainer
        self.make_teacher = make_teacher

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer.teacher = self.trainer.engine.place_teacher(self.make_teacher(), self.trainer.accelerator)
