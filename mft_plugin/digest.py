"""One key for every cache: the hash of what the cached thing was computed *from*.

Four caches outlive a run: the tokenized data (``dataset_prepared_path``), the base perplexities, the
teacher cache and the EWC Fisher. Each used to list by hand the config keys it depended on, and the
lists drifted: a sweep over ``train_on_inputs`` read the first run's base perplexity for the second,
so its S (paper Sec. 3.1) was measured against another model's data. :func:`cache_key` hashes

- the rows themselves, every column (input ids, labels, position ids, attention mask, routing
  columns), so that whatever config key changes a row changes the key without being named;
- the model as it is held: its files by content, the tokenizer, the added tokens (new embedding rows
  drawn with the seed), precision, quantization, attention implementation, class and remote code;
- what the cache itself adds (its kind, format, settings).

The tokenized data is computed before any row exists: its key hashes its inputs instead (data files,
tokenizer, and every key of the config but those that cannot change a row, :data:`NOT_ROW_SHAPING`),
through the same :func:`cache_key`, so a key added to the schema later counts until it is declared
irrelevant: a forgotten key costs a re-tokenization, never a stale cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from mft_plugin.config.adapters import QuantizationKeys
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.files import fingerprint
from mft_plugin.models.precision import precision_name, weight_dtype


def rows_digest(rows: Dataset) -> str:
    """sha256 of every column of ``rows`` in row order (the dataset's view: selections and shuffles count).

    Hashed from the Arrow buffers as numpy bytes (int64 values plus per-row lengths), not row by row
    in Python: 5.7M tokens (2800 rows of 2048) hash in 0.3 s on one CPU core.
    """
    table = rows.with_format("arrow")[:] if len(rows) else rows.data.table.slice(0, 0)
    digest = hashlib.sha256(f"rows={len(rows)}".encode())
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        digest.update(f"\0{name}:{column.type}".encode())
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            digest.update(np.asarray(column.value_lengths().fill_null(-1), dtype=np.int64).tobytes())
            column = column.flatten()
        if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
            digest.update(np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
        else:  # no model input, but a column all the same: hashed as text
            digest.update(repr(column.to_pylist()).encode())
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors (name, shape, dtype and values): e.g. the starting parameters a Fisher is taken at."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}:{tuple(values.shape)}:{values.dtype}".encode() + values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_settings(config: MFTConfigBase) -> dict[str, Any]:
    """How the base model is held and computed: everything but its files that changes its outputs."""
    # added tokens, or rows up to a multiple of 32: new embedding rows, drawn with the seed
    grown = bool(config.special_tokens or config.tokens or config.resize_token_embeddings_to_32x)
    return {
        "base_model": config.base_model,
        "revision": config.revision_of_model,
        "tokenizer": [config.tokenizer_config, config.tokenizer_type, config.tokenizer_legacy],
        "model_type": config.model_type,
        "trust_remote_code": config.trust_remote_code,
        "added_tokens": {
            **config.model_dump(mode="json", include={"special_tokens", "tokens", "resize_token_embeddings_to_32x"}), "seed": config.seed,
        } if grown else None,
        "model_config": config.model_config_,  # config.json attributes set before loading
        "quantize_moe_experts": config.quantize_moe_experts,
        "checkpoint_format": config.model_quantization_config,  # Mxfp4Config: read dequantized
        "precision": precision_name(config.bf16, config.fp16),
        "weights": str(weight_dtype(config)),
        "quantization": config.model_dump(mode="json", include=set(QuantizationKeys.model_fields)),
        "attn_implementation": config.attention,
    }


def cache_key(
    kind: str,
    config: MFTConfigBase,
    *,
    rows: Sequence[Dataset] = (),
    files: Sequence[str] = (),
    settings: Any = None,
    model: bool = True,
) -> str:
    """The key of a cache of ``kind`` computed from ``rows`` (each hashed whole), local ``files`` (by
    content) and the cache's own ``settings``; with ``model`` (the default) also from the base model's
    files and :func:`model_settings`. The tokenizer's files always count."""
    tokenizer = config.tokenizer_config or config.base_model
    sources = [config.base_model, *([tokenizer] if tokenizer != config.base_model else [])] if model else [tokenizer]
    identity = {
        "kind": kind,
        "model": model_settings(config) if model else None,
        "rows": [rows_digest(part) for part in rows],
        "settings": settings,
    }
    return fingerprint(*sources, *files, settings=identity)


NOT_ROW_SHAPING = frozenset({  # keys that cannot change a tokenized row; every other key is hashed
    "base_model", "tokenizer_config",  # hashed by content, as files
    "trust_remote_code", "model_type", "attn_implementation", "flash_attention", "sdp_attention", "eager_attention",
    "flex_attention", "teacher", "merge_adapter", "pad_to_sequence_len", "dataset_prepared_path",
    "micro_batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate",
    "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm", "adam_beta1",
    "adam_beta2", "adam_epsilon", "bf16", "fp16", "tf32", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "group_by_length", "ddp_find_unused_parameters", "dataloader_num_workers", "skip_nonfinite_batches", "fsdp",
    "fsdp_config", "deepspeed", "loss_impl", "teacher_cache", "output_dir", "overwrite_output_dir",
    "resume_from_checkpoint", "logging_steps", "eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch",
    "save_total_limit", "early_stopping_patience", "loss_watchdog_threshold", "loss_watchdog_patience", "strict",
    "use_wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_mode", "wandb_watch",
    "wandb_log_model", "use_tensorboard", "max_degeneralization", "target_specialization", "sweep",
    "objective", "mitigations", "model_quantization_config", "model_quantization_config_kwargs", "hf_use_auth_token",
    *QuantizationKeys.model_fields,
})  # fmt: skip


def data_key(config: MFTConfigBase) -> str:
    """The key of the tokenized data of ``config`` (``dataset_prepared_path``): its data files and
    tokenizer by content and every key that may shape a row. ``val_set_size`` counts only when the
    held-out set is split off the training data, and ``seed`` only when it draws rows (that split, or
    an entry's ``shards``)."""
    specs = [*config.datasets, *(config.test_datasets or []), *(config.general_eval_datasets or [])]
    files = [spec.path for spec in specs] + [f for spec in specs for f in _data_files(spec.data_files)]
    split = bool(config.val_set_size and not config.test_datasets)
    drawn = split or any(spec.shards is not None for spec in specs)
    ignored = NOT_ROW_SHAPING | (set() if split else {"val_set_size"}) | (set() if drawn else {"seed"})
    settings = config.model_dump(mode="json", exclude=set(ignored))
    return cache_key("tokenized data", config, files=files, settings=settings, model=False)


def _data_files(data_files: str | list[str] | None) -> list[str]:
    return [data_files] if isinstance(data_files, str) else list(data_files or [])
