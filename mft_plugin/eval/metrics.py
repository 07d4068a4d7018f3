"""The paper's metrics (Section 3.1): perplexities, specialization S, degeneralization DG, DG/S.

    S  = (ppl_spec(base) - ppl_spec(model)) / ppl_spec(base)        relative decrease
    DG = (ppl_gen(model) - ppl_gen(base)) / ppl_gen(base)           relative increase

Perplexity is token level: exp(total NLL / number of predicted tokens) over the same packed
``sequence_len`` blocks, never an average of per-batch perplexities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from accelerate import Accelerator

from mft_plugin.data.batches import model_inputs
from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
from mft_plugin.loss.chunked import chunked_nll
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.models.forms import eval_mode

SPEC, GENERAL = "spec", "general"


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    head: torch.nn.Linear | None = None,
    in_head: bool = False,
) -> float:
    """Token-level perplexity of ``model`` over every batch (summed across processes).

    ``head``: the model's LM head when the loss is fused with it (:func:`mft_plugin.models.heads.fusable_head`):
    the NLL is then computed through it chunk by chunk (:func:`mft_plugin.loss.chunked.chunked_nll`),
    never from ``[batch, seq, vocab]`` logits; None: from the model's logits. ``in_head``: inside the
    head's forward, where FSDP2 and ZeRO-3 gather its weight (:func:`mft_plugin.models.heads.fused_forward`).
    """
    total_nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with eval_mode(model):
        for batch in batches:
            labels = shift_for_causal_lm(batch["labels"])
            if head is not None:
                token_nll = chunked_nll(model, head, batch, labels, in_head)
            else:
                token_nll = nll_token_losses(model(**model_inputs(batch)).logits, labels)
            per_row_nll = token_nll.sum(dim=-1).double()
            per_row_tokens = valid_mask(labels).sum(dim=-1).double()
            # gather_for_metrics drops the samples accelerate duplicated to even out the last batch
            total_nll += accelerator.gather_for_metrics(per_row_nll).sum()
            total_tokens += accelerator.gather_for_metrics(per_row_tokens).sum()
    return math.exp(total_nll.item() / max(total_tokens.item(), 1.0))


def specialization(base_ppl: float, ppl: float) -> float:
    """S: relative decrease of specialized-domain perplexity (higher is better)."""
    return (base_ppl - ppl) / base_ppl


def degeneralization(base_ppl: float, ppl: float) -> float:
    """DG: relative increase of general-domain perplexity (lower is better)."""
    return (ppl - base_ppl) / base_ppl


def dg_over_s(dg: float, s: float) -> float:
    """DG/S; infinite when the model did not specialize at all (S <= 0)."""
    return dg / s if s > 0 else math.inf


def paper_metrics(base: dict[str, float], current: dict[str, float]) -> dict[str, float]:
    """S, DG and DG/S from base and current perplexities keyed by ``spec``/``general``."""
    metrics: dict[str, float] = {}
    if SPEC in base and SPEC in current:
        metrics["S"] = specialization(base[SPEC], current[SPEC])
    if GENERAL in base and GENERAL in current:
        metrics["DG"] = degeneralization(base[GENERAL], current[GENERAL])
    if "S" in metrics and "DG" in metrics:
        metrics["DG/S"] = dg_over_s(metrics["DG"], metrics["S"])
    return metrics
