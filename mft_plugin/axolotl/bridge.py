"""What the Axolotl plugin does, without importing Axolotl (so that it is tested where Axolotl is not).

Axolotl's config reaches us as a mapping (its ``DictDefault``) whose keys are Axolotl's; ours
are named after Axolotl's wherever both have the key, so the shared ones are read as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from mft_plugin.config.schema import MFTConfigBase, strategies_model
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.engine import Engine
from mft_plugin.train.recipe import build_strategies
from mft_plugin.registry import Registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher.sources import build_teacher
from mft_plugin.train.trainer import MFTTrainer

# Keys both schemas have but shape differently (Axolotl's dataset entries, its FSDP block).
AXOLOTL_SHAPED_KEYS = {"datasets", "test_datasets", "general_eval_datasets", "fsdp", "fsdp_config"}
STAGES_AXOLOTL_OWNS = {
    "prepare_data": "Axolotl prepares the data; add the extra data as another entry of its datasets:",
    "prepare_model": "Axolotl attaches adapters; use its own keys (adapter: lora, lora_r, ...)",
}


def args_model(registry: Registry) -> type[BaseModel]:
    """The model Axolotl merges into its schema: exactly ``objective`` and ``mitigations``, validated
    against our registry as mft-run validates them (unknown keys and names are errors)."""
    return strategies_model(registry, BaseModel, name="MFTArgs")


def selected_strategies(cfg: Mapping[str, Any], registry: Registry) -> tuple[Objective, list[Mitigation]]:
    """The objective and mitigations an Axolotl config selects (default objective: mft)."""
    given = {key: cfg[key] for key in ("objective", "mitigations") if cfg.get(key) is not None}
    return build_strategies(args_model(registry).model_validate(given), registry)  # type: ignore[arg-type]


def unsupported(cfg: Mapping[str, Any], mitigations: Sequence[Mitigation]) -> list[str]:
    """What this Axolotl config asks that the MFT trainer cannot do, one message per key."""
    problems = []
    if cfg.get("rl") or cfg.get("reward_model") or cfg.get("process_reward_model"):
        problems.append("rl/reward_model: MFT is a supervised finetuning objective; use the plugin with SFT configs")
    if cfg.get("sample_packing"):
        problems.append(
            "sample_packing: the MFT trainer gives teacher and student input_ids and attention_mask only, "
            "but packed samples need their position_ids; set sample_packing: false"
        )
    for mitigation in mitigations:
        own = type(mitigation)
        stages = [stage for stage in STAGES_AXOLOTL_OWNS if getattr(own, stage) is not getattr(Mitigation, stage)]
        for stage in stages:
            problems.append(f"mitigations: {mitigation.name!r} acts at the {stage} stage: {STAGES_AXOLOTL_OWNS[stage]}")
        if not stages:  # what it says of the rest of the config, as mft-run asks it
            problems += own.config_problems(mitigation.params, config_view(cfg))
    return problems


def config_view(cfg: Mapping[str, Any]) -> MFTConfigBase:
    """Axolotl's config as ours: its values of the keys both schemas share (Axolotl validated them).

    The keys Axolotl shapes differently are left out, but whether it shards with FSDP is kept.
    """
    keys = [key for key in MFTConfigBase.model_fields if key not in AXOLOTL_SHAPED_KEYS]
    shared = {key: cfg[key] for key in keys if cfg.get(key) is not None}
    return MFTConfigBase.model_construct(**shared, fsdp=bool(cfg.get("fsdp") or cfg.get("fsdp_config")))


def run_context(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> RecipeContext:
    """The context a mitigation's ``on_train_begin`` gets (e.g. EWC packs its Fisher data with it)."""
    config = config_view(cfg)
    return RecipeContext(config=config, tokenizer=tokenizer, output_dir=Path(config.output_dir))


def frozen_copy_loader(cfg: Mapping[str, Any]) -> Callable[[PreTrainedModel], PreTrainedModel]:
    """Full finetuning's teacher: ``base_model`` again, in the dtype Axolotl gave the student."""

    def load(student: PreTrainedModel) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        trust = bool(cfg.get("trust_remote_code"))
        return AutoModelForCausalLM.from_pretrained(cfg["base_model"], dtype=student.dtype, trust_remote_code=trust)

    return load


def trainer_class(
    base: type[Trainer],
    objective: Objective,
    mitigations: Sequence[Mitigation],
    load_frozen_copy: Callable[[PreTrainedModel], PreTrainedModel],
    engine: Engine,
) -> type[MFTTrainer]:
    """MFTTrainer's loss on top of Axolotl's trainer class ``base``, keeping Axolotl's evaluation.

    Axolotl instantiates the class with its usual arguments; the teacher is built from the
    student it passes (the shared base under an adapter, else a frozen copy), and placed on the
    student's device, sharded like it under FSDP2/ZeRO-3 (:meth:`mft_plugin.train.engine.Engine.place_teacher`).
    """

    class AxolotlMFTTrainer(MFTTrainer, base):  # type: ignore[misc, valid-type]
        evaluate = base.evaluate  # Axolotl's eval_loss: here the objective's loss on the eval set

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            student = kwargs["model"]
            teacher = build_teacher(objective.needs_teacher, student, lambda: load_frozen_copy(student))
            super().__init__(
                *args, objective=objective, teacher=teacher, mitigations=mitigations, engine=engine, **kwargs
            )

    return AxolotlMFTTrainer
