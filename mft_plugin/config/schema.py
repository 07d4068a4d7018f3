"""The YAML schema: Axolotl's keys where Axolotl has one, plus ``objective`` and ``mitigations``.

Validation is pydantic v2 with ``extra="forbid"`` everywhere (Axolotl drops a misspelled key
silently; we refuse it with a suggestion). The ``objective``/``mitigations`` unions are built at
run time from the plugin registry, so a third-party strategy's parameters are validated exactly
like a built-in's. Every error is reported at once as ``file:line: dotted.key: message``, before
any model or data is loaded (see :mod:`mft_plugin.config.errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mft_plugin.config.adapters import (
    ADAPTER_GROUP,
    QuantizationKeys,
    TeacherConfig,
    adapter_from_axolotl_keys,
    adapter_problems,
)
from mft_plugin.config.axolotl_keys import RefusedAxolotlKeys, no_effect_notes
from mft_plugin.config.engines import FSDPConfig, fsdp2_only, legacy_fsdp_options
from mft_plugin.config.unfrozen import UnfrozenPattern
from mft_plugin.config.loss import LossImpl, TeacherCacheConfig, loss_impl_problem
from mft_plugin.config.speed import SpeedSwitches, inactive_attention, inactive_switches
from mft_plugin.registry import Kind, Registry, UnknownStrategyError
from mft_plugin.strategy import DataFormat, StrategyParams

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


class StrictModel(BaseModel):
    """Unknown keys are errors; values are frozen once validated; ``.inf``/``.nan`` are not numbers here.

    A non-finite learning rate or weight decay would train NaN weights; a non-finite epoch count or
    validation size would crash after the model loaded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _looks_local(path: str) -> bool:
    return Path(path).suffix in DATA_SUFFIXES or path.startswith((".", "/", "~"))


def _check_local_file(path: str) -> None:
    file = Path(path).expanduser()
    if not file.exists():
        raise PydanticCustomError("file_missing", "file or folder not found: {path}", {"path": path})
    if file.is_file() and file.stat().st_size == 0:
        raise PydanticCustomError("file_empty", "dataset file is empty: {path}", {"path": path})


def _first_record_keys(path: Path) -> set[str] | None:
    """Keys of the first JSON record of a .jsonl/.json file, read without loading the file."""
    with path.open("r", encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    return set(record) if isinstance(record, dict) else None
            return None
        head = handle.read(1 << 20)
    try:
        data = json.loads(head)
    except json.JSONDecodeError:
        return None  # large or nested json: datasets will check the field at load time
    first = data[0] if isinstance(data, list) and data else data
    return set(first) if isinstance(first, dict) else None


def _require_columns(path: str | None, columns: list[str]) -> None:
    """An error naming the ``columns`` the first record of a local .json/.jsonl ``path`` lacks
    (``path`` is None when it failed validation itself)."""
    file = Path(path).expanduser() if path else None
    if file is None or not file.is_file() or file.suffix not in (".json", ".jsonl"):
        return
    try:
        keys = _first_record_keys(file)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # bad bytes are reported by the data stage, with their line
    missing = [column for column in columns if keys is not None and column not in keys]
    if missing:
        message = "{missing} {verb} of {path} (its records have: {keys})"
        verb = "is not a field" if len(missing) == 1 else "are not fields"
        values = {"missing": ", ".join(map(repr, missing)), "verb": verb, "path": path, "keys": ", ".join(sorted(keys))}
        raise PydanticCustomError("missing_field", message, values)


class DatasetSource(StrictModel):
    """Where the records of one ``datasets:`` entry come from (Axolotl's keys). ``type`` names the
    data format (a registered ``mft_plugin.strategy.DataFormat``); its own keys (``field``,
    ``field_messages``, ...) sit beside these, validated by its ``Params`` (see :func:`config_model`)."""

    path: str = Field(description="local file/folder, or a dataset name on the hub")
    type: str = Field("completion", description="the data format: how a record becomes tokens and labels")
    ds_type: Literal["json", "text", "parquet", "csv"] | None = None
    data_files: str | list[str] | None = None
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    revision: str | None = Field(None, description="hub dataset revision: a branch, tag or commit")
    shards: int | None = Field(None, ge=1, description="keep one of this many shards: Axolotl's shuffle (seed) then shard")
    shards_idx: int = Field(0, ge=0, description="which shard `shards` keeps")
    preprocess_shards: int | None = Field(
        None, ge=1, description="Axolotl tokenizes the entry in this many pieces (memory); here in one pass: the same rows"
    )
    trust_remote_code: bool = Field(False, description="must stay false: datasets 4 and later run no loading scripts")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: str) -> str:
        if _looks_local(path):
            _check_local_file(path)
        return path

    @field_validator("trust_remote_code")
    @classmethod
    def _no_loading_script(cls, trust: bool) -> bool:
        if trust:
            message = "true asks datasets to run a loading script, which datasets 4 and later no longer do; a hub dataset of data files needs no remote code: remove it"
            raise PydanticCustomError("trust_remote_code", message)
        return trust

    @field_validator("shards_idx")
    @classmethod
    def _one_of_the_shards(cls, index: int, info: ValidationInfo) -> int:
        shards = info.data.get("shards")
        if shards is not None and index >= shards:
            message = "{index} is not a shard of shards: {shards} (allowed: 0 to {last})"
            raise PydanticCustomError("shards_idx", message, {"index": index, "shards": shards, "last": shards - 1})
        return index

    @field_validator("preprocess_shards")
    @classmethod
    def _not_with_shards(cls, pieces: int | None, info: ValidationInfo) -> int | None:
        if pieces is not None and info.data.get("shards") is not None:
            message = "tokenizes all the rows in pieces, and shards keeps one piece: give one of them (Axolotl documents them as exclusive)"
            raise PydanticCustomError("preprocess_shards", message)
        return pieces

    @field_validator("revision")
    @classmethod
    def _revision_of_a_hub_dataset(cls, revision: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if revision is not None and path is not None and _looks_local(path):
            message = "{revision} selects a revision of a hub dataset, and {path} is a local file or folder: remove revision"
            raise PydanticCustomError("revision", message, {"revision": repr(revision), "path": path})
        return revision

    @field_validator("data_files")
    @classmethod
    def _data_files_exist(cls, data_files: str | list[str] | None) -> str | list[str] | None:
        for file in [data_files] if isinstance(data_files, str) else data_files or []:
            if _looks_local(file):
                _check_local_file(file)
        return data_files


class DatasetConfig(DatasetSource):
    """A raw-text entry (``type: completion``): the general domain (``general_eval_datasets``, replay,
    EWC) stays raw text, whatever the format of the specialized data."""

    type: Literal["completion"] = "completion"
    field: str = Field("text", description="column holding the document text")

    @field_validator("field")
    @classmethod
    def _field_exists(cls, field: str, info: ValidationInfo) -> str:
        _require_columns(info.data.get("path"), [field])
        return field


class SpecialTokens(StrictModel):
    """``special_tokens:``, Axolotl's tokenizer roles; a token new to the tokenizer is added and the
    embeddings (student and teacher alike) grow to the tokenizer's length."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


class CheckpointingKwargs(StrictModel):
    """``gradient_checkpointing_kwargs:``, passed to ``torch.utils.checkpoint`` by transformers."""

    use_reentrant: bool | None = None


ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager", "flex_attention": "flex_attention",
    "xformers_attention": "xformers",
}
# Axolotl's attention names (utils/schemas/enums.py) that compute the model's own attention; a hub kernel
# path ("org/name") is passed to transformers as it is
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "xformers")
CHANGED_ATTENTION = {"sage": "SageAttention quantizes Q and K to int8", "fp8": "fp8 attention rounds to 8 bits"}


DEFAULT_SEED = 42  # Axolotl's and the Trainer's default seed
PRETOKENIZED = "pretokenized"  # the data format of a `datasets:` entry whose `type:` is empty, as in Axolotl

NEEDS_VALIDATION_SET = "needs a specialized validation set (test_datasets or val_set_size)"
UNEVALUATED = (
    "evals_per_epoch: {evals} with no specialized validation set (val_set_size: 0, no test_datasets): training runs "
    "without S and without a choice of the best checkpoint (the final model is the last step's); DG is measured at the end "
    "when general_eval_datasets are given"
)


DEQUANTIZE = "{dequantize: true}"  # the one model_quantization_config_kwargs read (Mxfp4Config's dequantizing load)


def _has_validation_set(info: ValidationInfo) -> bool:
    """Whether the config validated so far has a specialized validation set (``test_datasets`` or
    ``val_set_size``): what every evaluation-driven key (budget, intervals, patience, saves) needs."""
    return bool(info.data.get("test_datasets")) or (info.data.get("val_set_size") or 0) > 0


class MFTConfigBase(StrictModel, QuantizationKeys, SpeedSwitches, RefusedAxolotlKeys):
    """Everything but the strategy unions, which :func:`config_model` adds from the registry.

    The base's bitsandbytes keys (``load_in_4bit``, ...) come from :class:`QuantizationKeys`;
    Axolotl's ``adapter``/``lora_*`` keys are rewritten into a mitigation (``adapter_config``);
    Axolotl keys that do not apply are refused with their reason (:mod:`mft_plugin.config.axolotl_keys`).
    """

    # model and tokenizer
    base_model: str = Field(description="hub name or local folder of the model to finetune")
    tokenizer_config: str | None = Field(None, description="tokenizer location if not base_model's")
    tokenizer_type: str = Field("AutoTokenizer", description="transformers tokenizer class name")
    trust_remote_code: bool = False
    model_type: str = Field("AutoModelForCausalLM", description="transformers class name of the model (a ...ForCausalLM)")
    special_tokens: SpecialTokens | None = None
    tokens: list[str] | None = Field(None, description="new (non-special) tokens to add to the tokenizer; embeddings grow")
    adapter_keys_without_adapter: list[str] = Field(
        [], exclude=True, description="set from Axolotl's lora_* keys given with an empty adapter: no effect, said at the start"
    )
    tokenizer_chat_template: dict[str, str] | None = Field(
        None, description="set from the top-level chat_template (and chat_template_jinja): the saved tokenizer's template, as in Axolotl"
    )
    attn_implementation: str | None = Field(None, description="transformers attention: eager, sdpa, flex_attention, flash_attention_2, ...")
    flash_attention: bool | None = Field(None, description="Axolotl's spelling of attn_implementation: flash_attention_2")
    sdp_attention: bool | None = Field(None, description="Axolotl's spelling of attn_implementation: sdpa")
    eager_attention: bool | None = Field(None, description="Axolotl's spelling of attn_implementation: eager")
    flex_attention: bool | None = Field(None, description="Axolotl's spelling of attn_implementation: flex_attention")
    xformers_attention: bool | None = Field(None, description="Axolotl's spelling of attn_implementation: xformers")
    teacher: TeacherConfig | None = Field(None, description="full finetuning: hold the frozen teacher quantized or in a lower dtype")
    model_config_: dict[str, Any] | None = Field(
        None, validation_alias=AliasChoices("model_config", "model_config_"),
        description="attributes set on the model's config.json before loading, student and teacher alike (Axolotl)",
    )
    unfrozen_parameters: list[str] | None = Field(
        None, description="full finetuning of only the parameters these regexes name; the rest frozen (Axolotl)"
    )
    resize_token_embeddings_to_32x: bool = Field(False, description="grow the embeddings to a multiple of 32 rows (Axolotl)")
    quantize_moe_experts: bool = Field(False, description="also quantize fused MoE expert weights (with load_in_4bit or load_in_8bit)")
    model_quantization_config: Literal["Mxfp4Config"] | None = Field(
        None, description="Mxfp4Config (with dequantize: true): an MXFP4 checkpoint (gpt-oss) loads as its exact full-precision weights (Axolotl)"
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(None, description="the config's arguments: {dequantize: true}")
    revision_of_model: str | None = Field(
        None, validation_alias=AliasChoices("revision_of_model", "model_revision"),
        description="the hub revision (branch, tag or commit) of base_model and its tokenizer (Axolotl); a local folder has none",
    )
    tokenizer_legacy: bool | None = Field(None, description="the tokenizer's `legacy` argument (Llama/T5 sentencepiece spacing; Axolotl)")
    hf_use_auth_token: bool | None = Field(None, description="hub datasets load with the saved hub token (HF_TOKEN, `hf auth login`; Axolotl)")
    merge_adapter: bool = Field(False, description="also save the adapter merged into the base, as a plain model in output_dir/merged")

    # data
    datasets: list[DatasetConfig] = Field(min_length=1)
    test_datasets: list[DatasetConfig] | None = None
    val_set_size: float = Field(0.0, ge=0.0, description="fraction (<1) or number (>=1) of documents held out")
    general_eval_datasets: list[DatasetConfig] | None = Field(
        None, description="general-domain validation data, for degeneralization DG"
    )
    sequence_len: int = Field(512, ge=2)
    train_on_inputs: bool = Field(False, description="label the prompt tokens too (formats with prompts)")
    sample_packing: bool = Field(False, description="pack several records per row, attention kept within each record")
    eval_sample_packing: bool | None = Field(None, description="pack the specialized validation set (default: sample_packing)")
    pad_to_sequence_len: bool = Field(False, description="pad every batch to sequence_len")
    dataset_exact_deduplication: bool = Field(False, description="drop records whose tokens and labels repeat an earlier one's (Axolotl)")
    dataset_prepared_path: str | None = Field(None, description="folder caching the tokenized data, reused while its key matches")

    # optimization
    micro_batch_size: int = Field(1, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: str = Field("cosine", description="a transformers SchedulerType (checked by preflight)")
    warmup_steps: float = Field(0, ge=0, description="steps; a float below 1 is a fraction of the run (transformers 5, Axolotl)")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    lr_quadratic_warmup: bool = Field(False, description="lr_scheduler: cosine whose warmup ramps as (step / warmup)^2 (Axolotl)")
    cosine_min_lr_ratio: float | None = Field(None, ge=0.0, le=1.0, description="lr_scheduler: cosine decays to this fraction of learning_rate (Axolotl)")
    optimizer: str = Field("adamw_torch", description="a transformers OptimizerNames value (checked by preflight)")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    bf16: bool | Literal["auto"] = Field(False, description="auto: bf16 on a GPU that has it, else fp16 unless fp16: false (Axolotl)")
    fp16: bool | None = Field(None, description="empty: false, unless bf16: auto finds no bf16 GPU (Axolotl)")
    tf32: bool | None = Field(None, description="TF32 matmuls on Ampere+ CUDA GPUs; empty: transformers' default")
    bfloat16: bool = Field(False, description="weights held in bfloat16, student and teacher (pure bf16 training, Axolotl); default float32")
    float16: bool = Field(False, description="weights held in float16 (pure fp16 training, Axolotl); needs fp16: false")
    gradient_checkpointing: bool | Literal["offload"] = Field(False, description="offload: checkpointing plus activation_offloading (Axolotl)")
    gradient_checkpointing_kwargs: CheckpointingKwargs | None = None
    group_by_length: bool = Field(False, description="batch training rows of similar length together (transformers' sampler)")
    curriculum_sampling: bool = Field(False, description="train on the rows in the data's order, unshuffled (Axolotl)")
    ddp_find_unused_parameters: bool | None = None
    seed: int = Field(DEFAULT_SEED, ge=0, le=2**32 - 1, description="numpy's seed range")
    dataloader_num_workers: int = Field(0, ge=0)
    skip_nonfinite_batches: bool = Field(
        False, description="skip (and count) optimizer steps with a NaN/inf loss or gradient instead of stopping"
    )

    # multi-process engines (README "Scaling out"); DDP needs no key, only `accelerate launch`
    fsdp: bool | None = Field(None, description="FSDP2 on; an fsdp_config block alone turns it on too (Axolotl's option list: see legacy_fsdp_options)")
    fsdp_config: FSDPConfig | None = None
    fsdp_version: int | None = Field(None, description="Axolotl's top-level spelling of fsdp_config.fsdp_version (2 only)")
    deepspeed: str | None = Field(None, description="a DeepSpeed JSON config, e.g. yaml_examples/deepspeed/zero3.json")

    # how the loss is computed (README "Performance"; mft_plugin.config.loss)
    loss_impl: LossImpl = Field("auto", description="chunked: fused with the LM head; auto: chunked wherever it applies")
    teacher_cache: TeacherCacheConfig | None = None

    # outputs, logging, checkpoints
    output_dir: str = Field("./outputs/mft-run", min_length=1)
    overwrite_output_dir: bool = False
    resume_from_checkpoint: bool | str | None = None
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    evals_per_epoch: int | None = Field(None, ge=0, description="instead of eval_steps: evaluations per epoch (Axolotl); 0: none")
    save_steps: int | None = Field(None, ge=1)
    saves_per_epoch: int | None = Field(
        None, ge=1, description="instead of save_steps; must divide evals_per_epoch; alone, evaluations fall on the saves"
    )
    save_total_limit: int | None = Field(None, ge=1)
    save_only_model: bool = Field(False, description="checkpoints without optimizer/scheduler states: smaller, but no resume")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many evaluations without a better spec perplexity")
    loss_watchdog_threshold: float | None = Field(None, description="stop when the logged loss exceeds this ...")
    loss_watchdog_patience: int | None = Field(None, ge=1, description="... this many logged steps in a row (default 3)")
    strict: bool = Field(False, description="--set may only change keys that the YAML gives (Axolotl's CLI rule)")
    use_wandb: bool | None = Field(None, description="report to wandb (implied by wandb_project)")
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_run_id: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    wandb_watch: Literal["false", "gradients", "parameters", "all"] | None = None
    wandb_log_model: Literal["false", "checkpoint", "end"] | None = None
    use_tensorboard: bool = False

    # the degeneralization budget (paper Sec. 2; mft_plugin.train.budget), fractions as logged
    max_degeneralization: float | None = Field(
        None, ge=0.0, description="stop at the first evaluation with DG above this (0.01 = 1 %); keep the best checkpoint within it"
    )
    target_specialization: float | None = Field(None, gt=0.0, description="stop at the first evaluation with S at least this")
    # a grid of runs for `mft-run sweep` (mft_plugin.sweep): dotted key -> the values it takes
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = None

    @field_validator("max_degeneralization", "target_specialization")
    @classmethod
    def _budget_is_measured(cls, limit: float | None, info: ValidationInfo) -> float | None:
        if limit is None:
            return limit
        if not _has_validation_set(info):
            message = "{limit} " + NEEDS_VALIDATION_SET + ": it is checked at each evaluation"
            raise PydanticCustomError("budget_unmeasured", message, {"limit": limit})
        if info.field_name == "max_degeneralization" and not info.data.get("general_eval_datasets"):
            message = "{limit} needs general_eval_datasets: DG is measured on them"
            raise PydanticCustomError("budget_unmeasured", message, {"limit": limit})
        return limit

    @field_validator("wandb_watch", "wandb_log_model", mode="before")
    @classmethod
    def _yaml_false(cls, value: Any) -> Any:
        """``wandb_watch: false`` is read by YAML as a boolean; wandb reads the string."""
        return "false" if value is False else value

    @field_validator("model_type")
    @classmethod
    def _causal_lm_class(cls, name: str) -> str:
        if not name.endswith("ForCausalLM"):
            message = "{name} is not a causal LM class; use AutoModelForCausalLM or a ...ForCausalLM class"
            raise PydanticCustomError("model_type", message, {"name": repr(name)})
        return name

    @field_validator("unfrozen_parameters")
    @classmethod
    def _unfrozen_patterns_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                UnfrozenPattern.parse(pattern)
            except ValueError as error:
                raise PydanticCustomError("unfrozen_parameters", "{pattern} is not a pattern: {error}", {"pattern": repr(pattern), "error": str(error)}) from None
        return patterns

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_steps_or_ratio(cls, steps: float) -> float:
        """transformers 5 reads a ``warmup_steps`` below 1 as the fraction of the run; above, a count."""
        if steps >= 1 and steps != int(steps):
            message = "{steps} is neither a whole number of steps nor a fraction below 1 of the run"
            raise PydanticCustomError("warmup_steps", message, {"steps": steps})
        return steps if steps < 1 else int(steps)

    _fsdp_version = field_validator("fsdp_version")(classmethod(lambda cls, version: None if version is None else fsdp2_only(version)))

    @field_validator("cosine_min_lr_ratio")
    @classmethod
    def _cosine_floor(cls, ratio: float | None, info: ValidationInfo) -> float | None:
        """Axolotl's floor applies to its cosine schedule only (elsewhere it drops the key silently)."""
        if ratio is not None and info.data.get("lr_scheduler") != "cosine":
            message = "{ratio} is the floor of lr_scheduler: cosine, and lr_scheduler is {scheduler}"
            raise PydanticCustomError("cosine_min_lr_ratio", message, {"ratio": ratio, "scheduler": repr(info.data.get("lr_scheduler"))})
        return ratio

    @field_validator("evals_per_epoch", "saves_per_epoch")
    @classmethod
    def _per_epoch(cls, count: int | None, info: ValidationInfo) -> int | None:
        """Axolotl's per-epoch intervals: instead of the step keys, and saves on evaluated steps."""
        if count is None:
            return count
        steps = {"evals_per_epoch": "eval_steps", "saves_per_epoch": "save_steps"}[info.field_name]
        evaluates = _has_validation_set(info)
        evals = info.data.get("evals_per_epoch")
        if info.data.get(steps):
            raise PydanticCustomError("per_epoch", "{steps} sets the interval too; keep one", {"steps": steps})
        if count == 0 and (info.field_name == "saves_per_epoch" or evaluates):
            message = "0 is no evaluation, but the final model is the best evaluated checkpoint; at least 1"
            raise PydanticCustomError("per_epoch", message if evaluates else "at least 1 save per epoch")
        if info.field_name == "saves_per_epoch" and evaluates and evals and evals % count:
            message = "{count} must divide evals_per_epoch ({evals}): the best checkpoint is chosen among evaluated saves"
            raise PydanticCustomError("per_epoch", message, {"count": count, "evals": evals or "not set"})
        return count

    @field_validator("early_stopping_patience", "loss_watchdog_patience")
    @classmethod
    def _stop_is_watched(cls, patience: int | None, info: ValidationInfo) -> int | None:
        """A patience whose stop could never fire is an error, not a no-op."""
        if patience is None:
            return patience
        if info.field_name == "loss_watchdog_patience" and info.data.get("loss_watchdog_threshold") is None:
            raise PydanticCustomError("patience", "needs loss_watchdog_threshold (the loss it watches for)")
        if info.field_name == "early_stopping_patience" and not _has_validation_set(info):
            raise PydanticCustomError("patience", NEEDS_VALIDATION_SET)
        return patience

    @field_validator("wandb_entity", "wandb_run_id", "wandb_mode", "wandb_watch", "wandb_log_model")
    @classmethod
    def _wandb_is_on(cls, value: str | None, info: ValidationInfo) -> str | None:
        use_wandb = info.data.get("use_wandb")
        if value is not None and not (use_wandb if use_wandb is not None else info.data.get("wandb_project")):
            message = "read only when reporting to wandb; set wandb_project (or use_wandb: true)"
            raise PydanticCustomError("wandb", message)
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, implementation: str | None) -> str | None:
        if implementation is None or implementation in ATTENTION_IMPLEMENTATIONS or "/" in implementation:
            return implementation
        if implementation in CHANGED_ATTENTION:
            message = "{value} is not supported: {why}, which changes the loss (exactness first); use sdpa or flash_attention_2"
            raise PydanticCustomError("attention", message, {"value": repr(implementation), "why": CHANGED_ATTENTION[implementation]})
        message = "{value} is not an attention implementation; one of {allowed}, or a hub kernel path"
        raise PydanticCustomError("attention", message, {"value": repr(implementation), "allowed": ", ".join(ATTENTION_IMPLEMENTATIONS)})

    @field_validator(*ATTENTION_FLAGS)
    @classmethod
    def _one_attention(cls, flag: bool | None, info: ValidationInfo) -> bool | None:
        chosen = [key for key in ("attn_implementation", *ATTENTION_FLAGS) if key != info.field_name and info.data.get(key)]
        if flag and chosen:
            message = "{other} chooses the attention implementation too; keep one"
            raise PydanticCustomError("attention", message, {"other": chosen[0]})
        return flag

    @field_validator("model_quantization_config", mode="before")
    @classmethod
    def _dequantized_checkpoint(cls, name: Any) -> Any:
        """Axolotl's two names; only MXFP4's dequantizing load gives the checkpoint's own weights exactly."""
        if name in (None, "Mxfp4Config"):
            return name
        why = "fp8 weights and matmuls change the loss (exactness first)" if name == "FineGrainedFP8Config" else "not a config Axolotl reads"
        message = "{value} is not supported: {why}; Mxfp4Config with model_quantization_config_kwargs: {allowed} is"
        raise PydanticCustomError("model_quantization_config", message, {"value": repr(name), "why": why, "allowed": DEQUANTIZE})

    @field_validator("model_quantization_config_kwargs")
    @classmethod
    def _dequantize(cls, kwargs: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if kwargs is None:
            return kwargs
        if not info.data.get("model_quantization_config"):
            raise PydanticCustomError("model_quantization_config", "read only with model_quantization_config: Mxfp4Config")
        if kwargs != {"dequantize": True}:
            message = ("{value}: only {allowed} is supported: transformers trains no MXFP4 weights, so the "
                       "checkpoint loads dequantized (its exact values in float32)")
            raise PydanticCustomError("model_quantization_config", message, {"value": kwargs, "allowed": DEQUANTIZE})
        return kwargs

    @model_validator(mode="after")
    def _consistent(self) -> MFTConfigBase:
        if self.model_quantization_config and not self.model_quantization_config_kwargs:
            message = "model_quantization_config: Mxfp4Config needs model_quantization_config_kwargs: {dequantize: true} (training on MXFP4 weights is not supported)"
            raise PydanticCustomError("model_quantization_config", message)
        if self.model_quantization_config and (self.quantized or (self.teacher and self.teacher.quantized)):
            message = "model_quantization_config: Mxfp4Config loads the weights dequantized; it cannot be combined with load_in_4bit/load_in_8bit"
            raise PydanticCustomError("model_quantization_config", message)
        if self.bf16 is True and self.fp16:
            raise PydanticCustomError("precision", "bf16 and fp16 cannot both be true; choose one")
        if self.lr_quadratic_warmup and (self.lr_scheduler != "cosine" or self.cosine_min_lr_ratio is not None):
            message = "lr_quadratic_warmup is a warmup of lr_scheduler: cosine without cosine_min_lr_ratio (Axolotl's), and lr_scheduler is {scheduler}"
            raise PydanticCustomError("lr_quadratic_warmup", message, {"scheduler": repr(self.lr_scheduler) + (" with cosine_min_lr_ratio" if self.cosine_min_lr_ratio is not None else "")})
        if self.curriculum_sampling and self.group_by_length:
            raise PydanticCustomError("curriculum_sampling", "curriculum_sampling keeps the data's order, and group_by_length regroups it; choose one")
        if self.bfloat16 and self.float16:
            raise PydanticCustomError("precision", "bfloat16 and float16 cannot both be true; choose the weights' dtype")
        if (self.bfloat16 and self.fp16) or (self.float16 and (self.fp16 or self.bf16 is True)):
            message = ("{weights}: true holds the weights in {dtype}, which {mixed}: true cannot compute over (fp16's loss "
                       "scaling needs float32 weights); leave {mixed} false")
            weights, mixed = ("bfloat16", "fp16") if self.bfloat16 else ("float16", "fp16" if self.fp16 else "bf16")
            raise PydanticCustomError("precision", message, {"weights": weights, "dtype": weights, "mixed": mixed})
        if self.quantize_moe_experts and not self.quantized:
            message = "quantize_moe_experts quantizes the experts as the base is: it needs load_in_4bit or load_in_8bit"
            raise PydanticCustomError("quantize_moe_experts", message)
        if self.save_only_model and self.resume_from_checkpoint:
            message = "save_only_model: true keeps no optimizer states in checkpoints, so resume_from_checkpoint cannot resume exactly"
            raise PydanticCustomError("save_only_model", message)
        if self.deepspeed and self.fsdp_enabled:
            raise PydanticCustomError("engine", "deepspeed and fsdp/fsdp_config cannot both be set; choose one engine")
        if problem := loss_impl_problem(self.loss_impl, self.teacher_cache):
            raise PydanticCustomError("loss_impl", problem)
        return self

    @field_validator("save_steps")
    @classmethod
    def _saves_are_evaluated(cls, save_steps: int | None, info: ValidationInfo) -> int | None:
        """The Trainer keeps the best checkpoint only among evaluated steps; it would refuse after loading."""
        eval_steps = info.data.get("eval_steps")
        evaluates = _has_validation_set(info)
        if evaluates and save_steps and eval_steps and save_steps % eval_steps:
            raise PydanticCustomError(
                "save_steps",
                "{save} is not a multiple of eval_steps ({eval}), but the best checkpoint is chosen among "
                "evaluated steps; e.g. save_steps: {fix}",
                {"save": save_steps, "eval": eval_steps, "fix": eval_steps * max(1, save_steps // eval_steps)},
            )
        return save_steps

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_json(cls, path: str | None) -> str | None:
        if path is not None:
            _check_local_file(path)
            try:
                json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise PydanticCustomError("deepspeed_json", "not a JSON file: {error}", {"error": str(error)})
        return path

    @property
    def start_notes(self) -> list[str]:
        """What the run says once at its start about keys it accepts without acting on them here
        (evaluations without a validation set; speed switches this machine does not run)."""
        from transformers.utils.import_utils import is_torch_tf32_available  # torch-free schema otherwise

        notes = [UNEVALUATED.format(evals=self.evals_per_epoch)] if self.evals_per_epoch and not self.evaluates else []
        if self.adapter_keys_without_adapter:
            keys = ", ".join(self.adapter_keys_without_adapter)
            notes.append(f"{keys}: no effect: adapter is empty, so this is full finetuning (Axolotl reads them only with an adapter)")
        if self.revision_of_model and Path(self.base_model).expanduser().is_dir():
            notes.append(f"revision_of_model: {self.revision_of_model!r} has no effect: base_model is a local folder, read as it is")
        if self.hf_use_auth_token:
            notes.append("hf_use_auth_token: true: hub downloads use the saved hub token (HF_TOKEN or `hf auth login`), the hub client's default")
        notes += self.fsdp_config.notes(self.fsdp_version) if self.fsdp_config is not None and self.fsdp_enabled else []
        return notes + no_effect_notes(self) + inactive_switches(self, is_torch_tf32_available())

    @property
    def evaluates(self) -> bool:
        """Whether there is a specialized validation set, for S and the choice of the best checkpoint."""
        return bool(self.test_datasets) or self.val_set_size > 0

    @property
    def requested_attention(self) -> tuple[str, str] | None:
        """The key that asks for an attention implementation and that implementation (None: the model's default)."""
        if self.attn_implementation:
            return "attn_implementation", self.attn_implementation
        return next(((key, impl) for key, impl in ATTENTION_FLAGS.items() if getattr(self, key)), None)

    @property
    def attention_choice(self) -> tuple[str, str] | None:
        """:attr:`requested_attention`, except one this run cannot apply (a FlashAttention this machine lacks, xformers): the model's default
        then (speed only, said at the start: :func:`~mft_plugin.config.speed.inactive_switches`)."""
        choice = self.requested_attention
        return None if choice and inactive_attention(choice[1]) else choice

    @property
    def attention(self) -> str | None:
        """The attention implementation asked for, under either spelling (None: the model's default)."""
        return self.attention_choice[1] if self.attention_choice else None

    @property
    def reports_to_wandb(self) -> bool:
        """Axolotl's rule: a wandb project turns wandb on; ``use_wandb`` decides when given."""
        return self.use_wandb if self.use_wandb is not None else bool(self.wandb_project)

    @property
    def fsdp_enabled(self) -> bool:
        """``fsdp: true``, or an ``fsdp_config`` block without ``fsdp: false`` (Axolotl's reading)."""
        return bool(self.fsdp) or (self.fsdp is None and self.fsdp_config is not None)

    @property
    def engine_name(self) -> Literal["ddp", "fsdp", "deepspeed"]:
        """The engine the keys select (``mft_plugin.train.engine.Engine``); ``ddp`` is also one process."""
        return "deepspeed" if self.deepspeed else "fsdp" if self.fsdp_enabled else "ddp"


def empty_means_default(data: Any, fields: Any) -> Any:
    """``data`` without the keys left empty (``key:`` with no value): as in Axolotl, they take the default.

    Only keys of the schema; an unknown key stays, to be reported as one."""
    if not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items() if not (value is None and key in fields)}


BNB_CONFIG_KWARGS = ("bnb_4bit_use_double_quant", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype")
AXOLOTL_DERIVED_KEYS = ("batch_size", "auto_resume_from_checkpoints", "bnb_config_kwargs")  # read by axolotl_derived_keys


def axolotl_derived_keys(data: Any) -> Any:
    """Axolotl's keys that set one of ours, read as Axolotl reads them (``utils/config/__init__.py``,
    ``utils/train.py``, ``loaders/model.py``): ``tokens`` given as a mapping of roles is the old spelling
    of ``special_tokens``; ``bnb_config_kwargs`` are the 4-bit quantization keys;
    ``batch_size`` (deprecated there) is ``gradient_accumulation_steps`` times
    ``micro_batch_size``, per process; ``auto_resume_from_checkpoints: true`` with no
    ``resume_from_checkpoint`` is ``resume_from_checkpoint: true`` (the newest complete checkpoint, else
    a fresh start)."""
    if not isinstance(data, dict) or not {*AXOLOTL_DERIVED_KEYS, "tokens"} & data.keys():
        return data
    data = dict(data)
    if isinstance(data.get("tokens"), dict):  # Axolotl's first spelling of special_tokens (its archived examples)
        if data.get("special_tokens"):
            raise PydanticCustomError("tokens", "tokens: a mapping of token roles is the old spelling of special_tokens, which is set too; keep one")
        data["special_tokens"] = data.pop("tokens")
    bnb_kwargs = data.pop("bnb_config_kwargs", None) or {}
    if not isinstance(bnb_kwargs, dict) or not set(bnb_kwargs) <= set(BNB_CONFIG_KWARGS):
        message = "bnb_config_kwargs: {value}: the 4-bit BitsAndBytesConfig keys read here are {allowed}"
        raise PydanticCustomError("bnb_config_kwargs", message, {"value": repr(bnb_kwargs), "allowed": ", ".join(BNB_CONFIG_KWARGS)})
    if bnb_kwargs and not data.get("load_in_4bit"):
        raise PydanticCustomError("bnb_config_kwargs", "bnb_config_kwargs: Axolotl applies them to a 4-bit base only: set load_in_4bit: true")
    for key, value in bnb_kwargs.items():  # Axolotl: they update the BitsAndBytesConfig it builds
        if data.get(key) is not None and data[key] != value:
            raise PydanticCustomError("bnb_config_kwargs", "bnb_config_kwargs: {key} and the top-level {key} differ; keep one", {"key": key})
        data[key] = value
    batch_size = data.pop("batch_size", None)
    if batch_size is not None:
        micro = data.get("micro_batch_size") or 1
        if data.get("gradient_accumulation_steps"):
            raise PydanticCustomError("batch_size", "batch_size and gradient_accumulation_steps both set the batch; keep one (as Axolotl asks)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < micro or batch_size % micro:
            message = "batch_size: {value} must be a multiple of micro_batch_size ({micro}): it is micro_batch_size x gradient_accumulation_steps"
            raise PydanticCustomError("batch_size", message, {"value": repr(batch_size), "micro": micro})
        data["gradient_accumulation_steps"] = batch_size // micro
    if data.pop("auto_resume_from_checkpoints", None) and data.get("resume_from_checkpoint") is None:
        data["resume_from_checkpoint"] = True
    return data


def _strategy_spec_model(kind: Kind, name: str, params: type[StrategyParams]) -> type[StrategyParams]:
    """``Params`` plus a ``name: Literal[name]`` selector, the member of the tagged union."""
    return create_model(
        f"{name}_{kind}_spec",
        __base__=params,
        name=(Literal[name], name),  # type: ignore[valid-type]
    )


def _as_mapping(value: Any) -> Any:
    """``objective: mft`` is shorthand for ``objective: {name: mft}``."""
    return {"name": value} if isinstance(value, str) else value


def _tagged_union(members: list[type[BaseModel]], key: str) -> Any:
    if not members:
        return Literal["__no_strategy_registered__"]
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator=key)]  # noqa: UP007


def _strategy_union(registry: Registry, kind: Kind) -> Any:
    return _tagged_union(
        [_strategy_spec_model(kind, name, registry.entries[kind][name].params_model) for name in registry.names(kind)],
        "name",
    )


def _columns_check(format_cls: type[DataFormat]) -> dict[str, Any]:
    """Validators of a format's dataset model: the record columns it reads exist in the first record
    of a local json/jsonl file, each reported at the key that names it (fixed ones at the entry)."""

    def named_column(cls: type, column: str, info: ValidationInfo) -> str:
        _require_columns(info.data.get("path"), [column])
        return column

    def fixed_columns(self: DatasetSource) -> DatasetSource:
        _require_columns(self.path, list(format_cls.fixed_columns))
        return self

    validators: dict[str, Any] = {"fixed_columns": model_validator(mode="after")(fixed_columns)}
    if format_cls.column_keys:
        validators["named_column"] = field_validator(*format_cls.column_keys)(classmethod(named_column))
    return validators


def _dataset_union(registry: Registry) -> Any:
    """One ``datasets:`` entry: the common keys plus the ``Params`` of the format its ``type`` names."""
    members = []
    for name in registry.names("format"):
        entry = registry.entries["format"][name]
        members.append(
            create_model(
                f"{name}_dataset",
                __base__=(entry.params_model, DatasetSource),  # this order puts path, type, ... first
                __validators__=_columns_check(entry.cls),  # type: ignore[arg-type]
                type=(Literal[name], name),  # type: ignore[valid-type]
            )
        )
    return _tagged_union(members, "type")


def _unknown_name_check(registry: Registry, kind: Kind, default: str | None = None, key: str = "name"):
    """A before-validator: bare names to mappings, a missing ``key`` (the selector) to ``default``
    (else an error), unknown names to a did-you-mean error."""

    def check(value: Any) -> Any:
        value = _as_mapping(value) if key == "name" else value
        names = ", ".join(registry.names(kind)) or "(none)"
        if not isinstance(value, dict):
            message = "{kind} must be a name or a mapping of `{key}` and parameters; available: {names}"
            raise PydanticCustomError("strategy_form", message, {"kind": kind, "key": key, "names": names})
        if key == "type" and key in value and value[key] is None:  # Axolotl's `type:` left empty: token ids as they are
            value = {**value, key: PRETOKENIZED}
        if key not in value:
            if default is None:
                message = "a {kind} needs a `{key}`; available: {names}"
                raise PydanticCustomError("missing_name", message, {"kind": kind, "key": key, "names": names})
            value = {key: default, **value}  # e.g. `--set objective.tau=0.5` with no objective key
        name = str(value[key])  # a str, so that a list or mapping given as name cannot break the lookup
        base, _, style = name.partition(":")  # Axolotl's `type: alpaca:chat`: a format and its prompt style
        if style and base in registry.entries[kind] and "prompt_style" in registry.entries[kind][base].cls.Params.model_fields:
            value, name = {**value, key: base, "prompt_style": style}, base
        if name not in registry.entries[kind]:
            try:
                registry.get(kind, name)
            except UnknownStrategyError as error:
                raise PydanticCustomError("unknown_strategy", "{message}", {"message": str(error)}) from None
        return value

    return check


def strategies_model(registry: Registry, base: type[BaseModel], name: str = "MFTStrategies") -> type[Any]:
    """``base`` plus the ``objective`` and ``mitigations`` keys for the strategies this registry knows.

    The core of :func:`config_model`; the Axolotl plugin builds on a bare model so that Axolotl's
    own schema gains exactly these two keys (``mft_plugin.axolotl``).
    """
    objective = _strategy_union(registry, "objective")
    mitigation = _strategy_union(registry, "mitigation")
    # the paper's method; when plugins conflict over it, the default still names it, so that the
    # conflict is what a config without `objective:` reports
    default_name = "mft" if "mft" in registry.entries["objective"] or ("objective", "mft") in registry.conflicts else None
    check_objective = _unknown_name_check(registry, "objective", default=default_name)
    check_mitigation = _unknown_name_check(registry, "mitigation")

    def objective_before(cls: type, value: Any) -> Any:
        return check_objective(value)

    def mitigations_before(cls: type, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [check_mitigation(item) for item in value] if isinstance(value, list) else value

    def mitigations_compatible(cls: type, mitigations: list[Any]) -> list[Any]:
        seen: dict[str, str] = {}
        for spec in mitigations:
            group = registry.entries["mitigation"][spec.name].cls.exclusive_group
            if group is not None and group in seen:
                raise PydanticCustomError(
                    "incompatible_mitigations",
                    "mitigations {first} and {second} cannot be combined (both are {group} methods; pick one)",
                    {"first": repr(seen[group]), "second": repr(spec.name), "group": group},
                )
            if group is not None:
                seen[group] = spec.name
        return mitigations

    default_objective = Field({"name": default_name}, validate_default=True) if default_name else ...
    return create_model(
        name,
        __base__=base,
        __validators__={
            "objective_before": field_validator("objective", mode="before")(classmethod(objective_before)),
            "mitigations_before": field_validator("mitigations", mode="before")(classmethod(mitigations_before)),
            "mitigations_compatible": field_validator("mitigations")(classmethod(mitigations_compatible)),
        },
        objective=(objective, default_objective),
        mitigations=(list[mitigation], []),  # type: ignore[valid-type]
    )


# Axolotl's top-level keys that are the default of the dataset entries whose format takes them
DATASET_DEFAULT_KEYS = ("chat_template", "chat_template_jinja", "eot_tokens")


TOKENIZER_TEMPLATE_KEYS = ("chat_template", "chat_template_jinja")  # also the saved tokenizer's template (Axolotl)
TEMPLATE_FORMAT = "chat_template"  # the format whose named templates the top-level keys choose from


def dataset_defaults(data: Any, registry: Registry, default_format: str | None) -> Any:
    """``data`` with Axolotl's top-level ``chat_template``/``chat_template_jinja``/``eot_tokens`` moved into
    each entry of ``datasets`` and ``test_datasets`` whose format takes the key and does not set it
    (Axolotl renders its chat datasets with the top-level template unless an entry names its own).

    As in Axolotl (``loaders/tokenizer.py``), a top-level chat template is also the tokenizer's: it is
    kept as ``tokenizer_chat_template`` and saved with the model, chat datasets or not. ``eot_tokens``
    given while no entry takes it is an error naming the key (never a key accepted and ignored)."""
    if not isinstance(data, dict) or not any(key in data for key in DATASET_DEFAULT_KEYS):
        return data
    data = dict(data)
    template = {key: data[key] for key in TOKENIZER_TEMPLATE_KEYS if data.get(key) is not None}
    if template and TEMPLATE_FORMAT in registry.entries["format"]:
        try:
            registry.entries["format"][TEMPLATE_FORMAT].cls.Params(**template)
        except ValidationError as error:
            problem = "; ".join(str(detail["msg"]).removeprefix("Value error, ") for detail in error.errors())
            raise PydanticCustomError("chat_template", "{problem}", {"problem": problem}) from None
        data["tokenizer_chat_template"] = template
    for key in DATASET_DEFAULT_KEYS:
        value = data.pop(key, None)
        if value is None:
            continue
        takers = 0
        for group in ("datasets", "test_datasets"):
            if not isinstance(data.get(group), list):
                continue
            entries = data[group] = list(data[group])  # the caller's lists and entries stay as they were
            for i, entry in enumerate(entries):
                entry_format = registry.entries["format"].get(entry.get("type") or default_format) if isinstance(entry, dict) else None
                if entry_format is not None and key in entry_format.cls.Params.model_fields:
                    takers += 1
                    if entry.get(key) is None:
                        entries[i] = {**entry, key: value}
        if not takers and key not in template:
            raise PydanticCustomError(
                "dataset_default",
                "{key}: {value} is the default of the datasets entries whose type takes it (e.g. type: chat_template), "
                "as in Axolotl, and no entry of datasets or test_datasets has such a type",
                {"key": key, "value": repr(value)},
            )
    return data


def config_model(registry: Registry) -> type[MFTConfigBase]:
    """The full config model for the strategies this registry knows."""
    adapter_names = {n for n, e in registry.entries["mitigation"].items() if e.cls.exclusive_group == ADAPTER_GROUP}
    default_format = "completion" if "completion" in registry.entries["format"] else None  # raw text, as the paper

    def axolotl_top_level_keys(cls: type, data: Any) -> Any:
        """Axolotl's top-level keys that are ours in another shape: dataset defaults, then the adapter's."""
        data = legacy_fsdp_options(axolotl_derived_keys(dataset_defaults(data, registry, default_format)))
        return adapter_from_axolotl_keys(empty_means_default(data, cls.model_fields), adapter_names)

    def mitigations_fit(self: MFTConfigBase) -> MFTConfigBase:
        """Each mitigation against the rest of the config, and the adapter-dependent keys."""
        problems = []
        for spec in self.mitigations:
            problems += registry.entries["mitigation"][spec.name].cls.config_problems(spec, self)
        adapter = next((spec.name for spec in self.mitigations if spec.name in adapter_names), None)
        problems += adapter_problems(self, self.teacher, self.merge_adapter, adapter, bool(self.unfrozen_parameters))
        if problems:
            raise PydanticCustomError("mitigations_fit", "{problems}", {"problems": "; ".join(problems)})
        return self

    entry = Annotated[_dataset_union(registry), BeforeValidator(_unknown_name_check(registry, "format", default_format, "type"))]
    return create_model(
        "MFTConfig",
        __base__=strategies_model(registry, MFTConfigBase),
        datasets=(list[entry], Field(min_length=1)),  # type: ignore[valid-type]
        test_datasets=(list[entry] | None, None),  # type: ignore[valid-type]
        __validators__={
            "axolotl_top_level_keys": model_validator(mode="before")(classmethod(axolotl_top_level_keys)),
            "mitigations_fit": model_validator(mode="after")(mitigations_fit),
        },
    )
