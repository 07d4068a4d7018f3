"""``lora``, ``dora``, ``ia3``: parameter-efficient finetuning through peft (paper Sec. 3, Tables 2, 4, 6).

The paper's default (Sec. 3.1, "Baselines") is rank 8 on all attention and MLP projections,
peft's ``target_modules: all-linear``. DoRA is a flag of LoRA in peft (``use_dora``), so ``dora``
is ``lora`` with that flag on. The parameters keep peft's own option names (Axolotl's top-level
``adapter``/``lora_*`` keys are rewritten into these entries, see ``mft_plugin.config.adapters``).

With an adapter the teacher is the student's own base: the core runs it under
``disable_adapter()`` (``mft_plugin.teacher.sources.SharedBaseTeacher``), so no second copy of the
weights exists, quantized (QLoRA) or not. The three share one ``exclusive_group``: a run picks
at most one of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from mft_plugin.config.adapters import ADAPTER_GROUP, ALL_LINEAR
from mft_plugin.strategy import Mitigation, StrategyParams

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel

    from mft_plugin.train.context import RunContext

logger = logging.getLogger(__name__)

TargetModules = list[str] | str


class LoraParams(StrategyParams):
    r: int = Field(8, ge=1, description="rank of the update")
    lora_alpha: float = Field(8.0, gt=0, description="scale: the update is (lora_alpha / r) B A")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = Field(
        ALL_LINEAR, description="module names, or all-linear (every projection); a list may hold all-linear plus names"
    )
    modules_to_save: list[str] | None = Field(None, description="modules trained in full beside the adapter")
    target_parameters: list[str] | None = Field(
        None, description="parameters (not modules) given a LoRA update, e.g. fused MoE experts: mlp.experts.gate_up_proj"
    )
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction")
    fan_in_fan_out: bool = Field(False, description="the layers store weights as (fan_in, fan_out), e.g. GPT-2's Conv1D")
    use_rslora: bool = Field(False, description="rank-stabilized LoRA: the update is scaled by lora_alpha / sqrt(r) (peft)")
    lora_model_dir: str | None = Field(
        None, description="start from this saved adapter (its adapter_config.json sets r, alpha, targets) and train it on"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_saved_adapter(cls, data: Any) -> Any:
        """With ``lora_model_dir``, the settings are the saved adapter's (Axolotl loads it with them and
        ignores the YAML's): they fill the entry, so the resolved config shows them, and one given in
        the YAML must agree, so that none is silently ignored."""
        if not (isinstance(data, dict) and data.get("lora_model_dir")):
            return data
        saved_file = Path(data["lora_model_dir"]).expanduser() / "adapter_config.json"
        if not saved_file.is_file():
            message = "{path} is not a saved peft adapter (no adapter_config.json)"
            raise PydanticCustomError("lora_model_dir", message, {"path": data["lora_model_dir"]})
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        keys = [key for key in SAVED_SETTINGS if key in saved]
        differ = [key for key in keys if key in data and _as_saved(data[key]) != _as_saved(saved[key])]
        if differ:
            detail = ", ".join(f"{key} {data[key]!r} (saved: {saved[key]!r})" for key in differ)
            message = "the adapter in {path} was saved with other settings: {detail}; remove them or match them"
            raise PydanticCustomError("lora_model_dir", message, {"path": data["lora_model_dir"], "detail": detail})
        return {**{key: saved[key] for key in keys}, **data}


SAVED_SETTINGS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "modules_to_save", "use_dora", "fan_in_fan_out",
    "use_rslora",
)


def _as_saved(value: Any) -> Any:
    """A setting as adapter_config.json holds it (lists of modules as sets, numbers as floats)."""
    if isinstance(value, (list, tuple, set)):
        return frozenset(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class DoraParams(LoraParams):
    use_dora: Literal[True] = Field(True, description="always true: dora is lora with use_dora")


class IA3Params(StrategyParams):
    target_modules: TargetModules | None = Field(None, description="default: peft's choice for the architecture")
    feedforward_modules: TargetModules | None = Field(None, description="those of target_modules that are MLP inputs")
    modules_to_save: list[str] | None = None

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> IA3Params:
        if self.feedforward_modules is not None and self.target_modules is None:
            raise PydanticCustomError(
                "ia3_modules", "feedforward_modules must be a subset of target_modules; give target_modules too"
            )
        return self


def with_all_linear_resolved(peft_config: PeftConfig, model: PreTrainedModel) -> PeftConfig:
    """``target_modules: [all-linear, q_proj, ...]`` (Axolotl's ``lora_target_linear`` with
    ``lora_target_modules``) as the union of every linear layer's name and the named modules."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    targets = getattr(peft_config, "target_modules", None)
    if not (isinstance(targets, (list, set)) and ALL_LINEAR in targets):
        return peft_config
    linear = _maybe_include_all_linear_layers(dataclasses.replace(peft_config, target_modules=ALL_LINEAR), model)
    names = {name.rsplit(".", 1)[-1] for name in linear.target_modules}  # q_proj, ... as Axolotl names them
    return dataclasses.replace(peft_config, target_modules=sorted(names | set(targets) - {ALL_LINEAR}))


def attach_adapter(
    model: PreTrainedModel, peft_config: PeftConfig, context: RunContext, saved: str | None = None
) -> PreTrainedModel:
    """``model`` wrapped by peft with ``peft_config``, or with the adapter ``saved`` in a folder
    (trainable, its own saved settings); a quantized base is first made trainable-through.

    ``prepare_model_for_kbit_training`` freezes the base and upcasts its non-quantized half-precision
    parameters (norms, embeddings) to float32; it does not change what the base computes from
    float32 weights, so the teacher (this base, adapters off) is still the loaded model.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=context.config.gradient_checkpointing)
    if saved is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, saved, is_trainable=True)
    else:
        peft_model = get_peft_model(model, with_all_linear_resolved(peft_config, model))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("%s: %d trainable parameters of %d (%.3f%%)", peft_config.peft_type, trainable, total, 100 * trainable / total)
    return peft_model


class PeftAdapter(Mitigation):
    """Model stage: wrap the student with the peft adapter that :meth:`peft_config` describes."""

    exclusive_group = ADAPTER_GROUP

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def prepare_model(self, model: PreTrainedModel, context: RunContext) -> PreTrainedModel:
        return attach_adapter(model, self.peft_config(), context, getattr(self.params, "lora_model_dir", None))


class LoraAdapter(PeftAdapter):
    name = "lora"
    Params = LoraParams

    def peft_config(self) -> PeftConfig:
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **self.params.model_dump(exclude={"name", "lora_model_dir"}))


class DoraAdapter(LoraAdapter):
    name = "dora"
    Params = DoraParams


class IA3Adapter(PeftAdapter):
    name = "ia3"
    Params = IA3Params

    def peft_config(self) -> PeftConfig:
        from peft import IA3Config

        return IA3Config(task_type="CAUSAL_LM", **self.params.model_dump(exclude={"name"}))
