"""``ewc``: elastic weight consolidation (Kirkpatrick et al. 2017), the paper's Table 5 baseline.

At the start of training a diagonal Fisher information F is estimated on general-domain data,
and every step adds the penalty

    lambda/2 * sum_i F_i (theta_i - theta*_i)^2

where theta* are the parameters at the start. F is the *empirical* Fisher per token: over
``fisher_samples`` general-domain blocks (in mini-batches of ``fisher_batch_size``), the squared
gradient of each mini-batch's *summed* token NLL, summed, divided by the number of labelled tokens.
Where token gradients are uncorrelated that is the mean per-token squared gradient whatever the
block length, so ``ewc_lambda`` means the same at any ``sequence_len`` or ``fisher_batch_size`` (the
squared gradient of a *mean* NLL would shrink as 1 / tokens per gradient). Only trainable
parameters take part (with an adapter: the adapter's), and F and theta* are float32 copies of
those alone: 8 bytes per trainable parameter. ``fisher_path`` saves F (safetensors, written
atomically) with a hash of the starting parameters, the base as it is held and the blocks it is
averaged over (:mod:`mft_plugin.digest`); a later run with the same hash loads it instead of recomputing (e.g. a sweep over ``ewc_lambda``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mft_plugin.config.schema import DatasetConfig
from mft_plugin.train.launch import is_main_process
from mft_plugin.strategy import Mitigation, StrategyParams

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from mft_plugin.train.context import RunContext

logger = logging.getLogger(__name__)
KEY = "mft_plugin.fisher_key"  # safetensors metadata entry holding the hash


class EWCParams(StrategyParams):
    ewc_lambda: float = Field(1000.0, gt=0.0, description="lambda, the weight of the penalty")
    datasets: list[DatasetConfig] = Field(min_length=1, description="general-domain sources for the Fisher")
    fisher_samples: int = Field(64, ge=1, description="general-domain blocks the Fisher is averaged over")
    fisher_batch_size: int = Field(1, ge=1, description="blocks per gradient (1: per-sample Fisher)")
    fisher_path: str | None = Field(None, description="a .safetensors file to reuse the Fisher from (and save it to)")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def estimate_fisher(model: torch.nn.Module, blocks: Dataset, batch_size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters, float32, in eval mode (no dropout).

    The sum over mini-batches of (d summed-token-NLL / d theta)^2, divided by their labelled tokens;
    gradients are cleared after.
    """
    import torch

    from mft_plugin.data.batches import PaddingCollator
    from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
    from mft_plugin.loss.corrected import nll_token_losses
    from mft_plugin.models.forms import eval_mode

    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    collate, device = PaddingCollator(pad_token_id), next(iter(params.values())).device
    starts, tokens = range(0, len(blocks), batch_size), 0
    with eval_mode(model), torch.enable_grad():
        for start in starts:
            batch = collate([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
            labels = shift_for_causal_lm(batch["labels"].to(device))
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            model.zero_grad(set_to_none=True)
            nll_token_losses(logits, labels).sum().backward()
            tokens += int(valid_mask(labels).sum())
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / max(tokens, 1) for name, f in fisher.items()}


def fisher_key(params: EWCParams, context: RunContext, anchors: dict[str, torch.Tensor], blocks: Dataset) -> str:
    """The key of the Fisher (:func:`mft_plugin.digest.cache_key`): the blocks it is averaged over, the
    base as it is held, the starting parameters, and how it is estimated."""
    from mft_plugin.digest import cache_key, tensors_digest

    settings = {
        "fisher_batch_size": params.fisher_batch_size,
        "definition": "per-token",  # squared gradient of summed NLL / labelled tokens (not of the mean NLL)
        "trainable": tensors_digest(anchors),
    }
    return cache_key("ewc fisher", context.config, rows=[blocks], settings=settings)


def load_fisher(path: Path, key: str, anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The saved Fisher if ``path`` holds one for this very ``key``, else None (recomputed).

    A damaged file (truncated, not safetensors, tensors missing, of other shapes, negative or not
    finite) is logged and recomputed: a Fisher is a sum of squares, so anything else is not one.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get(KEY) != key:
                logger.warning("ewc: %s was computed for other parameters or data; recomputing it", path)
                return None
            fisher = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, SafetensorError) as error:
        logger.warning("ewc: %s is damaged (%s); recomputing the Fisher", path, " ".join(str(error).split()))
        return None
    problem = _fisher_problem(fisher, anchors)
    if problem:
        logger.warning("ewc: %s is damaged (%s); recomputing the Fisher", path, problem)
        return None
    return fisher


def _fisher_problem(fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> str | None:
    """Why ``fisher`` is not a Fisher for these parameters, or None."""
    if set(fisher) != set(anchors):
        return f"{len(set(anchors) - set(fisher))} parameter(s) missing, {len(set(fisher) - set(anchors))} unknown"
    for name, f in fisher.items():
        if f.shape != anchors[name].shape or not f.is_floating_point():
            return f"{name}: {f.dtype} {tuple(f.shape)}, expected float {tuple(anchors[name].shape)}"
        if not bool(f.isfinite().all()) or bool((f < 0).any()):
            return f"{name}: negative or non-finite values"
    return None


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], key: str) -> None:
    from safetensors.torch import save_file

    from mft_plugin.files import atomic_path

    with atomic_path(path) as temporary:
        save_file({name: f.contiguous().cpu() for name, f in fisher.items()}, str(temporary), metadata={KEY: key})


class EWCMitigation(Mitigation):
    name = "ewc"
    Params = EWCParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (theta, F, theta*)

    @classmethod
    def config_problems(cls, params: StrategyParams, config: Any) -> list[str]:
        """The penalty holds the parameters as ``on_train_begin`` sees them, before the Trainer's
        engine wraps the model: FSDP2 replaces them with sharded ones, ZeRO-3 empties them."""
        if config.engine_name != "ddp":
            reason = "its penalty would miss the parameters that fsdp/deepspeed shard"
            return [f"mitigations: ewc works with DDP only ({reason}); remove fsdp/fsdp_config/deepspeed"]
        return []

    def on_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        params = trainable_parameters(model)
        anchors = {name: p.detach().float().clone() for name, p in params.items()}
        fisher = self._fisher(model, context, anchors)
        self.terms = [(p, fisher[name].to(p.device), anchors[name]) for name, p in params.items()]

    def _fisher(self, model: torch.nn.Module, context: RunContext, anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        path = Path(self.params.fisher_path) if self.params.fisher_path else None
        blocks = context.packed_blocks(self.params.datasets).shuffle(seed=context.config.seed)
        blocks = blocks.select(range(min(self.params.fisher_samples, len(blocks))))
        key = fisher_key(self.params, context, anchors, blocks) if path else ""
        fisher = load_fisher(path, key, anchors) if path else None
        if fisher is not None:
            logger.info("ewc: Fisher loaded from %s", path)
            return fisher
        if len(blocks) < self.params.fisher_samples:
            logger.warning("ewc: only %d general blocks for fisher_samples %d", len(blocks), self.params.fisher_samples)
        fisher = estimate_fisher(model, blocks, self.params.fisher_batch_size, context.tokenizer.pad_token_id)
        if path and is_main_process():
            save_fisher(path, fisher, key)
            logger.info("ewc: Fisher saved to %s", path)
        return fisher

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """lambda/2 * sum_i F_i (theta_i - theta*_i)^2, float32; None before :meth:`on_train_begin`."""
        if not self.terms:
            return None
        total = sum(((p.float() - anchor) ** 2 * fisher).sum() for p, fisher, anchor in self.terms)
        return 0.5 * self.params.ewc_lambda * total
