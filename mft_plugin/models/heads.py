"""The model side of the fused loss: the LM head, and the final hidden states that feed it.

The chunked loss (:mod:`mft_plugin.loss.chunked`), the teacher (:mod:`mft_plugin.teacher`) and the
teacher cache all compute logits as ``hidden @ head.weight.T``, a chunk of tokens at a time. This
module finds that head, captures its input during a model's own forward, and sizes the chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from mft_plugin.data.batches import model_inputs

# A chunk's float32 ``[chunk, V]`` buffers hold max(CHUNK_BUDGET_BYTES, MIN_CHUNK_ROWS x V x 4) bytes in
# all (at most the batch's tokens' worth), whatever the objective: so the chunked MFT loss has the
# peak memory of the fused plain cross-entropy (one buffer, three times the rows). The floor keeps
# >= 128 rows per MFT chunk, for the update dW += g^T h reads and writes all of dW [V, H] per chunk.
CHUNK_BUDGET_BYTES = 32 << 20
MIN_CHUNK_ROWS = 384
# Config keys of models whose forward changes the logits after the head (softcapping, scaling):
# the fused path computes h W^T only, so those models take the plain path.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class UnfusableError(ValueError):
    """The chunked path cannot reproduce this model's or objective's loss (the reason says why)."""


def default_chunk_size(tokens: int, vocab: int, with_teacher: bool) -> int:
    """Tokens per chunk, so that the chunk's buffers fit the budget (see ``CHUNK_BUDGET_BYTES``):
    with a teacher, three buffers of a third of the rows plain cross-entropy's single one has."""
    buffer_rows = min(tokens, max(CHUNK_BUDGET_BYTES // (4 * vocab), MIN_CHUNK_ROWS))
    return max(1, -(-buffer_rows // (3 if with_teacher else 1)))


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's LM head if its logits are exactly ``hidden @ head.weight.T``; else UnfusableError."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise UnfusableError(
            f"its output layer is {type(head).__name__}, not a bias-free torch.nn.Linear (e.g. an adapter on lm_head)"
        )
    config = getattr(model, "config", None)
    for key in LOGIT_POSTPROCESSING:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UnfusableError(f"its config sets {key} = {getattr(config, key)} (logits are changed after the head)")
    return head


@dataclass
class _Captured:
    hidden: torch.Tensor | None = None  # [batch, seq, H]
    compute_dtype: torch.dtype | None = None  # the head's matmul dtype: autocast's, else the hidden states'


@contextlib.contextmanager
def head_inputs(head: torch.nn.Linear) -> Iterator[_Captured]:
    """Within the block, a model forward hands its head input (the final hidden states) to us and
    its head computes logits for zero positions: the full ``[batch, seq, V]`` logits are never made.

    The forward still runs through the model's own ``forward`` (and so through DDP, peft and
    activation checkpointing); the autocast state seen by the head is recorded, so that the chunks'
    logits are computed in the precision the head would have used.
    """
    captured = _Captured()

    def keep_hidden(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (hidden,) = args
        device = hidden.device.type
        captured.hidden = hidden
        autocast = torch.is_autocast_enabled(device)
        captured.compute_dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        return (hidden[..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        yield captured
    finally:
        handle.remove()


def forward_hidden(model: torch.nn.Module, head: torch.nn.Linear, inputs: Mapping[str, torch.Tensor]) -> _Captured:
    """Run ``model`` on the batch's model inputs (:func:`mft_plugin.data.batches.model_inputs`) and
    return its final hidden states ``[batch, seq, H]``, the head's logits never made."""
    with head_inputs(head) as captured:
        model(**model_inputs(inputs))
    if captured.hidden is None:
        raise UnfusableError("its forward never called its output layer")
    return captured
