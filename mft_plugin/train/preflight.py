"""Checks that need the Hugging Face stack but not the model weights, run before any loading.

Schema validation (``config.py``) is kept free of torch/transformers imports so that a typo is
reported in well under a second; what needs transformers (its scheduler and optimizer names, the
model's config and tokenizer) is checked here, still before a single weight is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PreTrainedTokenizerBase
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from mft_plugin.train.checkpoints import CheckpointError, check_named_checkpoint, check_resume_config, resume_checkpoint
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.config.errors import ConfigError, with_locations
from mft_plugin.models.heads import LogitTransform, UnfusableError
from mft_plugin.models.loading import hub_options, load_tokenizer
from mft_plugin.teacher.projected import linearity_problem
from mft_plugin.train.outputs import OutputDirError, prepare_output_dir



EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # Llama, Mistral, Qwen, Gemma, Phi-3 spell them so


def _one_of(key: str, value: str, allowed: list[str]) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of: {', '.join(sorted(allowed))}"]


def machine_problems(config: MFTConfigBase) -> list[str]:
    """Keys asking for what this machine or the installed libraries lack: CUDA-only switches on a CPU."""
    problems = []
    key, attention = config.attention_choice or (None, None)
    if attention is not None and attention != "eager" and attention not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        allowed = ", ".join(["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()])
        problems.append(f"{key}: {attention!r} is not an attention implementation of transformers; one of: {allowed}")
    if not hasattr(transformers, config.model_type):
        problems.append(f"model_type: {config.model_type!r} is not a class of transformers {transformers.__version__}")
    return problems


def checkpoint_quantization_problems(config: MFTConfigBase, model_config: object) -> list[str]:
    """A checkpoint stored quantized (``quantization_config`` in its config.json) would load through a
    quantizer whose weights are not the ones trained and measured here: MXFP4 loads dequantized, exactly,
    when the YAML says so; bitsandbytes checkpoints load as bitsandbytes layers; any other scheme is refused."""
    stored = getattr(model_config, "quantization_config", None) or {}
    method = stored.get("quant_method") if isinstance(stored, dict) else getattr(stored, "quant_method", None)
    method = getattr(method, "value", method)
    if method in (None, "bitsandbytes") or (method == "mxfp4" and config.model_quantization_config == "Mxfp4Config"):
        return []
    where = f"{config.base_model} stores its weights quantized ({method}, config.json quantization_config)"
    if method == "mxfp4":
        return [f"base_model: {where}; set model_quantization_config: Mxfp4Config with model_quantization_config_kwargs: "
                "{dequantize: true} to train on its exact dequantized weights"]
    return [f"base_model: {where}, a scheme mft-run does not train on (it changes the weights and the loss); "
            "use the unquantized checkpoint, with load_in_4bit/load_in_8bit for a quantized base"]


def fusion_problems(config: MFTConfigBase, model_config: object) -> list[str]:
    """``teacher_cache`` and ``loss_impl: chunked`` need the fused loss: a model whose config changes its
    logits after the head in a way the fused loss does not reproduce is refused here, before any data is
    tokenized or weight loaded (the probe forward after loading catches what no config key says)."""
    if config.teacher_cache is None and config.loss_impl != "chunked":
        return []
    try:
        LogitTransform.of(model_config)
    except UnfusableError as error:
        key = "teacher_cache" if config.teacher_cache is not None else "loss_impl"
        return [f"{key}: needs the fused loss, which {config.base_model} cannot take: {error}; use loss_impl: naive without a teacher_cache"]
    return []


def token_problems(config: MFTConfigBase, tokenizer: PreTrainedTokenizerBase, model_vocab: int | None) -> list[str]:
    """The tokenizer against the model, before ``special_tokens``/``tokens`` grow the embeddings.

    With an adapter, a new token other than padding would keep a random, frozen embedding: as in
    Axolotl, the embeddings and the head must then be trained in full (``lora_modules_to_save``)."""
    problems = []
    if model_vocab is not None and len(tokenizer) > model_vocab:
        problems.append(
            f"tokenizer_config: the tokenizer has {len(tokenizer)} tokens but {config.base_model} embeds only "
            f"{model_vocab}; use the model's own tokenizer (or resize the embeddings before finetuning)"
        )
    roles = config.special_tokens.model_dump(exclude_none=True) if config.special_tokens else {}
    roles.pop("pad_token", None)  # padding is masked out of the loss: its embedding is never learned from
    wanted = [t for v in roles.values() for t in (v if isinstance(v, list) else [v])] + list(config.tokens or [])
    new = [token for token in wanted if token not in tokenizer.get_vocab()]
    saved = _saved_modules(config)
    if new and saved and not set(EMBEDDING_MODULES) <= saved[0]:
        problems.append(
            f"special_tokens: {', '.join(new)} would be new tokens with frozen random embeddings under the adapter; "
            f"set lora_modules_to_save: [{', '.join(EMBEDDING_MODULES)}] to train them (as Axolotl requires)"
        )
    return problems


def _saved_modules(config: MFTConfigBase) -> list[set[str]]:
    """Per adapter mitigation (those that take ``modules_to_save``), the modules it trains in full."""
    return [set(getattr(spec, "modules_to_save", None) or []) for spec in config.mitigations if hasattr(spec, "modules_to_save")]


def projected_cache_problems(config: MFTConfigBase, model_config: Any) -> list[str]:
    """``teacher_cache.layout: projected`` where its identity cannot hold (:mod:`mft_plugin.teacher.projected`):
    the head must be the frozen base head shared with the teacher, and the logits linear in it."""
    if config.teacher_cache is None or config.teacher_cache.layout != "projected":
        return []
    saved = _saved_modules(config)
    tied = getattr(model_config, "tie_word_embeddings", False)
    trained = {"lm_head", "embed_tokens"} if tied else {"lm_head"}
    if not saved:
        problem = "there is no adapter (full finetuning trains the head)"
    elif trained & saved[0]:
        problem = f"lora_modules_to_save trains {', '.join(sorted(trained & saved[0]))}, so the head trains"
    else:
        problem = linearity_problem(model_config)
    if problem is None:
        return []
    return [f"teacher_cache.layout: 'projected' cannot be used: {problem}; it needs a frozen LM head shared by teacher "
            "and student and logits linear in it; use layout: auto or hidden_states"]


def preflight(config: MFTConfigBase, source: str | None = None, overrides: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` listing every problem found, or return quietly.

    ``source``/``overrides``: the YAML file and ``--set`` options the config came from, so that each
    problem names its ``file:line`` (or ``--set``) like the schema's.
    """
    problems = _output_problems(config)
    problems += _one_of("lr_scheduler", config.lr_scheduler, [s.value for s in SchedulerType])
    problems += _one_of("optimizer", config.optimizer, [o.value for o in OptimizerNames])
    problems += machine_problems(config)
    try:
        model_config = AutoConfig.from_pretrained(config.base_model, **hub_options(config))
    except (OSError, ValueError) as error:  # not a model folder (no config.json), nor a reachable hub name
        problems.append(f"base_model: cannot load {config.base_model!r}: {_one_line(error)}")
        raise ConfigError(with_locations(problems, source, overrides)) from None
    problems += checkpoint_quantization_problems(config, model_config)
    problems += fusion_problems(config, model_config)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and config.sequence_len > positions:
        problems.append(
            f"sequence_len: {config.sequence_len} is longer than the model's {positions} positions "
            f"(max_position_embeddings of {config.base_model}); use at most {positions}"
        )
    try:
        tokenizer = load_tokenizer(config, with_added_tokens=False)
    except (OSError, ValueError) as error:  # an unknown tokenizer_type, a missing or broken tokenizer_config
        key = "tokenizer_type" if "tokenizer_type" in str(error) else "tokenizer_config" if config.tokenizer_config else "base_model"
        problems.append(f"{key}: cannot load the tokenizer: {_one_line(error)}")
        raise ConfigError(with_locations(problems, source, overrides)) from None
    problems += projected_cache_problems(config, model_config)
    vocab_problems = token_problems(config, tokenizer, getattr(model_config, "vocab_size", None))
    problems += vocab_problems
    if not vocab_problems and config.tokenizer_config:
        problems += other_vocabulary_problems(config, tokenizer)
    if problems:
        raise ConfigError(with_locations(problems, source, overrides))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line per problem, like every other message


def _output_problems(config: MFTConfigBase) -> list[str]:
    """The output folder (writable, not another run's) and the checkpoint a resume would start from."""
    try:
        output_dir = prepare_output_dir(config, create=False)
    except OutputDirError as error:
        return [str(error)]
    try:
        if isinstance(config.resume_from_checkpoint, str):
            check_named_checkpoint(Path(config.resume_from_checkpoint))
        checkpoint = resume_checkpoint(config.resume_from_checkpoint, output_dir)
        if checkpoint is not None:
            check_resume_config(checkpoint, config.model_dump(mode="json"))
    except CheckpointError as error:
        return [str(error)]
    return []


def other_vocabulary_problems(config: MFTConfigBase, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Refuse a ``tokenizer_config`` that maps tokens to other ids than the model's own tokenizer does.

    Such a tokenizer may fit the embedding size, yet the model would read each of those tokens as
    another one: every loss and perplexity would be measured on scrambled text. A tokenizer that only
    lacks some of the model's tokens (the same ids for all it has) is accepted.
    """
    try:
        own = load_tokenizer(config.model_copy(update={"tokenizer_config": None}), with_added_tokens=False)
    except (OSError, ValueError):  # the model ships no tokenizer: nothing to compare with
        return []
    own_ids = own.get_vocab()
    differing = sum(1 for token, index in tokenizer.get_vocab().items() if own_ids.get(token) != index)
    if not differing:
        return []
    return [
        f"tokenizer_config: {config.tokenizer_config} maps {differing} token(s) to other ids than "
        f"{config.base_model}'s own tokenizer, so the model would read them as other tokens; "
        "use the model's own tokenizer (leave tokenizer_config out)"
    ]
