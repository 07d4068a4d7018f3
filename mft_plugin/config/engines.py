"""The multi-process engine keys: ``fsdp_config`` here; ``fsdp`` and ``deepspeed`` in :mod:`mft_plugin.config.schema`.

Free of torch, like the whole schema. What the keys do at run time is asked of
:class:`mft_plugin.train.engine.Engine` (README "Scaling out").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


def fsdp2_only(version: int) -> int:
    """``fsdp_version`` (in ``fsdp_config`` or, Axolotl's current spelling, at the top level): 2 only."""
    if version != 2:
        message = "only FSDP2 is supported (FSDP1 is deprecated in transformers 5); use 2"
        raise PydanticCustomError("fsdp_version", message)
    return version


class FSDPConfig(BaseModel):
    """``fsdp_config:``, with Axolotl's key names (the Trainer's ``version``/``cpu_offload`` work too).

    Only FSDP2 (``fully_shard``) is offered: transformers 5 deprecates FSDP1, and the frozen
    teacher of a full finetuning is sharded with the same ``fully_shard`` (``mft_plugin.train.engine``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fsdp_version: int = Field(2, validation_alias=AliasChoices("fsdp_version", "version"))
    offload_params: bool = Field(False, validation_alias=AliasChoices("offload_params", "cpu_offload"))
    activation_checkpointing: bool = False
    cpu_ram_efficient_loading: bool = False
    reshard_after_forward: bool = True
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: str | None = Field(None, description="e.g. LlamaDecoderLayer (default: the model's)")
    min_num_params: int | None = Field(None, ge=1, description="module size for SIZE_BASED_WRAP")

    _fsdp_version = field_validator("fsdp_version")(classmethod(lambda cls, version: fsdp2_only(version)))

    def trainer_config(self) -> dict[str, Any]:
        """The ``fsdp_config`` dict of ``TrainingArguments``."""
        config = self.model_dump(exclude={"fsdp_version", "offload_params"}, exclude_none=True)
        return {**config, "version": self.fsdp_version, "cpu_offload": self.offload_params}
