"""``ewc``: elastic weight consolidation (Kirkpatrick et al. 2017), the paper's Table 5 baseline.

At the start of training a diagonal Fisher information F is estimated on general-domain data,
and every optimizer step adds the penalty

    lambda/2 * sum_i F_i (Delta_i)^2

where Delta_i is parameter i's change since the start (theta_i - theta*_i), and for a LoRA pair the
change of the weight it adds to its layer (``ewc_terms`` says why: B = 0 at the start leaves A with
no Fisher of its own). F is the *empirical* Fisher per token: over ``fisher_samples`` general-domain
blocks (in mini-batches of ``fisher_batch_size``), the squared gradient of each mini-batch's *summed*
token NLL, summed, divided by the number of labelled tokens, computed in the run's precision
(autocast). Where token gradients are uncorrelated that is the mean per-token squared gradient
whatever the block length, so ``ewc_lambda`` means the same at any ``sequence_len`` or
``fisher_batch_size`` (the squared gradient of a *mean* NLL would shrink as 1 / tokens per gradient).
Only trainable parameters take part (with an adapter: the adapter's). The penalty is evaluated once
per optimizer step, with its analytic gradient (``ewc_terms.penalty``): no autograd graph over the
parameters, whatever the gradient accumulation. ``fisher_path`` saves F (safetensors, written
atomically) with a hash of the starting parameters, the base as it is held and the blocks it is
averaged over (:mod:`mft_plugin.digest`); a later run with the same hash loads it instead of recomputing (e.g. a sweep over ``ewc_lambda``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
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


def fisher_key(params: EWCParams, context: RunContext, anchors: dict[str, torch.Tensor], blocks: Dataset) -> str:
    """The key of the Fisher (:func:`mft_plugin.digest.cache_key`): the blocks it is averaged over, the
    base as it is held (precision and quantization included), the starting parameters, and how it is estimated."""
    from mft_plugin.digest import cache_key, tensors_digest

    settings = {
        "fisher_batch_size": params.fisher_batch_size,
        "definition": "per-token, lora delta",  # d(summed NLL)^2 / labelled tokens; LoRA pairs by their weight delta
        "trainable": tensors_digest(anchors),
    }
    return cache_key("ewc fisher", context.config, rows=[blocks], settings=settings)


def load_fisher(path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
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
    problem = _fisher_problem(fisher, shapes)
    if problem:
        logger.warning("ewc: %s is damaged (%s); recomputing the Fisher", path, problem)
        return None
    return fisher


def _fisher_problem(fisher: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why ``fisher`` is not a Fisher of these shapes (``ewc_terms.fisher_shapes``), or None."""
    if set(fisher) != set(shapes):
        return f"{len(set(shapes) - set(fisher))} parameter(s) missing, {len(set(fisher) - set(shapes))} unknown"
    for name, f in fisher.items():
        if tuple(f.shape) != shapes[name] or not f.is_floating_point():
            return f"{name}: {f.dtype} {tuple(f.shape)}, expected float {shapes[name]}"
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
        self.terms: list[Any] = []  # ewc_terms.Term: one per unpaired parameter, one per LoRA pair

    @classmethod
    def config_problems(cls, params: StrategyParams, config: Any) -> list[str]:
        """The penalty holds the parameters as ``on_train_begin`` sees them, before the Trainer's
        engine wraps the model: FSDP2 replaces them with sharded ones, ZeRO-3 empties them."""
        if config.engine_name != "ddp":
            reason = "its penalty would miss the parameters that fsdp/deepspeed shard"
            return [f"mitigations: ewc works with DDP only ({reason}); remove fsdp/fsdp_config/deepspeed"]
        return []

    def on_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        from mft_plugin.strategies.mitigations.ewc_terms import build_terms, trainable_parameters

        anchors = {name: p.detach().float().clone() for name, p in trainable_parameters(model).items()}
        self.terms = build_terms(model, self._fisher(model, context, anchors), anchors)

    def _fisher(self, model: torch.nn.Module, context: RunContext, anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from mft_plugin.strategies.mitigations.ewc_terms import estimate_fisher, fisher_shapes

        path = Path(self.params.fisher_path) if self.params.fisher_path else None
        blocks = context.packed_blocks(self.params.datasets).shuffle(seed=context.config.seed)
        blocks = blocks.select(range(min(self.params.fisher_samples, len(blocks))))
        key = fisher_key(self.params, context, anchors, blocks) if path else ""
        fisher = load_fisher(path, key, fisher_shapes(model)) if path else None
        if fisher is not None:
            logger.info("ewc: Fisher loaded from %s", path)
            return fisher
        if len(blocks) < self.params.fisher_samples:
            logger.warning("ewc: only %d general blocks for fisher_samples %d", len(blocks), self.params.fisher_samples)
        precision = run_precision(context.config, next(iter(anchors.values())).device)
        fisher = estimate_fisher(model, blocks, self.params.fisher_batch_size, context.tokenizer.pad_token_id, precision)
        if path and is_main_process():
            save_fisher(path, fisher, key)
            logger.info("ewc: Fisher saved to %s", path)
        return fisher

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """lambda/2 * sum_i F_i Delta_i^2, float32, with its analytic gradient; None before :meth:`on_train_begin`."""
        from mft_plugin.strategies.mitigations.ewc_terms import penalty

        return penalty(self.params.ewc_lambda, self.terms) if self.terms else None


def run_precision(config: Any, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """The run's autocast (``bf16``/``fp16`` resolved as the Trainer resolves them), as a context factory."""
    from mft_plugin.models.loading import mixed_precision
    from mft_plugin.models.precision import run_autocast

    precision = mixed_precision(config)
    return lambda: run_autocast(precision == "bf16", precision == "fp16", device.type)
