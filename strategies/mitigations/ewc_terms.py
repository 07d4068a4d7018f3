"""EWC's numerical part: the diagonal Fisher, the penalty terms, and their gradient once per step.

Imported by ``ewc`` only when a run uses it (strategy modules load no torch at import time).

What the Fisher is taken of: a parameter's own diagonal Fisher is informative only where the loss
already depends on that parameter at the start. LoRA starts with B = 0, so every A has gradient 0
there, and a Fisher in parameter space would leave A unregularized for the whole run. A LoRA pair
is instead regularized through what it changes: the weight delta it adds to its layer,
Delta W = s (B A - B* A*) (``s`` = peft's scaling), weighted by the diagonal Fisher of that layer's
effective weight W, which the model's loss depends on from the start. That Fisher is the one full
finetuning would take for W: per mini-batch, (sum over tokens of dL/dy_t x_t^T)^2, read off the
layer's input ``x`` and output gradient ``dL/dy`` without a gradient for the (frozen, maybe quantized)
base weight. Every other trainable parameter (full finetuning, IA3's vectors, DoRA's magnitudes,
``modules_to_save``) keeps the parameter-space term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from datasets import Dataset

from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.models.forms import eval_mode

PAIR_SUFFIX = ".lora_delta."  # a LoRA pair's Fisher is saved as <layer>.lora_delta.<adapter>


@dataclass(frozen=True)
class LoraPair:
    """One trainable LoRA adapter on a linear layer: Delta W = scale * B @ A, ``[out, in]``."""

    layer: torch.nn.Module
    a: torch.nn.Parameter  # [r, in]
    b: torch.nn.Parameter  # [out, r]
    scale: float


def lora_pairs(model: torch.nn.Module) -> dict[str, LoraPair]:
    """Every trainable (A, B) pair of peft's LoRA/DoRA linear layers, by the name its Fisher is saved under."""
    pairs = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not (isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict)):
            continue
        for adapter in sorted(set(lora_a) & set(lora_b)):
            a, b = lora_a[adapter], lora_b[adapter]
            linear = isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)  # not LoRA's Conv layers
            if linear and a.weight.requires_grad and b.weight.requires_grad:
                pairs[f"{name}{PAIR_SUFFIX}{adapter}"] = LoraPair(module, a.weight, b.weight, float(module.scaling[adapter]))
    return pairs


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def unpaired_parameters(model: torch.nn.Module, pairs: dict[str, LoraPair]) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters that take the parameter-space term (all but the LoRA pairs' A and B)."""
    paired = {id(p) for pair in pairs.values() for p in (pair.a, pair.b)}
    return {name: p for name, p in trainable_parameters(model).items() if id(p) not in paired}


def fisher_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The name and shape of every Fisher tensor EWC keeps for ``model`` (what a saved Fisher must hold)."""
    pairs = lora_pairs(model)
    shapes = {name: tuple(p.shape) for name, p in unpaired_parameters(model, pairs).items()}
    shapes.update({name: (pair.b.shape[0], pair.a.shape[1]) for name, pair in pairs.items()})
    return shapes


@contextlib.contextmanager
def weight_gradients(pairs: dict[str, LoraPair]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, each backward adds dL/dW = sum_t dL/dy_t x_t^T (float32, ``[out, in]``) of every
    paired layer to the yielded dict (a layer called twice in one forward adds both calls)."""
    gradients: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def add(grad: torch.Tensor) -> None:
                g = grad.reshape(-1, grad.shape[-1]).float().T @ x
                gradients[name] = gradients[name] + g if name in gradients else g

            output.register_hook(add)

        return record

    handles = [pair.layer.register_forward_hook(hook(name)) for name, pair in pairs.items()]
    try:
        yield gradients
    finally:
        for handle in handles:
            handle.remove()


def estimate_fisher(
    model: torch.nn.Module,
    blocks: Dataset,
    batch_size: int,
    pad_token_id: int,
    precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher, float32, in eval mode (no dropout), per :func:`fisher_shapes`.

    The sum over mini-batches of (d summed-token-NLL / d theta)^2, divided by their labelled tokens:
    theta is each unpaired trainable parameter, and each LoRA pair's effective layer weight. The
    forward and the loss run in ``precision`` (the run's autocast), as the Trainer runs them, so the
    Fisher is of the model that trains. Gradients are cleared after.
    """
    pairs = lora_pairs(model)
    params = unpaired_parameters(model, pairs)
    shapes = fisher_shapes(model)
    device = next(p for p in model.parameters()).device
    fisher = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    collate, tokens = PaddingCollator(pad_token_id), 0
    with eval_mode(model), torch.enable_grad(), weight_gradients(pairs) as layer_grads:
        for start in range(0, len(blocks), batch_size):
            batch = collate([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
            labels = shift_for_causal_lm(batch["labels"].to(device))
            model.zero_grad(set_to_none=True)
            with precision():
                logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
                nll = nll_token_losses(logits, labels).sum()
            nll.backward()
            tokens += int(valid_mask(labels).sum())
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
            for name, grad in layer_grads.items():
                fisher[name] += grad**2
            layer_grads.clear()
    model.zero_grad(set_to_none=True)
    return {name: f / max(tokens, 1) for name, f in fisher.items()}


class Term(Protocol):
    """One summand of sum F (Delta)^2, with the parameters it depends on."""

    params: tuple[torch.nn.Parameter, ...]

    def value(self) -> torch.Tensor: ...

    def gradients(self, ewc_lambda: float) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class ParameterTerm:
    """F (theta - theta*)^2 of one parameter; its gradient (times lambda/2) is lambda F (theta - theta*)."""

    params: tuple[torch.nn.Parameter, ...]  # (theta,)
    fisher: torch.Tensor
    anchor: torch.Tensor  # theta*, float32

    def _delta(self) -> torch.Tensor:
        return self.params[0].detach().float() - self.anchor

    def value(self) -> torch.Tensor:
        return (self.fisher * self._delta() ** 2).sum()

    def gradients(self, ewc_lambda: float) -> tuple[torch.Tensor, ...]:
        return (ewc_lambda * self.fisher * self._delta(),)


@dataclass(frozen=True)
class PairTerm:
    """F_W (Delta W)^2 of a LoRA pair, Delta W = s (B A - B* A*): gradients s B^T G and s G A^T, G = lambda F_W Delta W."""

    params: tuple[torch.nn.Parameter, ...]  # (A [r, in], B [out, r])
    scale: float
    fisher: torch.Tensor  # [out, in]
    anchors: tuple[torch.Tensor, torch.Tensor]  # A*, B*, float32

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params[0].detach().float(), self.params[1].detach().float()

    def _delta(self) -> torch.Tensor:
        (a, b), (a0, b0) = self._factors(), self.anchors
        return self.scale * (b @ a - b0 @ a0)

    def value(self) -> torch.Tensor:
        return (self.fisher * self._delta() ** 2).sum()

    def gradients(self, ewc_lambda: float) -> tuple[torch.Tensor, ...]:
        (a, b), g = self._factors(), ewc_lambda * self.fisher * self._delta()
        return self.scale * b.T @ g, self.scale * g @ a.T


class _Penalty(torch.autograd.Function):
    """lambda/2 sum_terms value, with the analytic gradient: no autograd graph over the parameters."""

    @staticmethod
    def forward(ctx: Any, ewc_lambda: float, terms: list[Term], *params: torch.nn.Parameter) -> torch.Tensor:
        ctx.ewc_lambda, ctx.terms = ewc_lambda, terms
        return 0.5 * ewc_lambda * torch.stack([term.value() for term in terms]).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.no_grad():
            grads = [g for term in ctx.terms for g in term.gradients(ctx.ewc_lambda)]
            params = [p for term in ctx.terms for p in term.params]
            return None, None, *((grad * g).to(p.dtype) for g, p in zip(grads, params, strict=True))


def penalty(ewc_lambda: float, terms: list[Term]) -> torch.Tensor:
    """lambda/2 sum_i F_i Delta_i^2 (float32, outside any autocast), differentiable in the terms' parameters."""
    params = [p for term in terms for p in term.params]
    with torch.autocast(params[0].device.type, enabled=False):
        return _Penalty.apply(ewc_lambda, terms, *params)


def build_terms(model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> list[Term]:
    """The penalty's terms for ``model``: one per unpaired trainable parameter, one per LoRA pair."""
    pairs = lora_pairs(model)
    names = {id(p): name for name, p in model.named_parameters()}
    terms: list[Term] = [
        ParameterTerm((p,), fisher[name].to(p.device), anchors[name]) for name, p in unpaired_parameters(model, pairs).items()
    ]
    for name, pair in pairs.items():
        pair_anchors = (anchors[names[id(pair.a)]], anchors[names[id(pair.b)]])
        terms.append(PairTerm((pair.a, pair.b), pair.scale, fisher[name].to(pair.a.device), pair_anchors))
    return terms
