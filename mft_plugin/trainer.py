"""``MFTTrainer``: a Hugging Face Trainer whose loss is teacher + objective + mitigation penalties.

Everything else (optimizer, schedule, gradient accumulation, mixed precision, checkpoints,
``accelerate launch`` with DDP/FSDP/DeepSpeed, progress bars, logging) is the Trainer's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer

from mft_plugin.evaluation import paper_metrics, perplexity
from mft_plugin.losses import masked_mean, shift_for_causal_lm
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher import FrozenCopyTeacher, SharedBaseTeacher


class MFTTrainer(Trainer):
    # compute_loss returns a per-micro-batch mean; the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        objective: Objective,
        teacher: FrozenCopyTeacher | SharedBaseTeacher | None,
        mitigations: Sequence[Mitigation] = (),
        eval_sets: dict[str, Dataset] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        self.mitigations = list(mitigations)
        self.eval_sets = eval_sets or {}
        self.base_perplexities: dict[str, float] = {}

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = shift_for_causal_lm(inputs["labels"])
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        teacher_logits = self.teacher.logits(input_ids, attention_mask) if self.teacher is not None else None
        token_losses = self.objective.token_losses(outputs.logits, teacher_logits, labels)
        loss = masked_mean(token_losses, labels)
        for mitigation in self.mitigations:
            penalty = mitigation.penalty(model)
            if penalty is not None:
                loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def perplexities(self) -> dict[str, float]:
        """Token-level perplexity of the current model on each evaluation set."""
        return {
            name: perplexity(self.model, self.get_eval_dataloader(dataset), self.accelerator)
            for name, dataset in self.eval_sets.items()
        }

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Perplexities on the specialized and general sets, plus S, DG and DG/S against the base."""
        current = self.perplexities()
        metrics = {f"{metric_key_prefix}_{name}_ppl": value for name, value in current.items()}
        metrics.update(
            {f"{metric_key_prefix}_{k}": v for k, v in paper_metrics(self.base_perplexities, current).items()}
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
