"""YAML keys of adapters and quantized bases: Axolotl's spellings, and what may go with what.

Three things live here, all schema (no torch, no peft: a typo is reported before either loads):

- :class:`QuantizationKeys`, bitsandbytes' ``load_in_4bit``/``load_in_8bit``/``bnb_4bit_*`` keys
  (Axolotl's and transformers' names), for the base at the top level and for ``teacher:``;
- :func:`adapter_from_axolotl_keys`: Axolotl's top-level ``adapter: lora|qlora``, ``lora_r``, ...
  are a *spelling* of the adapter mitigation (``mitigations: [{name: lora, r: 8}]``). They are
  rewritten into that entry before validation, so a resolved config (``--validate``, the run's
  ``config.yml``) holds one spelling only; giving both spellings is an error naming both;
- :func:`adapter_problems`: a quantized base trains only through an adapter; ``teacher:`` options
  apply only without one (with an adapter the teacher *is* the student's base, paper Sec. 2,
  "Training cost"); ``merge_adapter`` needs one.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

ADAPTER_GROUP = "adapter"  # the Mitigation.exclusive_group of peft adapters (lora, dora, ia3)

# Axolotl's top-level key -> the lora/dora mitigation's parameter (peft's own option name)
AXOLOTL_LORA_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "lora_fan_in_fan_out": "fan_in_fan_out",
    "lora_model_dir": "lora_model_dir",
    "lora_target_parameters": "target_parameters",  # peft's LoRA of parameters (fused MoE experts)
    "peft_use_rslora": "use_rslora",  # peft's rank-stabilized scale lora_alpha / sqrt(r)
}
AXOLOTL_ADAPTERS = {"lora": "lora", "qlora": "lora"}  # `adapter:` value -> mitigation name
AXOLOTL_FLAGS = ("lora_target_linear", "peft_use_dora")
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


class QuantizationKeys(BaseModel):
    """bitsandbytes quantization of a model as it loads (``BitsAndBytesConfig``'s key names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_in_4bit: bool = Field(False, description="4-bit (NF4/FP4) base weights; train through an adapter (QLoRA)")
    load_in_8bit: bool = Field(False, description="8-bit (LLM.int8) base weights; train through an adapter")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the 4-bit matmuls; empty: the model's compute dtype, as in Axolotl (bf16/fp16 or float32)"
    )
    bnb_4bit_use_double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/weight; Axolotl's default)")

    @model_validator(mode="after")
    def _one_width(self) -> QuantizationKeys:
        if self.load_in_4bit and self.load_in_8bit:
            raise PydanticCustomError("quantization", "load_in_4bit and load_in_8bit cannot both be true; choose one")
        return self

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


class TeacherConfig(QuantizationKeys):
    """``teacher:``, how full finetuning holds its frozen teacher copy (README "Cheap teacher").

    A quantized or lower-dtype teacher makes MFT's extra memory a fraction of the model, at the
    price of p^T being that quantized/rounded model's distribution rather than the base's own.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the teacher's weights (of its unquantized parts when quantized)"
    )

    @property
    def changes_the_teacher(self) -> bool:
        return self.quantized or self.dtype != "float32"


def _entry_names(mitigations: Any) -> list[str]:
    items = [mitigations] if isinstance(mitigations, (str, dict)) else mitigations or []
    names = [item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None for item in items]
    return [name for name in names if isinstance(name, str)]


def adapter_from_axolotl_keys(data: Any, adapter_names: set[str]) -> Any:
    """``data`` with Axolotl's top-level adapter keys rewritten into a ``mitigations`` entry.

    ``adapter: lora`` (or ``qlora``, which also needs ``load_in_4bit``) selects ``lora``, or
    ``dora`` with ``peft_use_dora: true``; ``lora_target_linear: true`` is peft's ``"all-linear"``, joined
    with ``lora_target_modules`` when both are given (Axolotl takes their union). An empty ``adapter:``
    is full finetuning.
    ``adapter_names`` are the registered mitigations of the adapter group, for the conflict check.
    """
    if not isinstance(data, dict):
        return data
    axolotl_keys = ("adapter", *AXOLOTL_LORA_KEYS, *AXOLOTL_FLAGS)  # empty (or a flag false): not given
    data = {key: value for key, value in data.items() if not (key in axolotl_keys and value in (None, False) and (value is None or key in AXOLOTL_FLAGS))}
    given = [key for key in axolotl_keys[1:] if key in data]
    chosen = [name for name in _entry_names(data.get("mitigations")) if name in adapter_names]  # adapters chosen there
    if "adapter" not in data:  # absent or left empty: full finetuning, and the adapter keys unread (Axolotl)
        if given and chosen:  # the user means them for that adapter, where they are spelled otherwise
            message = "{key} is an Axolotl adapter key and needs `adapter: lora`; with mitigations: {name}, set it in the mitigation ({hint})"
            raise PydanticCustomError("adapter_key", message, {"key": given[0], "name": chosen[0], "hint": "mitigations: [{name: lora, r: 8}]"})
        if given:
            data = {key: value for key, value in data.items() if key not in given}
            data["adapter_keys_without_adapter"] = given
        return data
    adapter = data.pop("adapter")
    if adapter not in AXOLOTL_ADAPTERS:
        message = "adapter: {value} is not one of: lora, qlora (IA3 is `mitigations: [ia3]`)"
        raise PydanticCustomError("adapter", message, {"value": repr(adapter)})
    if adapter == "qlora" and not data.get("load_in_4bit"):
        raise PydanticCustomError("adapter", "adapter: qlora needs load_in_4bit: true (QLoRA is LoRA on a 4-bit base)")
    name = "dora" if data.pop("peft_use_dora", False) else AXOLOTL_ADAPTERS[adapter]
    entry = {"name": name, **{param: data.pop(key) for key, param in AXOLOTL_LORA_KEYS.items() if key in data}}
    if data.pop("lora_target_linear", False):  # every linear layer, plus the named ones (Axolotl's union)
        named = entry.get("target_modules") or []
        entry["target_modules"] = [ALL_LINEAR, *([named] if isinstance(named, str) else named)] if named else ALL_LINEAR
    if chosen:
        message = "adapter: {adapter} and mitigations: {other} both choose an adapter; keep one of them"
        raise PydanticCustomError("adapter_conflict", message, {"adapter": adapter, "other": chosen[0]})
    existing = data.get("mitigations") or []
    data["mitigations"] = [*([existing] if isinstance(existing, (str, dict)) else existing), entry]
    return data


def adapter_problems(
    base: QuantizationKeys, teacher: TeacherConfig | None, merge_adapter: bool, adapter: str | None, unfrozen: bool = False
) -> list[str]:
    """What the quantization, ``teacher``, ``merge_adapter`` and ``unfrozen_parameters`` keys cannot do with
    (or without) an adapter."""
    problems = []
    if unfrozen and adapter is not None:  # Axolotl freezes the peft-wrapped model, whose names start base_model.model.
        problems.append(
            f"unfrozen_parameters: freezes all but the named parameters of a full finetuning; with the {adapter!r} adapter "
            "the adapter's weights are what trains (in Axolotl the patterns would freeze them too); choose what trains "
            "with lora_target_modules / lora_modules_to_save, or drop the adapter"
        )
    if base.quantized and adapter is None:
        width = "load_in_4bit" if base.load_in_4bit else "load_in_8bit"
        problems.append(
            f"{width}: a quantized base trains only through an adapter: add `mitigations: [lora]` (QLoRA), "
            f"or quantize only the frozen teacher of a full finetuning with `teacher: {{{width}: true}}`"
        )
    if teacher is not None and teacher.changes_the_teacher and adapter is not None:
        problems.append(
            f"teacher: with the {adapter!r} adapter the teacher is the student's own base (adapters disabled), "
            "held as the top-level load_in_4bit/load_in_8bit keys say; remove `teacher:`"
        )
    if merge_adapter and adapter is None:
        problems.append("merge_adapter: true needs an adapter mitigation (lora, dora or ia3) to merge")
    quantized = base.quantized or (teacher is not None and teacher.quantized)
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("load_in_4bit/load_in_8bit: need bitsandbytes: pip install 'mft-plugin[quantization]'")
    return problems
