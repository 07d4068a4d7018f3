"""Mixture-of-experts weights: ``quantize_moe_experts`` (Axolotl's key).

transformers 5 stores a layer's experts fused, as 3D ``nn.Parameter`` tensors (``experts.gate_up_proj``
of shape [experts, out, in]) rather than ``nn.Linear`` modules, so ``load_in_4bit`` leaves them in
full precision: for a MoE model most of the weights. As Axolotl does, they are quantized after loading
with bitsandbytes' 4-bit parametrization (the stored tensor is packed NF4/FP4, dequantized on access),
for the student's frozen base and the frozen teacher alike: p^T is then the quantized base's
distribution, exactly as with ``load_in_4bit`` for the linear layers (README "Cheap teacher").
"""

from __future__ import annotations

import torch

from mft_plugin.config.adapters import QuantizationKeys


def expert_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of each fused expert weight: a parameter of 3 or more dimensions under an
    ``expert`` module path (Axolotl's rule: ``"expert" in name``)."""
    found = []
    for path, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim >= 3 and "expert" in f"{path}.{name}".lower():
                found.append((module, name))
    return found


def quantize_experts(model: torch.nn.Module, keys: QuantizationKeys) -> int:
    """Quantize ``model``'s fused expert weights in place as ``keys`` say (``bnb_4bit_quant_type``,
    ``bnb_4bit_use_double_quant``); the number quantized (0 for a dense model)."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    experts = expert_parameters(model)
    for module, name in experts:
        getattr(module, name).requires_grad_(False)  # frozen base: the adapter trains, as under QLoRA
        replace_parameter_4bit(
            module, name, compress_statistics=keys.bnb_4bit_use_double_quant, quant_type=keys.bnb_4bit_quant_type
        )
    return len(experts)
