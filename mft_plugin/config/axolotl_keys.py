"""Axolotl's top-level keys that mft-run refuses, each with the reason it does not apply.

Every key of Axolotl 0.19's example YAMLs is either a field of the schema (implemented with
Axolotl's meaning) or listed here (README "Axolotl's keys"). A refused key given its "off" value
(empty, ``false``; for a few, the value mft-run always uses) asks for nothing and is accepted, so
an Axolotl YAML that spells out its defaults validates unchanged; any other value is an error
naming the key, the value and why, never a key accepted and ignored. Keys of the data side
(``datasets`` entry types, ``sample_packing``, ``chat_template``, ...) are not listed here: they
belong to the data formats.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model, field_validator
from pydantic_core import PydanticCustomError

OFF = (None, False)

_CUDA = "a CUDA-only kernel (Triton/CUDA); mft-run's loss is its own chunked fused loss (loss_impl)"
_PARALLEL = "tensor/context/expert parallelism is not an engine of mft-run (DDP, FSDP2, DeepSpeed ZeRO)"
_RL = "a preference/RL or reward-model trainer of Axolotl; mft-run trains causal LMs with MFT's objectives"
_CLOUD = "an Axolotl cloud launcher setting (axolotl cloud), not a training key"
_VISION = "a multimodal (vision/audio) setting; mft-run trains text-only causal LMs"
_METHOD = "another finetuning method of Axolotl; MFT's alternatives are mft-run strategies (mft-run --list)"
_QUANT = "a quantization scheme mft-run does not load; bitsandbytes load_in_4bit/load_in_8bit are supported"
_LOGGER = "a tracker mft-run does not report to; use wandb_project or use_tensorboard"
_COMPILE = "torch.compile is not validated against the reference loss here (exactness first)"
_FP8 = "fp8 training needs Hopper/Ada GPUs and changes the loss; not supported"
_NOISE = "NEFTune noise on the student's embeddings: MFT corrects the student toward the teacher on the same inputs"
_OPTIMIZER = "an optimizer or schedule setting mft-run does not implement; the optimizer is `optimizer` (AdamW by default)"
_GENERATION = "sample generation and benchmark evaluation; evaluation is perplexity, S and DG (paper Sec. 3.1)"
_DATA = "a data-loading setting of Axolotl; mft-run tokenizes, packs and caches the datasets itself"
_LOOP = "a Trainer/dataloader setting mft-run leaves at transformers' default"
_BEST = "the final model is always the checkpoint of least specialized validation perplexity (paper Sec. 3.1)"

# key -> (why it is refused, the values that ask for nothing and are accepted)
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    # kernels and patches
    **{
        key: (_CUDA, OFF)
        for key in (
            "pretrain_multipack_attn",
        )
    },
    "flex_attn_compile_kwargs": ("torch.compile of flex attention is not run by mft-run", OFF),
    **{key: (_COMPILE, OFF) for key in ("torch_compile", "torch_compile_mode", "torch_compile_backend", "torch_compile_options")},
    **{key: (_FP8, OFF) for key in ("fp8", "fp8_enable_fsdp_float8_all_gather", "fp8_config")},
    "torch_dtype": ("the weights' dtype follows bf16/fp16 (mixed precision over float32 weights)", OFF),
    # parallelism and placement
    **{key: (_PARALLEL, (None, 1)) for key in (
        "tensor_parallel_size", "context_parallel_size", "expert_parallel_size", "dp_replicate_size", "dp_shard_size",
    )},
    "context_parapllel_size": (_PARALLEL, (None, 1)),  # sic: a misspelling in one of Axolotl's examples
    "expert_parallel_num_nvl_bytes": (_PARALLEL, OFF),
    "expert_parallel_token_capacity": (_PARALLEL, OFF),
    "device_map": ("placement is the engine's (DDP/FSDP2/DeepSpeed), not a device_map", OFF),
    "ddp": ("DDP needs no key: launch with --num-processes or torchrun (README 'Scaling out')", OFF),
    "local_rank": ("set by the launcher (LOCAL_RANK), not by the YAML", (None,)),
    "use_ray": ("Ray is not a launcher of mft-run; use --num-processes or torchrun", OFF),
    "ray_num_workers": ("Ray is not a launcher of mft-run; use --num-processes or torchrun", OFF),
    # other trainers and methods
    **{key: (_RL, OFF) for key in (
        "rl", "rl_beta", "trl", "vllm", "kto_desirable_weight", "orpo_alpha", "reward_model", "process_reward_model",
        "center_rewards_coefficient", "num_labels", "ebft", "diffusion", "cls_model_config",
    )},
    **{key: (_METHOD, OFF) for key in (
        "relora", "relora_cpu_offload", "relora_prune_ratio", "jagged_restart_steps", "jagged_restart_warmup_steps",
        "jagged_restart_anneal_steps", "lisa_n_layers", "lisa_step_interval", "lisa_layers_attribute", "use_eaft",
        "eaft_alpha", "eaft_k", "qat", "llmcompressor", "use_onebitllms", "reinit_weights", "peft",
    )},
    "pretraining_dataset": ("streaming pretraining data; mft-run finetunes on datasets", OFF),
    "streaming": ("streaming datasets are not read by mft-run", OFF),
    "streaming_multipack_buffer_size": ("streaming datasets are not read by mft-run", OFF),
    # accepted true: mft-run packs next-fit in the records' order (data/packing.pack_rows), what it asks for
    "sample_packing_sequentially": ("Axolotl's multipack bin packing is not implemented; rows are packed next-fit in order", (*OFF, True)),
    "shuffle_merged_datasets": ("merged datasets are always shuffled by the Trainer's seeded sampler", (None, True)),
    "min_sample_len": ("records are kept or cut by the data format", OFF),
    "skip_prepare_dataset": ("mft-run always tokenizes the datasets itself", OFF),
    "push_dataset_to_hub": ("no hub uploads (offline)", OFF),
    "hub_model_id": ("no hub uploads (offline); the model is saved in output_dir", OFF),
    "shrink_embeddings": ("embeddings are only grown, for added tokens", OFF),
    # quantization schemes
    **{key: (_QUANT, OFF) for key in (
        "gptq", "gptq_disable_exllama", "gptq_groupsize", "gptq_model_v1",
    )},
    # multimodal
    **{key: (_VISION, OFF) for key in ("processor_type", "freeze_mm_modules")},
    "tokenizer_use_mistral_common": (  # Axolotl: HFMistralTokenizer and MistralStrategy (loaders/tokenizer.py)
        "Axolotl then tokenizes with the mistral-common package (tekken.json, its own chat encoding in place of "
        "chat_template); mft-run reads transformers tokenizers only, so installing it (pip install mistral-common) "
        "would not be enough; with false the model folder's tokenizer and chat_template are used", OFF,
    ),
    "tokenizer_use_fast": ("the tokenizer loads with its own saved settings", (None, True)),
    "low_cpu_mem_usage": ("transformers 5 always loads with low memory; the key no longer exists", (None, True)),
    # training loop variants
    "save_strategy": ("checkpoints are saved at evaluations (save_steps), where the best one is chosen", (None, "steps")),
    "eval_strategy": ("evaluation runs every eval_steps (or evals_per_epoch)", (None, "steps")),
    "evaluation_strategy": ("evaluation runs every eval_steps (or evals_per_epoch)", (None, "steps")),
    "save_safetensors": ("weights are always saved as safetensors", (None, True)),
    "remove_unused_columns": ("the batch's routing columns are needed by the loss", (None, False)),
    "cosine_constant_lr_ratio": (  # 0 is off in Axolotl too: its scheduler tests the ratio's truth (trainers/mixins/scheduler.py)
        "Axolotl's cosine-then-constant schedule is not implemented; cosine_min_lr_ratio is", (*OFF, 0, 0.0),
    ),
    "do_causal_lm_eval": ("evaluation is perplexity, S and DG (paper Sec. 3.1)", OFF),
    "eval_causal_lm_metrics": ("evaluation is perplexity, S and DG (paper Sec. 3.1)", OFF),
    "eval_max_new_tokens": ("evaluation is perplexity, S and DG (paper Sec. 3.1)", OFF),
    "eval_table_size": ("evaluation is perplexity, S and DG (paper Sec. 3.1)", (None, 0)),
    "accelerator_config": ("accelerate's state is set up by mft-run's engine (README 'Scaling out')", OFF),
    "full_finetune": ("full finetuning is the default: leave adapter empty", OFF),
    "torchdistx_path": ("torchdistx is not used; transformers 5 loads with low memory", OFF),
    "plugins": ("Axolotl plugins run inside `axolotl train` (README 'Axolotl plugin'), not mft-run", OFF),
    # trackers
    **{key: (_LOGGER, OFF) for key in (
        "use_swanlab", "swanlab_project", "swanlab_experiment_name", "swanlab_description", "swanlab_mode",
        "swanlab_workspace", "swanlab_log_model", "swanlab_log_completions", "swanlab_completion_log_interval",
        "swanlab_completion_max_buffer", "trackio_project_name", "trackio_run_name", "trackio_space_id",
        "use_otel_metrics", "otel_metrics_host", "otel_metrics_port", "use_comet", "use_mlflow",
    )},
    # Axolotl 0.19's schema keys that no example YAML uses (tests/axolotl_examples/schema_keys.txt)
    **{key: (_RL, OFF) for key in (
        "cpo_alpha", "dpo_beta", "dpo_generate_during_eval", "dpo_label_smoothing", "dpo_loss_type", "dpo_loss_weights",
        "dpo_norm_loss", "dpo_padding_free", "dpo_use_liger_kernel", "dpo_use_logits_to_keep", "dpo_use_weighting",
        "kto_undesirable_weight", "precompute_ref_log_probs", "rpo_alpha", "simpo_gamma", "max_prompt_len",
    )},
    **{key: (_METHOD, OFF) for key in (
        "use_pose", "pose_max_context_len", "pose_num_chunks", "pose_split_on_token_ids", "lora_alpha_pattern",
        "lora_rank_pattern", "peft_autocast_adapter_dtype", "peft_ensure_weight_tying", "peft_init_lora_weights",
        "peft_layer_replication", "peft_layers_pattern", "peft_layers_to_transform", "peft_trainable_token_indices",
        "added_tokens_overrides", "fix_untrained_tokens", "mean_resizing_embeddings", "scaling_softmax",
        "scaling_softmax_bias", "scaling_softmax_factor",
    )},
    "relora_prune_method": (_METHOD, (None, "magnitude")),
    **{key: (_NOISE, OFF) for key in ("neftune_noise_alpha", "noisy_embedding_alpha")},
    **{key: (_OPTIMIZER, OFF) for key in (
        "loraplus_lr_ratio", "embedding_lr", "embedding_lr_scale", "lr_groups", "optim_args", "optim_target_modules",
        "adam_beta3", "adam_epsilon2", "dion_lr", "dion_momentum", "qgalore_rank", "lr_div_factor", "lr_scheduler_kwargs",
    )},
    "loraplus_lr_embedding": (_OPTIMIZER, (None, 1e-6)),
    "dion_rank_fraction": (_OPTIMIZER, (None, 1.0)),
    "dion_rank_multiple_of": (_OPTIMIZER, (None, 1)),
    **{key: (_OPTIMIZER, (None, default)) for key, default in {
        "qgalore_cos_threshold": 0.4, "qgalore_gamma_proj": 2, "qgalore_proj_bits": 4, "qgalore_proj_group_size": 256,
        "qgalore_proj_quant": True, "qgalore_proj_type": "std", "qgalore_queue_size": 5, "qgalore_scale": 0.25,
        "qgalore_update_proj_gap": 200,
    }.items()},
    **{key: (_CUDA, OFF) for key in (
        "flash_attn_d512", "large_head_attention", "s2_attention", "sage_attention", "sdpa_varlen",
        "lora_embedding_kernel", "deepcompile", "fp32_norms", "fp32_norm_classes",
        "embeddings_skip_upcast", "layer_offloading", "ple_cpu_offload", "selective_checkpointing", "dynamic_checkpoint",
        "batch_flattening", "qlora_sharded_model_loading", "lora_on_cpu", "gpu_memory_limit", "max_memory",
        "chunked_cross_entropy", "chunked_cross_entropy_num_chunks",
    )},
    "tiled_mlp_use_original_mlp": (_CUDA, (None, True)),
    "float32": ("the weights are float32 already; precision is bf16/fp16 autocast over them", OFF),
    **{key: (_PARALLEL, OFF) for key in ("sequence_parallel_degree", "heads_k_stride", "ring_attn_func")},
    "world_size": ("set by the launcher (WORLD_SIZE), not by the YAML", OFF),
    "device": ("placement is the engine's (DDP/FSDP2/DeepSpeed), not a device", OFF),
    **{key: (_LOGGER, OFF) for key in (
        "comet_api_key", "comet_experiment_config", "comet_experiment_key", "comet_mode", "comet_online",
        "comet_project_name", "comet_workspace", "mlflow_experiment_name", "mlflow_run_name", "mlflow_tracking_uri",
        "hf_mlflow_log_artifacts", "use_trackio", "include_tokens_per_second", "profiler_steps",
    )},
    "include_tkps": (_LOGGER, (None, True)),
    "profiler_steps_start": (_LOGGER, (None, 0)),
    **{key: (_CLOUD, OFF) for key in ("resources_per_worker", "ray_run_name")},
    **{key: (_VISION, OFF) for key in ("image_resize_algorithm", "image_size", "processor_kwargs")},
    **{key: (_GENERATION, OFF) for key in (
        "generate_samples", "generation_top_k", "generation_top_p", "do_bench_eval", "bench_dataset", "bench_split",
        "gradio_max_new_tokens", "gradio_server_name", "gradio_server_port", "gradio_share", "gradio_temperature",
        "gradio_title",
    )},
    **{key: (_GENERATION, (None, default)) for key, default in {
        "generation_do_sample": True, "generation_max_new_tokens": 50, "generation_prompt_ratio": 0.5,
        "generation_temperature": 0.7, "num_generation_samples": 3,
    }.items()},
    **{key: (_DATA, OFF) for key in (
        "dataset_keep_in_memory", "dataset_num_proc", "dataset_processes", "dataset_shard_idx", "dataset_shard_num",
        "num_dataset_shards_to_save", "preprocess_iterable", "pretrain_multipack_buffer_size",
        "pretraining_sample_concatenation", "eval_sequence_len", "max_packed_sequence_len", "multipack_real_batches",
        "sample_packing_eff_est", "sample_packing_mp_start_method", "pad_to_multiple_of", "shuffle_before_merging_datasets",
        "is_preprocess", "total_num_tokens", "total_supervised_tokens", "chat_template_kwargs", "role_boundaries",
    )},
    "sample_packing_bin_size": (_DATA, (None, 200)),
    "sample_packing_group_size": (_DATA, (None, 100000)),
    "excess_length_strategy": ("records longer than sequence_len are dropped (Axolotl's default), with a logged count", (None, "drop")),
    "default_system_message": ("conversations are rendered as written; no system message is inserted", OFF),
    **{key: (_LOOP, OFF) for key in (
        "auto_find_batch_size", "dataloader_drop_last", "dataloader_pin_memory", "dataloader_prefetch_factor",
        "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "ddp_timeout", "gc_collect_steps", "gc_steps",
        "torch_empty_cache_steps", "save_first_step", "fsdp_final_state_dict_type",
    )},
    "load_best_model_at_end": (_BEST, (None, True)),
    "metric_for_best_model": (_BEST, (None, "eval_spec_ppl")),
    "greater_is_better": (_BEST, OFF),
    **{key: ("no hub access at run time: download the model folder and give its path as base_model", OFF) for key in (
        "hub_revision", "hub_strategy",
    )},
    **{key: ("the model loads from base_model with its own config.json and transformers' defaults", OFF) for key in (
        "base_model_config", "model_kwargs", "rope_scaling", "quantization", "trainer_cls", "is_falcon_derived_model",
        "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model",
    )},
    "axolotl_config_path": ("not a training key", OFF),
    "tokenizer_save_jinja_files": ("the tokenizer is saved as transformers saves it", (None, True)),
    "merge_lora": ("merging is merge_adapter: true (output_dir/merged); axolotl merge-lora is Axolotl's command", OFF),
    "merge_method": ("merging is merge_adapter: true (output_dir/merged)", (None, "memory_efficient")),
    # cloud launchers
    **{key: (_CLOUD, OFF) for key in (
        "provider", "gpu", "gpu_count", "node_count", "project_name", "secrets", "branch", "dockerfile_commands",
        "memory", "memory_preprocess", "timeout", "timeout_preprocess", "volumes",
    )},
}


# Keys that Axolotl's schema does not have, so that Axolotl drops them without a word (its examples still
# write them): accepted here as in Axolotl, with no effect, and said once at the start of the run.
NO_EFFECT: dict[str, str] = {
    "eta_min": "the cosine schedule's floor is cosine_min_lr_ratio",
    "adam_eps": "AdamW's epsilon is adam_epsilon",
    "sample_packing_seq_len_multiplier": "packed rows hold up to sequence_len tokens",
    "base_model_ignore_patterns": "every weight file of base_model is read",
    "debug": "`axolotl train --debug` prints tokenized samples; the resolved config is printed by mft-run --validate",
    "test_value": "not a training key",
    # keys of Axolotl's KernelsPlugin (a CUDA kernel plugin), read only while that plugin is loaded
    "nvfp4_merge_aware": "it snaps LoRA updates to the grid of NVFP4 expert weights, and mft-run loads no NVFP4 weights "
                         "(an NVFP4 checkpoint is refused at load)",
}


_KD = "a knowledge-distillation target of Axolotl's KD plugin; MFT's teacher is the frozen base model (teacher:)"
_SHAREGPT = "a key of Axolotl's removed sharegpt types; with type: chat_template, map message keys with message_property_mappings and roles"
# Axolotl's dataset-entry keys (its SFTDataset) that no mft-run data format reads, each with why. A key that
# another format reads (``field`` of completion, ``field_messages`` of chat_template) is said to be theirs.
DATASET_KEYS_NOT_READ: dict[str, str] = {
    "conversation": "a FastChat conversation template of Axolotl's removed sharegpt types; use type: chat_template with chat_template:",
    "field_human": _SHAREGPT,
    "field_model": _SHAREGPT,
    "input_format": "a prompt-format string of Axolotl's user-defined prompt types; mft-run's formats are listed by mft-run --list",
    "input_transform": "the message transform of Axolotl's `messages` type; use type: chat_template",
    "field_tools": "tool definitions passed to the chat template are not supported yet",
    "message_field_training": "per-message training flags are not supported yet; choose the trained turns with roles_to_train",
    "message_field_training_detail": "per-span training flags are not supported yet",
    "split_thinking": "splitting <think> traces out of the content is not supported yet; give the trace in field_thinking",
    "logprobs_field": _KD,
    "temperature": _KD,
}


def dataset_key_problem(key: str, entry_type: str, readers: list[str]) -> str | None:
    """Why an Axolotl dataset-entry key is an error in a ``type: entry_type`` entry: the formats that read it
    (``readers``), or why none does. None: not an Axolotl dataset key (the caller says "unknown key")."""
    if readers:
        return f"not a key of type {entry_type!r}: Axolotl's dataset key read by type {', '.join(map(repr, readers))}; remove it"
    if key in DATASET_KEYS_NOT_READ:
        return f"Axolotl's dataset key is not read by mft-run: {DATASET_KEYS_NOT_READ[key]}; remove it"
    return None


def no_effect_notes(config: Any) -> list[str]:
    """One start line per :data:`NO_EFFECT` key that ``config`` sets."""
    return [
        f"{key}: {_as_yaml(value)} has no effect: not a key of Axolotl's schema, which drops it too; {why}"
        for key, why in NO_EFFECT.items()
        if (value := getattr(config, key, None)) is not None
    ]


def _refuse(cls: type, value: Any, info: Any) -> Any:
    reason, accepted = REFUSED[info.field_name]
    if any(value is v or (type(value) is type(v) and value == v) for v in accepted):  # 0 is not false
        return value
    raise PydanticCustomError(
        "axolotl_refused",
        "{value} is not supported: {reason} (Axolotl key; allowed here: {allowed})",
        {"value": _as_yaml(value), "reason": reason, "allowed": " or ".join(map(_as_yaml, accepted))},
    )


def _as_yaml(value: Any) -> str:
    """A value as the YAML spells it: empty, true/false, or its repr."""
    return "empty" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


RefusedAxolotlKeys = create_model(
    "RefusedAxolotlKeys",
    __validators__={"refuse": field_validator(*REFUSED, mode="before")(classmethod(_refuse))},
    **{  # excluded: never in the resolved config
        key: (Any, Field(None, exclude=True)) for key in (*REFUSED, *NO_EFFECT)
    },
)
"""A mixin of the schema: each refused key, accepted only with a value that asks for nothing."""
