"""Axolotl's speed-only switches: kernels, offloading, tiling, placement. They change how fast a step runs and
how much memory it takes, never the loss (paper Eq. 3 is computed by mft-run's own loss, ``loss_impl``).

Each is accepted with Axolotl's values. A switch that this machine (or mft-run) does not run is said
once at the start of the run as inactive, with what would run it (:func:`inactive_switches`); none
is accepted and dropped without a word. ``tf32`` and ``gradient_checkpointing`` are applied by the
Trainer (:mod:`mft_plugin.train.recipe`); ``gradient_checkpointing: offload`` is checkpointing plus
``activation_offloading``. FlashAttention is one of them too (``flash_attention: true`` or
``attn_implementation: flash_attention_2``, as 162 of Axolotl's examples write it): it computes the same
attention as the model's default, faster; without a CUDA GPU and the flash-attn package the model keeps
its default attention and the start says so. So does Axolotl's ``attn_implementation: xformers``
(``xformers_attention: true``), a patch mft-run does not apply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

_LIGER = "Liger-Kernel's Triton kernels (CUDA GPU and the liger-kernel package)"
_AXOLOTL = "Axolotl's own Triton kernels, which run inside `axolotl train` on a CUDA GPU (README 'Axolotl plugin')"
_HUB_KERNELS = "HF kernels fetched from the hub by the kernels package on a CUDA GPU (no hub access here)"
_OFFLOAD = "Axolotl's activation offloading to CPU memory during the forward pass (CUDA GPU)"
_FUSED_LOSS = "a fused linear cross-entropy; mft-run's corrected loss is fused with the LM head by loss_impl: chunked"
_FLASH = "FlashAttention runs on a CUDA GPU with the flash-attn package"
_XFORMERS = "Axolotl's xformers attention patch, which runs inside `axolotl train` on a CUDA GPU"
_MOE = "a mixture-of-experts kernel (CUDA GPU); it runs the same experts' math"
_HYBRID = "Axolotl's Gemma 4 patch: FlashAttention on the sliding-window layers, SDPA on the global ones (CUDA GPU)"
_LINEARIZED = "Axolotl's Llama 4 patch that holds each expert as nn.Linear layers, the same experts' math (inside `axolotl train`)"
_BETTER_TRANSFORMER = "optimum's BetterTransformer, which mft-run does not apply (transformers 5 models run SDPA natively)"
_KERNELS_PLUGIN = "a kernel of Axolotl's KernelsPlugin for DeepSeek-V4/GLM-5 layers and NVFP4 experts (CUDA GPU, inside `axolotl train`)"
_PLACEMENT = "Axolotl's order of loading and FSDP sharding; mft-run's engine (accelerate) places the model"

# key -> what would run it
SPEED_SWITCHES: dict[str, str] = {
    **{key: _LIGER for key in ("liger_rope", "liger_rms_norm", "liger_rms_norm_gated", "liger_glu_activation", "liger_layer_norm")},
    **{key: _FUSED_LOSS for key in ("liger_fused_linear_cross_entropy", "cut_cross_entropy", "flash_attn_cross_entropy")},
    **{key: _AXOLOTL for key in (
        "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "fused_attn_kernel", "flash_attn_fuse_mlp",
        "flash_attn_rms_norm", "tiled_mlp",
    )},
    "use_kernels": _HUB_KERNELS,
    "activation_offloading": _OFFLOAD,
    **{key: _MOE for key in ("use_scattermoe", "use_sonicmoe", "experts_implementation")},
    "gemma4_hybrid_attn_impl": _HYBRID,
    "llama4_linearized_experts": _LINEARIZED,
    "experimental_skip_move_to_device": _PLACEMENT,
    "flash_optimum": _BETTER_TRANSFORMER,
    **{key: _KERNELS_PLUGIN for key in ("use_dsv4_kernels", "use_glm_dsa_kernels", "dsv4_fp4_grouped_mode")},
}


class SpeedSwitches(BaseModel):
    """A mixin of the schema: the switches of :data:`SPEED_SWITCHES`, with Axolotl's types."""

    liger_rope: bool | None = None
    liger_rms_norm: bool | None = None
    liger_rms_norm_gated: bool | None = None
    liger_glu_activation: bool | None = None
    liger_layer_norm: bool | None = None
    liger_fused_linear_cross_entropy: bool | None = None
    cut_cross_entropy: bool | None = None
    lora_mlp_kernel: bool | None = None
    lora_qkv_kernel: bool | None = None
    lora_o_kernel: bool | None = None
    fused_attn_kernel: bool | None = None
    flash_attn_fuse_mlp: bool | None = None
    flash_attn_rms_norm: bool | None = None
    tiled_mlp: bool | None = None
    tiled_mlp_num_shards: int | None = Field(None, ge=1, description="with tiled_mlp")
    use_kernels: bool | None = None
    activation_offloading: bool | Literal["legacy", "disk"] | None = None
    use_scattermoe: bool | None = None
    use_sonicmoe: bool | None = None
    experts_implementation: str | None = Field(None, description="Axolotl's experts kernel: scattermoe, grouped_mm, ...")
    gemma4_hybrid_attn_impl: bool | None = None
    llama4_linearized_experts: bool | None = None
    experimental_skip_move_to_device: bool | None = None
    flash_optimum: bool | None = None
    flash_attn_cross_entropy: bool | None = None
    use_dsv4_kernels: bool | None = None
    use_glm_dsa_kernels: bool | None = None
    dsv4_fp4_grouped_mode: str | None = Field(None, description="the KernelsPlugin's grouped GEMM for NVFP4 experts: nvfp4, ...")


def switches_on(config: Any) -> list[str]:
    """The speed switches ``config`` turns on, as ``key`` or ``key: value``."""
    on = [key for key in SPEED_SWITCHES if getattr(config, key, None) not in (None, False)]
    if getattr(config, "gradient_checkpointing", None) == "offload" and "activation_offloading" not in on:
        on.append("activation_offloading")  # Axolotl: checkpointing with the activations offloaded
    return on


def inactive_attention(implementation: str | None) -> str | None:
    """What would run ``implementation`` (an ``attn_implementation``) where this run cannot: a FlashAttention
    this machine lacks, or Axolotl's xformers patch; None where it runs."""
    from transformers.utils import import_utils  # torch-free schema otherwise

    if implementation == "xformers":
        return _XFORMERS
    check = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}.get(implementation or "")
    return _FLASH if check is not None and not getattr(import_utils, check, lambda: False)() else None  # absent: an older transformers


def inactive_switches(config: Any, tf32_available: bool) -> list[str]:
    """One line per switch that ``config`` turns on and this run does not apply, saying what would run it
    (said once at the start of the run). ``tf32_available``: whether this machine has TF32 matmuls."""
    lines = [f"{key}: inactive here (speed only, same loss): {SPEED_SWITCHES[key]}" for key in switches_on(config)]
    key, attention = config.requested_attention or (None, None)
    if runner := inactive_attention(attention):
        lines.append(f"{key}: {attention} inactive here (speed only, same loss): {runner}; the model's default attention runs")
    if config.tf32 and not tf32_available:
        lines.append("tf32: inactive here (speed only): TF32 is a matmul mode of Ampere or newer CUDA GPUs")
    return lines
