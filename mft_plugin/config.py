"""The YAML schema: Axolotl's keys where Axolotl has one, plus ``objective`` and ``mitigations``.

Validation is pydantic v2 with ``extra="forbid"`` everywhere (Axolotl drops a misspelled key
silently; we refuse it with a suggestion). The ``objective``/``mitigations`` unions are built at
run time from the plugin registry, so a third-party strategy's parameters are validated exactly
like a built-in's. Every error is reported at once as ``file:line: dotted.key: message``, before
any model or data is loaded (see :mod:`mft_plugin.config_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mft_plugin.registry import Kind, Registry
from mft_plugin.strategy import StrategyParams

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


class StrictModel(BaseModel):
    """Unknown keys are errors; values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class DatasetConfig(StrictModel):
    """One entry of ``datasets:`` (Axolotl's schema; ``type: completion`` is raw text)."""

    path: str = Field(description="local file/folder, or a dataset name on the hub")
    type: Literal["completion"] = "completion"
    ds_type: Literal["json", "text", "parquet", "csv"] | None = None
    data_files: str | list[str] | None = None
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    field: str = Field("text", description="column holding the document text")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: str) -> str:
        if _looks_local(path):
            _check_local_file(path)
        return path

    @field_validator("data_files")
    @classmethod
    def _data_files_exist(cls, data_files: str | list[str] | None) -> str | list[str] | None:
        for file in [data_files] if isinstance(data_files, str) else data_files or []:
            if _looks_local(file):
                _check_local_file(file)
        return data_files

    @model_validator(mode="after")
    def _field_exists(self) -> DatasetConfig:
        file = Path(self.path).expanduser()
        if file.is_file() and file.suffix in (".json", ".jsonl"):
            keys = _first_record_keys(file)
            if keys is not None and self.field not in keys:
                raise PydanticCustomError(
                    "missing_field",
                    "field {field!r} is not in {path} (its records have: {keys})",
                    {"field": self.field, "path": self.path, "keys": ", ".join(sorted(keys))},
                )
        return self


class MFTConfigBase(StrictModel):
    """Everything but the strategy unions, which :func:`config_model` adds from the registry."""

    # model and tokenizer
    base_model: str = Field(description="hub name or local folder of the model to finetune")
    tokenizer_config: str | None = Field(None, description="tokenizer location if not base_model's")
    tokenizer_type: str = Field("AutoTokenizer", description="transformers tokenizer class name")
    trust_remote_code: bool = False

    # data
    datasets: list[DatasetConfig] = Field(min_length=1)
    test_datasets: list[DatasetConfig] | None = None
    val_set_size: float = Field(0.0, ge=0.0, description="fraction (<1) or number (>=1) of documents held out")
    general_eval_datasets: list[DatasetConfig] | None = Field(
        None, description="general-domain validation data, for degeneralization DG"
    )
    sequence_len: int = Field(512, ge=2)
    dataset_prepared_path: str | None = None

    # optimization
    micro_batch_size: int = Field(1, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: str = Field("cosine", description="a transformers SchedulerType (checked by preflight)")
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    optimizer: str = Field("adamw_torch", description="a transformers OptimizerNames value (checked by preflight)")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    dataloader_num_workers: int = Field(0, ge=0)

    # outputs, logging, checkpoints
    output_dir: str = "./outputs/mft-run"
    overwrite_output_dir: bool = False
    resume_from_checkpoint: bool | str | None = None
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    use_tensorboard: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> MFTConfigBase:
        if self.bf16 and self.fp16:
            raise PydanticCustomError("precision", "bf16 and fp16 cannot both be true; choose one")
        return self


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


def _strategy_union(registry: Registry, kind: Kind) -> Any:
    members = [
        _strategy_spec_model(kind, name, registry.entries[kind][name].params_model) for name in registry.names(kind)
    ]
    if not members:
        return Literal["__no_strategy_registered__"]
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]  # noqa: UP007


def _unknown_name_check(registry: Registry, kind: Kind):
    """A before-validator: bare names to mappings, unknown names to a did-you-mean error."""

    def check(value: Any) -> Any:
        value = _as_mapping(value)
        if isinstance(value, dict) and "name" in value:
            name = value["name"]
            if name not in registry.entries[kind]:
                from mft_plugin.config_errors import suggestion
                from mft_plugin.registry import UnknownStrategyError

                try:
                    registry.get(kind, name)
                except UnknownStrategyError as error:
                    message = str(error).replace("{", "{{").replace("}", "}}")
                    raise PydanticCustomError("unknown_strategy", message + suggestion(str(name), registry.names(kind)))
        return value

    return check


def config_model(registry: Registry) -> type[MFTConfigBase]:
    """The full config model for the strategies this registry knows."""
    objective = _strategy_union(registry, "objective")
    mitigation = _strategy_union(registry, "mitigation")
    check_objective = _unknown_name_check(registry, "objective")
    check_mitigation = _unknown_name_check(registry, "mitigation")

    def objective_before(cls: type, value: Any) -> Any:
        return check_objective(value)

    def mitigations_before(cls: type, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [check_mitigation(item) for item in value] if isinstance(value, list) else value

    def mitigations_compatible(self: Any) -> Any:
        seen: dict[str, str] = {}
        for spec in self.mitigations:
            group = registry.entries["mitigation"][spec.name].cls.exclusive_group
            if group is not None and group in seen:
                raise PydanticCustomError(
                    "incompatible_mitigations",
                    "mitigations {first!r} and {second!r} cannot be combined (both are {group} methods; pick one)",
                    {"first": seen[group], "second": spec.name, "group": group},
                )
            if group is not None:
                seen[group] = spec.name
        return self

    default_objective = (
        Field({"name": "mft"}, validate_default=True) if "mft" in registry.entries["objective"] else ...
    )
    return create_model(
        "MFTConfig",
        __base__=MFTConfigBase,
        __validators__={
            "objective_before": field_validator("objective", mode="before")(classmethod(objective_before)),
            "mitigations_before": field_validator("mitigations", mode="before")(classmethod(mitigations_before)),
            "mitigations_compatible": model_validator(mode="after")(mitigations_compatible),
        },
        objective=(objective, default_objective),
        mitigations=(list[mitigation], []),  # type: ignore[valid-type]
    )
