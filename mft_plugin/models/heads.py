"""The model side of the fused loss: the LM head, and the final hidden states that feed it.

The chunked loss (:mod:`mft_plugin.loss.chunked`), the teacher (:mod:`mft_plugin.teacher`), the
teacher cache and the evaluation all compute logits as ``T(hidden @ head.weight.T (+ head.bias))``, a
chunk of tokens at a time, where T is the transform the model applies after its head
(:class:`LogitTransform`: Gemma's softcap, Granite's and Cohere's scales). This module finds that
head and transform, proves on a probe forward that the model's logits are exactly that
(:func:`fusable_head`), captures the head's input during a model's own forward, and sizes the chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from mft_plugin.data.batches import model_inputs
from mft_plugin.models.forms import eval_mode

# Chunk rows follow the V/H ratio as in Liger-Kernel's fused linear cross-entropy: a [rows, V] buffer
# then holds about as many numbers as the [N, H] hidden states, so the loss never needs more memory
# than the activations it reads. On a CPU (small N, or V/H in the hundreds) that would give a few rows
# per chunk, and each chunk's update dW += g^T h reads and writes all of dW [V, H]: the rows never go
# below the old floor, max(CHUNK_BUDGET_BYTES of float32 buffers, MIN_CHUNK_ROWS), which is what the
# CPU benchmarks were measured with.
CHUNK_BUDGET_BYTES = 32 << 20
MIN_CHUNK_ROWS = 384
# Config keys with which transformers' models scale their logits after the head, and how: Granite
# (and its MoE variants) divide by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Falcon-H1
# by ``lm_head_multiplier``. Gemma 2 and Gemma 3 (text) then cap them: ``final_logit_softcapping``.
SCALE_KEYS = {"logits_scaling": "divides", "logit_scale": "multiplies", "lm_head_multiplier": "multiplies"}
SOFTCAP_KEY = "final_logit_softcapping"
# Keys known to change the logits in a way not fused here: refused even where the probe's logits are
# too small for the change to show. A probe forward (:func:`fusable_head`) catches the unknown ones.
UNFUSED_KEYS = ("output_multiplier_scale",)
PROBE_TOKENS = 16
# Relative tolerance of the probe: the head's own matmul against ours in the same dtype (cuBLAS/oneDNN may
# pick other kernels for other shapes); a logit scale or softcap is off by far more.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}


class UnfusableError(ValueError):
    """The chunked path cannot reproduce this model's or objective's loss (the reason says why)."""


def default_chunk_size(tokens: int, vocab: int, with_teacher: bool, hidden_size: int | None = None) -> int:
    """Tokens per chunk (see ``CHUNK_BUDGET_BYTES``): buffer rows from the V/H ratio (Liger-Kernel:
    the next power of 2 of N / ceil(V / H)), at least the old floor; with a teacher, three buffers
    of a third of the rows plain cross-entropy's single one has (the same peak memory)."""
    floor = max(CHUNK_BUDGET_BYTES // (4 * vocab), MIN_CHUNK_ROWS)
    liger = 0
    if hidden_size:
        per_chunk = -(-tokens // -(-vocab // hidden_size))
        liger = 1 << max(per_chunk - 1, 0).bit_length()
    buffer_rows = min(tokens, max(liger, floor))
    return max(1, -(-buffer_rows // (3 if with_teacher else 1)))


def _configs(source: object) -> list[object]:
    """A model's config (or ``source`` itself, a config) and its nested text config, if any."""
    config = getattr(source, "config", source)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else None
    return [config] if text_config is None or text_config is config else [config, text_config]


def _set(config: object, key: str) -> float | None:
    value = getattr(config, key, None)
    return None if value is None else float(value)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its logits after the head: ``z = softcap(scale * y)``, ``y = h W^T (+ b)``,
    with ``softcap(x) = c tanh(x / c)`` (identity when ``softcap`` is None).

    The fused loss, the teacher (online or cached) and the evaluation apply it to each chunk of logits
    so that they see the model's own logits; the gradient goes back through it exactly:
    dz/dy = scale (1 - (z / c)^2).
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, source: object) -> LogitTransform:
        """The transform a model (or its config, also a nested text config) applies after its head;
        UnfusableError naming the key for a known change not fused here (``UNFUSED_KEYS``)."""
        scale, softcap = 1.0, None
        for config in _configs(source):
            for key in UNFUSED_KEYS:
                if _set(config, key) not in (None, 1.0):
                    raise UnfusableError(f"its config sets {key} = {getattr(config, key)} (logits are changed after the head)")
        config = _configs(source)[-1]  # the text model's: it is the one that computes the logits
        for key, how in SCALE_KEYS.items():
            if (value := _set(config, key)) is not None:
                scale *= 1.0 / value if how == "divides" else value
        if (cap := _set(config, SOFTCAP_KEY)) is not None and cap > 0:
            softcap = cap
        return cls(scale, softcap)

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """z from y, in place in ``logits`` ``[n, V]`` (its dtype: float32 in the chunks)."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def derivative(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """dz/dy ``[n, V]`` into ``out``, from the transformed logits ``z`` (softcap only; else it is ``scale``)."""
        torch.div(z, self.softcap, out=out)
        return out.square_().neg_().add_(1.0).mul_(self.scale)


IDENTITY = LogitTransform()


def _unsharded_type(module: object) -> type:
    """``module``'s class, under FSDP2 the one ``fully_shard`` derived its own from (an ``FSDPLinear`` is
    an ``FSDPModule`` and a ``torch.nn.Linear``, with the Linear's forward: the head is still fusable)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's LM head if it is a plain ``torch.nn.Linear`` (with or without bias) and no known
    config key changes the logits after it in a way not fused (:meth:`LogitTransform.of`); else
    UnfusableError. :func:`fusable_head` also measures."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if _unsharded_type(head) is not torch.nn.Linear:
        name = f"{type(head).__module__}.{type(head).__qualname__}"
        raise UnfusableError(f"its output layer is {name}, not a torch.nn.Linear (e.g. an adapter on lm_head)")
    LogitTransform.of(model)
    return head


def head_logits(hidden: torch.Tensor, head: torch.nn.Linear, transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """``T(hidden @ head.weight.T (+ head.bias))`` in float32: the logits the fused path computes."""
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return transform.apply_(torch.nn.functional.linear(hidden, head.weight.to(hidden.dtype), bias).float())


@torch.no_grad()
def fusable_head(model: torch.nn.Module) -> torch.nn.Linear:
    """:func:`output_head`, once one probe forward shows that the model's logits are exactly its
    :class:`LogitTransform` of the head applied to its final hidden states (within the dtype's
    tolerance, ``PROBE_RTOL``).

    A model that scales or caps its logits under a config key nobody listed (or in its ``forward``)
    would otherwise train the fused loss on other logits than its own, silently.
    """
    head = output_head(model)
    device = head.weight.device
    tokens = min(PROBE_TOKENS, head.weight.shape[0])
    input_ids = torch.arange(tokens, device=device).unsqueeze(0)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        with eval_mode(model):
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    finally:
        handle.remove()
    if not seen:
        raise UnfusableError("its forward never called its output layer")
    expected = head_logits(seen[-1], head, LogitTransform.of(model))[:, -logits.shape[1] :]
    got = logits.float()
    rtol = PROBE_RTOL.get(seen[-1].dtype, 2e-2)
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    if got.shape != expected.shape or not error <= rtol * max(scale, 1e-6):
        raise UnfusableError(
            f"its logits are not its head applied to its final hidden states (probe forward: largest difference "
            f"{error:.3g} at logits up to {scale:.3g}; the model changes them after the head in a way its config does not say)"
        )
    return head


@dataclass
class _Captured:
    hidden: torch.Tensor | None = None  # [batch, seq, H]
    compute_dtype: torch.dtype | None = None  # the head's matmul dtype: autocast's, else the hidden states'
    weight: torch.Tensor | None = None  # [V, H], detached: the head's weight as its forward saw it
    bias: torch.Tensor | None = None  # [V] or None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matmul on ``hidden`` here: autocast's where it is on, else ``hidden``'s."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


@contextlib.contextmanager
def head_inputs(head: torch.nn.Linear, copy_weights: bool = False) -> Iterator[_Captured]:
    """Within the block, a model forward hands its head input (the final hidden states) to us and
    its head computes logits for zero positions: the full ``[batch, seq, V]`` logits are never made.

    The forward still runs through the model's own ``forward`` (and so through DDP, peft and
    activation checkpointing); the autocast state seen by the head is recorded, so that the chunks'
    logits are computed in the precision the head would have used. The head's weight and bias are
    captured as its forward sees them; ``copy_weights``: as copies, for an engine that gathers them
    only for the head's forward and frees them after it (FSDP2, ZeRO-3: the teacher's view reads them later).
    """
    captured = _Captured()

    def keep_hidden(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (hidden,) = args
        captured.hidden, captured.compute_dtype = hidden, _compute_dtype(hidden)
        captured.weight, captured.bias = (
            None if t is None else t.detach().clone() if copy_weights else t.detach() for t in (head.weight, head.bias)
        )
        return (hidden[..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        yield captured
    finally:
        handle.remove()


def forward_hidden(
    model: torch.nn.Module, head: torch.nn.Linear, inputs: Mapping[str, torch.Tensor], copy_weights: bool = False
) -> _Captured:
    """Run ``model`` on the batch's model inputs (:func:`mft_plugin.data.batches.model_inputs`) and
    return its final hidden states ``[batch, seq, H]``, the head's logits never made."""
    with head_inputs(head, copy_weights) as captured:
        model(**model_inputs(inputs))
    if captured.hidden is None:
        raise UnfusableError("its forward never called its output layer")
    return captured


TokenLosses = Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # (hidden [..., H], compute dtype) -> [...]


def fused_forward(
    model: torch.nn.Module, head: torch.nn.Linear, inputs: Mapping[str, torch.Tensor], losses: TokenLosses, in_head: bool
) -> torch.Tensor:
    """Per-token ``losses`` of the model's final hidden states on the batch's model inputs, ``[batch, seq]``.

    ``losses`` reads ``head.weight`` (and bias) when called. Where the weights are whole (one process,
    DDP) it is called after the forward. ``in_head`` (FSDP2, ZeRO-3): the head's weight exists whole only
    inside the head module's own forward, which the engine's hooks surround (they gather it before and
    free it after, and they gather it again for the backward and reduce its gradient), so ``losses``
    replaces the head's forward and its result goes out as the model's ``logits``: the gradient reaches
    the weight through the engine's own hooks. The model must return its head's output unchanged;
    this is checked on every forward (no probe forward can run a ZeRO-3 model before its engine exists).
    """
    if not in_head:
        captured = forward_hidden(model, head, inputs)
        return losses(captured.hidden, captured.compute_dtype)
    computed: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        computed.append(losses(hidden, _compute_dtype(hidden)))
        return computed[-1]

    own = head.__dict__.get("forward")  # an instance forward of its own (a library's patch), put back after
    head.forward = forward  # an instance attribute: called inside the module's __call__, so inside every hook
    try:
        returned = model(**model_inputs(inputs)).logits
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    if not computed:
        raise UnfusableError("its forward never called its output layer")
    if returned.shape != computed[-1].shape or not torch.equal(returned.detach(), computed[-1].detach()):
        raise UnfusableError(
            "its logits are not its head's output (the model changes them after the head; under fsdp/deepspeed the "
            "fused loss is computed inside the head's forward): use loss_impl: naive"
        )
    return returned
