"""Loading the tokenizer and the model with ``from_pretrained`` (hub names or local folders).

Quantized loads (bitsandbytes, ``load_in_4bit``/``load_in_8bit``) serve two ends: the base under
an adapter (QLoRA; the teacher is that same quantized base) and, for full finetuning, a cheap
frozen teacher (``teacher:``). Tokens added by ``special_tokens``/``tokens`` grow the embeddings of
every model loaded here the same way, so the frozen teacher is the student's starting point exactly.
Also the merge of a trained adapter into a plain model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import SafetensorError
from tokenizers import AddedToken
from transformers import AutoConfig, BitsAndBytesConfig, Mxfp4Config, PreTrainedModel, PreTrainedTokenizerBase

from mft_plugin.config.adapters import QuantizationKeys, TeacherConfig
from mft_plugin.config.schema import TEMPLATE_FORMAT, MFTConfigBase
from mft_plugin.models.experts import quantize_experts
from mft_plugin.models.precision import weight_dtype


def load_tokenizer(config: MFTConfigBase, with_added_tokens: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``tokenizer_config`` (default: ``base_model``), with a pad token and,
    unless told otherwise, the ``special_tokens`` and ``tokens`` the YAML adds (as Axolotl adds them)."""
    tokenizer_class = getattr(transformers, config.tokenizer_type, None)
    if tokenizer_class is None or not hasattr(tokenizer_class, "from_pretrained"):
        raise ValueError(f"tokenizer_type: {config.tokenizer_type!r} is not a transformers tokenizer class")
    legacy = {} if config.tokenizer_legacy is None else {"legacy": config.tokenizer_legacy}  # Axolotl passes it only when set
    tokenizer = tokenizer_class.from_pretrained(config.tokenizer_config or config.base_model, **hub_options(config), **legacy)
    if config.tokenizer_chat_template:
        tokenizer.chat_template = chat_template_text(tokenizer, config.tokenizer_chat_template)
    if with_added_tokens:
        add_configured_tokens(tokenizer, config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so any id will do
    return tokenizer


def hub_options(config: MFTConfigBase) -> dict[str, Any]:
    """The ``from_pretrained`` options of every file read from ``base_model`` (tokenizer, config, weights):
    remote code, and the hub revision (``revision_of_model``; transformers ignores it for a local folder)."""
    revision = {"revision": config.revision_of_model} if config.revision_of_model else {}
    return {"trust_remote_code": config.trust_remote_code, **revision}


def chat_template_text(tokenizer: PreTrainedTokenizerBase, keys: dict[str, str]) -> str:
    """The jinja text of a top-level ``chat_template`` (and ``chat_template_jinja``), resolved as the
    ``chat_template`` data format resolves an entry's (Axolotl's named templates, the tokenizer's own)."""
    from mft_plugin.registry import default_registry

    return default_registry().get("format", TEMPLATE_FORMAT).cls(**keys).template(tokenizer)


def add_configured_tokens(tokenizer: PreTrainedTokenizerBase, config: MFTConfigBase) -> None:
    """``special_tokens`` roles (new ones added, never split or normalized), then ``tokens``, then
    ``additional_special_tokens``, in Axolotl's order (``axolotl.loaders.tokenizer``)."""
    roles = config.special_tokens.model_dump(exclude_none=True) if config.special_tokens else {}
    additional = roles.pop("additional_special_tokens", None)
    for role, token in roles.items():
        tokenizer.add_special_tokens({role: AddedToken(token, rstrip=False, lstrip=False, normalized=False)})
    if config.tokens:
        tokenizer.add_tokens([AddedToken(token, rstrip=False, lstrip=False, normalized=False) for token in config.tokens])
    if additional:
        tokenizer.add_special_tokens({"additional_special_tokens": additional})


def mixed_precision(config: MFTConfigBase) -> Literal["bf16", "fp16"] | None:
    """``bf16``/``fp16`` as Axolotl resolves them: ``bf16: auto`` is bf16 on a GPU that supports it;
    otherwise fp16, unless ``fp16: false`` (``axolotl.utils.config.resolve_dtype``)."""
    if config.bf16 == "auto":
        if config.fp16:
            return "fp16"
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return None if config.fp16 is False else "fp16"
    return "bf16" if config.bf16 else "fp16" if config.fp16 else None


def compute_dtype(config: MFTConfigBase) -> torch.dtype:
    """The dtype the model computes in: that of the mixed precision, else the weights'."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, None: weight_dtype(config)}[mixed_precision(config)]


def quantization_config(keys: QuantizationKeys, model_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` the keys ask for, or None for full-precision weights.

    Unset, the 4-bit compute dtype is the model's (``model_dtype``), as Axolotl sets it."""
    if keys.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if keys.load_in_4bit:
        dtype = getattr(torch, keys.bnb_4bit_compute_dtype) if keys.bnb_4bit_compute_dtype else model_dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=keys.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=keys.bnb_4bit_use_double_quant,
        )
    return None


def model_class(config: MFTConfigBase) -> Any:
    """The transformers class ``model_type`` names (preflight checks that it exists)."""
    return getattr(transformers, config.model_type)


def load_model(config: MFTConfigBase, **overrides: Any) -> PreTrainedModel:
    """The base causal LM as the student starts from it: quantized if the top-level keys say so,
    with the attention implementation asked for and embeddings grown for added tokens."""
    # Weights load in float32 even for bf16/fp16 runs: those are mixed-precision compute (autocast).
    kwargs: dict[str, Any] = {"dtype": weight_dtype(config), **hub_options(config)}
    kwargs["quantization_config"] = quantization_config(config, compute_dtype(config))
    if config.attention is not None:
        kwargs["attn_implementation"] = config.attention
    if config.model_config_:  # Axolotl's overrides of config.json, set as attributes (loaders/utils.py)
        kwargs["config"] = AutoConfig.from_pretrained(config.base_model, **hub_options(config))
        for key, value in config.model_config_.items():
            setattr(kwargs["config"], key, value)
    kwargs.update(overrides)
    if config.model_quantization_config and kwargs["quantization_config"] is None:
        # every load of an MXFP4 checkpoint (student, teacher, the base of a merge) reads it dequantized:
        # each weight is its FP4 value times its block's power-of-two scale, exact in float32
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    try:
        model = model_class(config).from_pretrained(config.base_model, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(describe_load_error(config.base_model, error)) from error
    keep_4bit_layout_on_cpu(model)
    if config.quantize_moe_experts and isinstance(kwargs["quantization_config"], BitsAndBytesConfig):
        quantize_experts(model, config)  # after the linear layers, as Axolotl
    grow_embeddings(model, config)
    return model


def grow_embeddings(model: PreTrainedModel, config: MFTConfigBase) -> None:
    """Embeddings (and an untied head) grown to the tokenizer's length when tokens were added
    (``resize_token_embeddings_to_32x``: to the next multiple of 32, as Axolotl, for faster matmuls).

    transformers initializes the new rows from the old ones' mean and covariance, a random draw:
    it is seeded with ``seed`` so that every load (student, frozen teacher, the base of a merge)
    gets the same rows, and the teacher is exactly the student's starting point.
    """
    if not (config.special_tokens or config.tokens or config.resize_token_embeddings_to_32x):
        return
    size = len(load_tokenizer(config))
    size = math.ceil(size / 32) * 32 if config.resize_token_embeddings_to_32x else size  # Axolotl's rounding
    if model.get_input_embeddings().num_embeddings >= size:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.resize_token_embeddings(size)


class ModelLoadError(RuntimeError):
    """The base model's files could not be loaded; the message names the file."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def describe_load_error(base_model: str, error: BaseException) -> str:
    """One line naming the file at fault: missing weights, a damaged weight file, or a ``config.json``
    whose sizes disagree with the weights (transformers' own messages span many lines)."""
    detail = " ".join(str(error).split())[:600]
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return f"base_model: cannot load {base_model!r}: {detail}"
    present = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        return f"base_model: {folder} has no weights (none of {', '.join(WEIGHT_FILES)}); {detail}"
    if any(sign in detail for sign in ("size mismatch", "mismatched_sizes", "shape")):
        return (
            f"base_model: {folder / 'config.json'} does not match the weights in {present[0]} "
            f"(sizes differ): {detail}"
        )
    return f"base_model: cannot read {present[0]} (truncated or damaged?): {detail}"


def load_frozen_teacher(config: MFTConfigBase) -> PreTrainedModel:
    """Full finetuning's frozen teacher copy, held as ``teacher:`` says (default: like the student).

    A 4-bit teacher stores ~0.5 byte per linear weight instead of 4, a bfloat16 one 2; p^T is then
    the quantized/rounded model's distribution, not the float32 base's (README "Cheap teacher").
    """
    options = config.teacher or TeacherConfig()
    dtype = getattr(torch, options.dtype) if "dtype" in options.model_fields_set else weight_dtype(config)  # default: the student's
    return load_model(config, dtype=dtype, quantization_config=quantization_config(options, dtype))


def keep_4bit_layout_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (bitsandbytes 0.50).

    On a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode without autograd (the
    teacher's) repacks its weight *in place* into a layout whose matmul has no backward, and which
    needs out_features divisible by 32 (the shipped model's 688-wide MLP fails). The student's
    adapters train through those same layers, so they keep the ordinary, differentiable layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_merged_model(config: MFTConfigBase, adapter_dir: Path, merged_dir: Path) -> None:
    """The adapter saved in ``adapter_dir`` merged into the float32 base, saved as a plain model.

    The base is reloaded unquantized, so a QLoRA adapter merges into the weights' dtype
    (merging into 4-bit weights would round the update away).
    """
    from peft import PeftModel

    base = load_model(config, quantization_config=None)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    load_tokenizer(config).save_pretrained(str(merged_dir))
