"""The multi-process engine keys: ``fsdp_config`` here; ``fsdp`` and ``deepspeed`` in :mod:`mft_plugin.config.schema`.

Free of torch, like the whole schema. What the keys do at run time is asked of
:class:`mft_plugin.train.engine.Engine` (README "Scaling out").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


def fsdp2_only(version: int) -> int:
    """``fsdp_version`` (in ``fsdp_config`` or, Axolotl's current spelling, at the top level): 2 only."""
    if version != 2:
        message = "only FSDP2 is supported (FSDP1 is deprecated in transformers 5); use 2"
        raise PydanticCustomError("fsdp_version", message)
    return version


# FSDP1 switches of Axolotl's fsdp_config that FSDP2 (fully_shard) has no counterpart for: accepted, and each
# one set is said once at the start (FSDPConfig.notes); none changes what is computed.
FSDP1_ONLY = {
    "use_orig_params": "FSDP2 always trains the original parameters",
    "sync_module_states": "FSDP2 broadcasts rank 0's weights only with cpu_ram_efficient_loading",
    "limit_all_gathers": "FSDP2 schedules its own all-gathers",
    "backward_prefetch": "FSDP2 prefetches by itself",
    "forward_prefetch": "FSDP2 prefetches by itself",
}
# FSDP1's sharding_strategy as FSDP2's reshard_after_forward (what transformers maps it to for FSDP2)
SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
LEGACY_FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")  # Axolotl's `fsdp:` list


def legacy_fsdp_options(data: Any) -> Any:
    """Axolotl's (and the Trainer's) older ``fsdp: [full_shard, auto_wrap, offload]`` (or one string):
    FSDP on, with ``full_shard``/``shard_grad_op`` as ``reshard_after_forward`` and ``offload`` as
    ``offload_params`` in ``fsdp_config`` where it does not set them itself (transformers'
    ``_apply_legacy_fsdp_to_config``); ``auto_wrap`` is the default wrapping. Hybrid sharding is an error."""
    if not isinstance(data, dict) or not isinstance(data.get("fsdp"), (list, str)):
        return data
    options = data["fsdp"].split() if isinstance(data["fsdp"], str) else data["fsdp"]
    unknown = [option for option in options if option not in LEGACY_FSDP_OPTIONS]
    if unknown:
        message = "fsdp: {unknown} is not offered: FSDP2 here shards fully (full_shard) or not after the forward (shard_grad_op); allowed: {allowed}, or true"
        raise PydanticCustomError("fsdp", message, {"unknown": " ".join(map(str, unknown)), "allowed": ", ".join(LEGACY_FSDP_OPTIONS)})
    fsdp_config = dict(data.get("fsdp_config") or {})
    given = {str(key).removeprefix("fsdp_") for key in fsdp_config}
    if ("full_shard" in options or "shard_grad_op" in options) and not given & {"reshard_after_forward", "sharding_strategy"}:
        fsdp_config["reshard_after_forward"] = "full_shard" in options
    if "offload" in options and not given & {"offload_params", "cpu_offload"}:
        fsdp_config["offload_params"] = True
    return {**data, "fsdp": True, "fsdp_config": fsdp_config}


class FSDPConfig(BaseModel):
    """``fsdp_config:``, with Axolotl's key names (the Trainer's ``version``/``cpu_offload`` work too).

    Only FSDP2 (``fully_shard``) is offered: transformers 5 deprecates FSDP1, and the frozen
    teacher of a full finetuning is sharded with the same ``fully_shard`` (``mft_plugin.train.engine``).
    An FSDP1 block of Axolotl is read as Axolotl reads it: its ``fsdp_`` prefixes dropped,
    ``sharding_strategy`` as ``reshard_after_forward``, and the switches FSDP2 has no use for
    (:data:`FSDP1_ONLY`) said inactive at the start.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fsdp_version: int | None = Field(None, validation_alias=AliasChoices("fsdp_version", "version"))
    offload_params: bool = Field(False, validation_alias=AliasChoices("offload_params", "cpu_offload"))
    activation_checkpointing: bool = False
    cpu_ram_efficient_loading: bool = False
    reshard_after_forward: bool = True
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: str | None = Field(None, description="e.g. LlamaDecoderLayer (default: the model's)")
    min_num_params: int | None = Field(None, ge=1, description="module size for SIZE_BASED_WRAP")
    final_state_dict_type: Literal["FULL_STATE_DICT"] | None = Field(
        None, description="the final model is always the full state dict, a from_pretrained folder"
    )
    cpu_offload_pin_memory: bool | None = Field(None, description="speed only: pinned host memory for offloaded parameters")
    use_orig_params: bool | None = None
    sync_module_states: bool | None = None
    limit_all_gathers: bool | None = None
    backward_prefetch: str | None = None
    forward_prefetch: bool | None = None

    _fsdp_version = field_validator("fsdp_version")(classmethod(lambda cls, version: None if version is None else fsdp2_only(version)))

    @model_validator(mode="before")
    @classmethod
    def _axolotl_fsdp1_spellings(cls, data: Any) -> Any:
        """Axolotl's ``fsdp_``-prefixed keys (its ``check_fsdp_config_kwargs_prefix``) and FSDP1's ``sharding_strategy``."""
        if not isinstance(data, dict):
            return data
        data = {(key.removeprefix("fsdp_") if key != "fsdp_version" else key): value for key, value in data.items()}
        if (strategy := data.pop("sharding_strategy", None)) is not None:
            reshard = SHARDING_STRATEGIES.get(str(strategy).upper())
            if reshard is None:
                message = "{strategy} is not offered: FSDP2 here shards fully (FULL_SHARD) or keeps parameters gathered after the forward (SHARD_GRAD_OP)"
                raise PydanticCustomError("sharding_strategy", message, {"strategy": repr(strategy)})
            if data.setdefault("reshard_after_forward", reshard) != reshard:
                raise PydanticCustomError("sharding_strategy", "sharding_strategy {strategy} and reshard_after_forward disagree; keep one", {"strategy": strategy})
        if data.get("mixed_precision_policy") is not None:
            message = "mixed_precision_policy: {policy} is not offered: the precision is bf16/fp16 (autocast over float32 weights), the same under every engine"
            raise PydanticCustomError("mixed_precision_policy", message, {"policy": repr(data["mixed_precision_policy"])})
        data.pop("mixed_precision_policy", None)
        return data

    def notes(self, top_level_version: int | None = None) -> list[str]:
        """The start lines for what this block asks that does nothing here (``top_level_version``: the
        config's top-level ``fsdp_version``, Axolotl's current spelling)."""
        notes = [f"fsdp_config.{key}: {getattr(self, key)!r} has no effect: an FSDP1 switch; {why}" for key, why in FSDP1_ONLY.items() if getattr(self, key) is not None]
        if self.fsdp_version is None and top_level_version is None:
            notes.append("fsdp_config without fsdp_version: Axolotl 0.19 would run FSDP1 (deprecated); mft-run runs FSDP2 (fully_shard), which computes the same")
        if self.cpu_offload_pin_memory is not None:
            notes.append("fsdp_config.cpu_offload_pin_memory: speed only, not passed on here: offloaded parameters use accelerate's default (pinned)")
        return notes

    def trainer_config(self) -> dict[str, Any]:
        """The ``fsdp_config`` dict of ``TrainingArguments``."""
        unread = {"fsdp_version", "offload_params", "final_state_dict_type", "cpu_offload_pin_memory", *FSDP1_ONLY}
        config = self.model_dump(exclude=unread, exclude_none=True)
        return {**config, "version": self.fsdp_version or 2, "cpu_offload": self.offload_params}
