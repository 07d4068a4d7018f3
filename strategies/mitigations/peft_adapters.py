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

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from mft_plugin.config.adapters import ADAPTER_GROUP
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
    target_modules: TargetModules = Field("all-linear", description="module names, or all-linear (every projection)")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full beside the adapter")
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction")


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


def attach_adapter(model: PreTrainedModel, peft_config: PeftConfig, context: RunContext) -> PreTrainedModel:
    """``model`` wrapped by peft with ``peft_config``; a quantized base is first made trainable-through.

    ``prepare_model_for_kbit_training`` freezes the base and upcasts its non-quantized half-precision
    parameters (norms, embeddings) to float32; it does not change what the base computes from
    float32 weights, so the teacher (this base, adapters off) is still the loaded model.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=context.config.gradient_checkpointing)
    peft_model = get_peft_model(model, peft_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("%s: %d trainable parameters of %d (%.3f%%)", peft_config.peft_type, trainable, total, 100 * trainable / total)
    return peft_model


class PeftAdapter(Mitigation):
    """Model stage: wrap the student with the peft adapter that :meth:`peft_config` describes."""

    exclusive_group = ADAPTER_GROUP

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def prepare_model(self, model: PreTrainedModel, context: RunContext) -> PreTrainedModel:
        return attach_adapter(model, self.peft_config(), context)


class LoraAdapter(PeftAdapter):
    name = "lora"
    Params = LoraParams

    def peft_config(self) -> PeftConfig:
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **self.params.model_dump(exclude={"name"}))


class DoraAdapter(LoraAdapter):
    name = "dora"
    Params = DoraParams


class IA3Adapter(PeftAdapter):
    name = "ia3"
    Params = IA3Params

    def peft_config(self) -> PeftConfig:
        from peft import IA3Config

        return IA3Config(task_type="CAUSAL_LM", **self.params.model_dump(exclude={"name"}))
