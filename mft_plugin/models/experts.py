"""Mixture-of-experts weights: ``quantize_moe_experts`` (Axolotl's key).

transformers 5 stores a layer's experts fused, as 3D ``nn.Parameter`` tensors (``experts.gate_up_proj``
of shape [experts, out, in]) rather than ``nn.Linear`` modules, so ``load_in_4bit`` leaves them in
full precision: for a MoE model most of the weights. As Axolotl does, they are quantized after loading
with bitsandbytes' 4-bit parametrization (the stored tensor is packed NF4/FP4, dequantized on access), or
with ``load_in_8bit`` to LLM.int8's row-wise int8 (Axolotl's ``Bnb8bitParametrization``),
for the student's frozen base and the frozen teacher alike: p^T is then the quantized base's
distribution, exactly as with ``load_in_4bit`` for the linear layers (README "Cheap teacher").
"""

from __future__ import annotations

import torch

from mft_plugin.config.adapters import QuantizationKeys


def expert_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of each fused expert weight in full precision: a floating-point parameter of 3 or more
    dimensions under an ``expert`` module path (Axolotl's rule: ``"expert" in name``); quantized ones are not."""
    found = []
    for path, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim >= 3 and parameter.is_floating_point() and "expert" in f"{path}.{name}".lower():
                found.append((module, name))
    return found


class Int8RowsParametrization(torch.nn.Module):
    """An expert weight stored as int8 rows (each row scaled by its absolute maximum over 127, LLM.int8's
    vector-wise quantization), dequantized on access; rows run along the last dimension."""

    def __init__(self, row_stats: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("row_stats", row_stats)

    @torch.no_grad()
    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(stored.reshape(-1, stored.shape[-1]), self.row_stats).reshape(stored.shape)


def replace_parameter_8bit(module: torch.nn.Module, name: str) -> None:
    """``module.name`` replaced by its int8 rows (of its float16 copy, as Axolotl quantizes it), dequantized
    on access. The rows are flattened to 2D first: bitsandbytes' CPU kernel takes no 3D tensor."""
    from bitsandbytes.functional import int8_vectorwise_quant
    from torch.nn.utils import parametrize

    weight = getattr(module, name).data
    rows, row_stats, _ = int8_vectorwise_quant(weight.reshape(-1, weight.shape[-1]).to(torch.float16))
    setattr(module, name, torch.nn.Parameter(rows.reshape(weight.shape), requires_grad=False))
    parametrize.register_parametrization(module, name, Int8RowsParametrization(row_stats), unsafe=True)


def quantize_experts(model: torch.nn.Module, keys: QuantizationKeys) -> int:
    """Quantize ``model``'s fused expert weights in place as ``keys`` say (8-bit rows with ``load_in_8bit``,
    else 4-bit with ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``); the number quantized (0 for a
    dense model)."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    experts = expert_parameters(model)
    for module, name in experts:
        getattr(module, name).requires_grad_(False)  # frozen base: the adapter trains, as under QLoRA
        if keys.load_in_8bit:
            replace_parameter_8bit(module, name)
        else:
            replace_parameter_4bit(
                module, name, compress_statistics=keys.bnb_4bit_use_double_quant, quant_type=keys.bnb_4bit_quant_type
            )
    return len(experts)
