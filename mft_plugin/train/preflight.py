"""Checks that need the Hugging Face stack but not the model weights, run before any loading.

Schema validation (``config.py``) is kept free of torch/transformers imports so that a typo is
reported in well under a second; what needs transformers (its scheduler and optimizer names, the
model's config and tokenizer) is checked here, still before a single weight is read.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from mft_plugin.train.checkpoints import CheckpointError, check_named_checkpoint
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.config.errors import ConfigError
from mft_plugin.models.loading import load_tokenizer
from mft_plugin.train.outputs import OutputDirError, prepare_output_dir


def _one_of(key: str, value: str, allowed: list[str]) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of: {', '.join(sorted(allowed))}"]


def preflight(config: MFTConfigBase) -> None:
    """Raise :class:`ConfigError` listing every problem found, or return quietly."""
    problems = _one_of("lr_scheduler", config.lr_scheduler, [s.value for s in SchedulerType])
    problems += _one_of("optimizer", config.optimizer, [o.value for o in OptimizerNames])
    try:
        prepare_output_dir(config, create=False)
    except OutputDirError as error:
        problems.append(str(error))
    if isinstance(config.resume_from_checkpoint, str):
        try:
            check_named_checkpoint(Path(config.resume_from_checkpoint))
        except CheckpointError as error:
            problems.append(str(error))
    try:
        model_config = AutoConfig.from_pretrained(config.base_model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:  # not a model folder (no config.json), nor a reachable hub name
        detail = " ".join(str(error).split())  # one line per problem, like every other message
        raise ConfigError([*problems, f"base_model: cannot load {config.base_model!r}: {detail}"]) from None
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and config.sequence_len > positions:
        problems.append(
            f"sequence_len: {config.sequence_len} is longer than the model's {positions} positions "
            f"(max_position_embeddings of {config.base_model}); use at most {positions}"
        )
    tokenizer = load_tokenizer(config)
    model_vocab = getattr(model_config, "vocab_size", None)
    if model_vocab is not None and len(tokenizer) > model_vocab:
        problems.append(
            f"tokenizer_config: the tokenizer has {len(tokenizer)} tokens but {config.base_model} embeds only "
            f"{model_vocab}; use the model's own tokenizer (or resize the embeddings before finetuning)"
        )
    if problems:
        raise ConfigError(problems)
