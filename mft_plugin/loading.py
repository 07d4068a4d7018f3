"""Loading the tokenizer and the model with ``from_pretrained`` (hub names or local folders)."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from mft_plugin.config import MFTConfigBase


def load_tokenizer(config: MFTConfigBase) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``tokenizer_config`` (default: ``base_model``), with a pad token."""
    tokenizer_class = getattr(transformers, config.tokenizer_type, None)
    if tokenizer_class is None or not hasattr(tokenizer_class, "from_pretrained"):
        raise ValueError(f"tokenizer_type: {config.tokenizer_type!r} is not a transformers tokenizer class")
    tokenizer = tokenizer_class.from_pretrained(
        config.tokenizer_config or config.base_model, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so any id will do
    return tokenizer


def load_model(config: MFTConfigBase, **overrides: Any) -> PreTrainedModel:
    """The base causal LM, as the student starts from it (and as a frozen teacher copy)."""
    # Weights load in float32 even for bf16/fp16 runs: those are mixed-precision compute (autocast).
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code}
    kwargs.update(overrides)
    return AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
