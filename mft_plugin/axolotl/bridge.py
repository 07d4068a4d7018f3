"""What the Axolotl plugin does, without importing Axolotl (so that it is tested where Axolotl is not).

Axolotl's config reaches us as a mapping (its ``DictDefault``) whose keys are Axolotl's; ours
are named after Axolotl's wherever both have the key, so the shared ones are read as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from pydantic import BaseModel, ValidationError, create_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from mft_plugin.axolotl.cache import AxolotlTeacherCache, packing_problem
from mft_plugin.config.errors import ConfigError, format_errors, read_yaml
from mft_plugin.config.loss import TeacherCacheConfig, loss_impl_problem
from mft_plugin.config.schema import NEEDS_VALIDATION_SET, MFTConfigBase, strategies_model
from mft_plugin.eval.metrics import GENERAL, SPEC
from mft_plugin.loss.chunked import ChunkedLoss, loss_choice
from mft_plugin.registry import Registry
from mft_plugin.strategy import Mitigation, Objective
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher, Teacher, build_teacher
from mft_plugin.train.budget import Budget
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.engine import Engine
from mft_plugin.train.outputs import SPEC_METRIC
from mft_plugin.train.recipe import build_strategies
from mft_plugin.train.trainer import MFTTrainer

# Keys both schemas have but shape differently (Axolotl's dataset entries, its FSDP block).
AXOLOTL_SHAPED_KEYS = {"datasets", "test_datasets", "general_eval_datasets", "fsdp", "fsdp_config"}
# mft-run's evaluation keys that Axolotl's schema lacks: the plugin adds them, defined as in ours.
EVALUATION_KEYS = ("general_eval_datasets", "max_degeneralization", "target_specialization")
# mft-run's loss keys: the fused loss and its probe, and the teacher cache (README "Performance"), as mft-run has them.
LOSS_KEYS = ("loss_impl", "teacher_cache")
PLUGIN_KEYS = ("objective", "mitigations", *EVALUATION_KEYS, *LOSS_KEYS)  # what the plugin adds to Axolotl's schema
# transformers reads packed rows (sample_packing: positions restarting, no attention mask) off
# position_ids only when the forward builds no KV cache: a model whose config says use_cache would
# attend across the packed sequences. Teacher and student are both held without one.
NO_KV_CACHE = {"use_cache": False}
STAGES_AXOLOTL_OWNS = {
    "prepare_model": "Axolotl attaches adapters; use its own keys (adapter: lora, lora_r, ...)",
}
# Axolotl's multipack sampler bins rows into micro-batches by length: a data-stage mitigation's layout
# (e.g. replay's k new rows then micro_batch_size - k general rows) would not survive it.
PACKING_REFUSAL = (
    "sample_packing: true with mitigations: {names} (data stage): Axolotl's multipack sampler fills each "
    "micro-batch by bin-packing rows by length, so no micro-batch keeps the composition the mitigation lays "
    "out (replay: ratio x micro_batch_size new rows, the rest general rows); set sample_packing: false"
)
# Axolotl keys a data-stage mitigation sets, each with why no other value can be kept. The order too: the
# mitigation draws it itself (replay's seeded epoch_order, as in mft-run), and Axolotl's seeded shuffle of the
# merged rows before it would lay the same rows out in other micro-batches than mft-run's.
DATA_STAGE_KEYS: dict[str, tuple[Any, str]] = {
    "remove_unused_columns": (False, "the data-stage mitigation's routing columns are needed by the loss"),
    "shuffle_merged_datasets": (False, "the data-stage mitigation draws the order of the rows itself, as mft-run does"),
}
CACHE_KEYS: dict[str, tuple[Any, str]] = {  # the same for teacher_cache, whose index column the loss reads
    "remove_unused_columns": (False, "the teacher cache's index column is needed by the loss"),
}


def args_model(registry: Registry) -> type[BaseModel]:
    """The model Axolotl merges into its schema: ``objective``, ``mitigations``, the evaluation keys,
    ``loss_impl`` and ``teacher_cache``, validated against our registry and schema as mft-run validates them (unknown keys and
    names are errors)."""
    keys = (*EVALUATION_KEYS, *LOSS_KEYS)
    fields = {key: (MFTConfigBase.model_fields[key].annotation, MFTConfigBase.model_fields[key]) for key in keys}
    return strategies_model(registry, create_model("MFTEvaluationKeys", **fields), name="MFTArgs")  # type: ignore[call-overload]


def plugin_args(cfg: Mapping[str, Any], registry: Registry) -> BaseModel:
    """Our keys of an Axolotl config, validated (default objective: mft); :class:`ConfigError` names each
    bad key as mft-run names it (with its line, when Axolotl says which YAML file the config came from)."""
    model = args_model(registry)
    try:
        return model.model_validate({key: cfg[key] for key in PLUGIN_KEYS if cfg.get(key) is not None})
    except ValidationError as error:
        source = config_source(cfg)
        root = read_yaml(source)[1] if Path(source).is_file() else None
        raise ConfigError(format_errors(error, model, source, root, set())) from None


def config_source(cfg: Mapping[str, Any]) -> str:
    """The YAML file an Axolotl config was read from (Axolotl's ``load_cfg`` records it), for messages."""
    return str(cfg.get("axolotl_config_path") or "<axolotl config>")


def refusal(cfg: Mapping[str, Any], mitigations: Sequence[Mitigation]) -> ConfigError | None:
    """:func:`unsupported`'s problems as one :class:`ConfigError`, each line naming the file (None: none)."""
    problems = unsupported(cfg, mitigations)
    return ConfigError([f"{config_source(cfg)}: {problem}" for problem in problems]) if problems else None


def selected_strategies(cfg: Mapping[str, Any], registry: Registry) -> tuple[Objective, list[Mitigation]]:
    """The objective and mitigations an Axolotl config selects (default objective: mft)."""
    return build_strategies(plugin_args(cfg, registry), registry)  # type: ignore[arg-type]


def has_spec_eval(cfg: Mapping[str, Any]) -> bool:
    """Whether Axolotl evaluates on specialized data (its ``test_datasets`` or ``val_set_size``)."""
    return bool(cfg.get("test_datasets") or cfg.get("val_set_size"))


# mft-run fuses the loss under fsdp/deepspeed inside the LM head's forward (mft_plugin.models.heads.fused_forward),
# with the frozen teacher's head copied by its Engine; the plugin's trainer is not wired or tested for it yet.
PLUGIN_UNFUSED = "inside axolotl train yet (mft-run fuses it there, inside the LM head's forward)"


def unsupported(cfg: Mapping[str, Any], mitigations: Sequence[Mitigation]) -> list[str]:
    """What this Axolotl config asks that the MFT trainer cannot do, one message per key."""
    problems = []
    if cfg.get("rl") or cfg.get("reward_model") or cfg.get("process_reward_model"):
        problems.append("rl/reward_model: MFT is a supervised finetuning objective; use the plugin with SFT configs")
    problems += evaluation_problems(cfg)
    sharded = config_view(cfg).engine_name != "ddp"
    cache = None if cfg.get("teacher_cache") is None else TeacherCacheConfig.model_validate(cfg["teacher_cache"])
    if sharded and cache is not None:  # mft-run runs the cache there; the cache needs the fused loss, which the plugin does not
        problems.append(f"teacher_cache: needs the fused loss, which is not used with fsdp/deepspeed {PLUGIN_UNFUSED}; remove teacher_cache")
    packed = bool(cfg.get("sample_packing"))
    for problem in (loss_impl_problem(cfg.get("loss_impl") or "auto", cache), packing_problem(cache, packed)):
        problems += [problem] if problem else []
    if sharded and cfg.get("loss_impl") == "chunked":
        problems.append(f"loss_impl: chunked cannot be used with fsdp/deepspeed {PLUGIN_UNFUSED}; use loss_impl: auto or naive")
    if cfg.get("sample_packing") and (composing := data_stage(mitigations)):
        problems.append(PACKING_REFUSAL.format(names=[m.name for m in composing]))
    problems += [
        f"{key}: {str(cfg[key]).lower()}: {why}; remove the key (the plugin sets {str(value).lower()})"
        for key, (value, why) in required_keys(cfg, mitigations).items() if cfg.get(key) not in (None, value)
    ]  # fmt: skip
    for mitigation in mitigations:
        own = type(mitigation)
        stages = [stage for stage in STAGES_AXOLOTL_OWNS if getattr(own, stage) is not getattr(Mitigation, stage)]
        for stage in stages:
            problems.append(f"mitigations: {mitigation.name!r} acts at the {stage} stage: {STAGES_AXOLOTL_OWNS[stage]}")
        if not stages:  # what it says of the rest of the config, as mft-run asks it
            problems += own.config_problems(mitigation.params, config_view(cfg))
    return problems


def data_stage(mitigations: Sequence[Mitigation]) -> list[Mitigation]:
    """The mitigations that compose the training set (``prepare_data``), e.g. replay."""
    return [m for m in mitigations if type(m).prepare_data is not Mitigation.prepare_data]


def composed_training_set(
    cfg: Mapping[str, Any], mitigations: Sequence[Mitigation], train: Dataset, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, int]:
    """Axolotl's tokenized training set through each data-stage mitigation, as mft-run's recipe passes its
    own (the mitigation's ``prepare_data``, unchanged: replay appends its general blocks, flagged), and the
    rows one epoch draws (``epoch_order``; the Trainer's sampler is then :class:`MicroBatchSampler`)."""
    context = run_context(cfg, tokenizer)
    for mitigation in mitigations:
        train = mitigation.prepare_data(train, context)
    epoch_rows = next((len(order) for m in mitigations if (order := m.epoch_order(0)) is not None), len(train))
    return train, epoch_rows


def scheduled_steps(cfg: Mapping[str, Any], epoch_rows: int) -> int:
    """The optimizer steps Axolotl schedules over ``epoch_rows`` rows per epoch, by its own rule without packing
    (``prepare_datasets``: ``ceil(rows x num_epochs / batch_size)``, at most ``max_steps``). Axolotl's default
    warmup (3% of these steps) and the schedule's length are read off this count: a count past ``max_steps``
    would warm up over steps that never run (seen: 5 warmup steps in a 3-step run, where Axolotl's own count
    gives none)."""
    steps = math.ceil(epoch_rows * cfg["num_epochs"] / cfg["batch_size"])
    return min(steps, cfg["max_steps"]) if cfg.get("max_steps") else steps


def required_keys(cfg: Mapping[str, Any], mitigations: Sequence[Mitigation]) -> dict[str, tuple[Any, str]]:
    """Axolotl keys the plugin sets, each with why: a data-stage mitigation's (:data:`DATA_STAGE_KEYS`: its
    routing columns reach the loss, where the Trainer would drop columns the model's ``forward`` does not
    take, and Axolotl's rows reach it in their datasets' order, which the mitigation composes as mft-run
    composes its own) and the teacher cache's (:data:`CACHE_KEYS`: its index column reaches the loss)."""
    keys = dict(DATA_STAGE_KEYS) if data_stage(mitigations) else {}
    return CACHE_KEYS | keys if cfg.get("teacher_cache") is not None else keys


def evaluation_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Keys that would leave the final checkpoint or the budget to something other than the paper's
    evaluation (the least specialized perplexity among evaluated checkpoints, Sec. 3.1)."""
    problems = []
    if cfg.get("metric_for_best_model") not in (None, SPEC_METRIC):
        problems.append(
            f"metric_for_best_model: {cfg['metric_for_best_model']!r}: under the MFT plugin the best checkpoint is "
            f"the one with the least specialized perplexity ({SPEC_METRIC!r}, paper Sec. 3.1); remove the key"
        )
    steps = best_checkpoint_keys(cfg)
    for key in ("save_strategy", "eval_strategy"):
        if steps.get("save_steps") is not None and cfg.get(key) not in (None, "steps"):
            problems.append(
                f"{key}: {cfg[key]!r}: the best checkpoint by specialized perplexity is chosen among checkpoints "
                "saved at evaluations; remove it (eval_steps and save_steps set the schedule)"
            )
    if steps.get("save_steps") is not None and steps["save_steps"] % steps["eval_steps"]:
        problems.append(
            f"save_steps: {steps['save_steps']} must be a multiple of eval_steps ({steps['eval_steps']}): "
            "the best checkpoint by specialized perplexity is chosen among evaluated checkpoints"
        )
    for key in ("max_degeneralization", "target_specialization"):
        if cfg.get(key) is not None and not has_spec_eval(cfg):
            problems.append(f"{key}: {NEEDS_VALIDATION_SET}")
    if cfg.get("max_degeneralization") is not None and not cfg.get("general_eval_datasets"):
        problems.append("max_degeneralization: needs general_eval_datasets: DG is measured on them")
    return problems


def best_checkpoint_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Axolotl keys that make the final model the checkpoint of least specialized perplexity
    (paper Sec. 3.1), as mft-run does: saved at evaluations, so that each checkpoint is a candidate
    (``save_steps`` defaults to ``eval_steps`` and the reverse; Axolotl loads the best one only when
    ``save_steps`` is a multiple of ``eval_steps``, which :func:`unsupported` checks)."""
    if not has_spec_eval(cfg):
        return {}
    keys = {"metric_for_best_model": SPEC_METRIC, "greater_is_better": False, "load_best_model_at_end": True}
    eval_steps = cfg.get("eval_steps") or cfg.get("save_steps")
    if eval_steps is not None:
        keys |= {"eval_steps": eval_steps, "save_steps": cfg.get("save_steps") or eval_steps}
    return keys


def config_view(cfg: Mapping[str, Any]) -> MFTConfigBase:
    """Axolotl's config as ours: its values of the keys both schemas share (Axolotl validated them).

    The keys Axolotl shapes differently are left out, but whether it shards with FSDP is kept.
    """
    keys = [key for key in MFTConfigBase.model_fields if key not in AXOLOTL_SHAPED_KEYS]
    shared = {key: cfg[key] for key in keys if cfg.get(key) is not None}
    return MFTConfigBase.model_construct(**shared, fsdp=bool(cfg.get("fsdp") or cfg.get("fsdp_config")))


def resolved_config(cfg: Mapping[str, Any], args: BaseModel) -> dict[str, Any]:
    """What ``config.yml`` holds for ``mft-run report``: the shared keys as Axolotl resolved them, and ours."""
    shared = config_view(cfg)
    return {**shared.model_dump(mode="json", include=shared.model_fields_set, warnings=False), **args.model_dump(mode="json")}


def run_context(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> RecipeContext:
    """The context a mitigation's ``on_train_begin`` gets (e.g. EWC packs its Fisher data with it)."""
    config = config_view(cfg)
    return RecipeContext(config=config, tokenizer=tokenizer, output_dir=Path(config.output_dir))


def evaluation_sets(args: BaseModel, cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, spec: Dataset | None) -> dict[str, Dataset]:
    """The paper's two evaluation sets: Axolotl's own eval set (specialized) and ``general_eval_datasets``,
    packed into ``sequence_len`` blocks as mft-run packs them, with the columns Axolotl's collators pad."""
    sets = {SPEC: spec} if spec is not None else {}
    if args.general_eval_datasets:  # type: ignore[attr-defined]
        blocks = run_context(cfg, tokenizer).packed_blocks(args.general_eval_datasets)  # type: ignore[attr-defined]
        sets[GENERAL] = blocks.map(lambda row: {"labels": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])})
    return sets


def loss_chooser(cfg: Mapping[str, Any], args: BaseModel, objective: Objective) -> Callable[[PreTrainedModel], tuple[ChunkedLoss | None, str]]:
    """The loss path for Axolotl's student, chosen as mft-run chooses it (:func:`mft_plugin.loss.chunked.loss_choice`:
    ``loss_impl``, the engine, the objective and a probe forward of the model), with why in words."""
    config = run_config(cfg, args)
    if config.engine_name != "ddp" and config.loss_impl != "naive":
        reason = f"the fused loss is not used with fsdp/deepspeed {PLUGIN_UNFUSED}"
        return lambda student: (None, f"plain (loss_impl: {config.loss_impl}: {reason})")
    return lambda student: loss_choice(config, objective, student)


def run_config(cfg: Mapping[str, Any], args: BaseModel) -> MFTConfigBase:
    """:func:`config_view` with the plugin's own validated ``loss_impl`` and ``teacher_cache``: what the loss
    path, the teacher cache and the base-perplexity key are chosen from, as mft-run chooses them from its config."""
    return config_view(cfg).model_copy(update={key: getattr(args, key) for key in LOSS_KEYS})


def axolotl_teacher_cache(cfg: Mapping[str, Any], args: BaseModel) -> AxolotlTeacherCache | None:
    """The run's teacher cache (``teacher_cache:``), or None."""
    if args.teacher_cache is None:  # type: ignore[attr-defined]
        return None
    return AxolotlTeacherCache(run_config(cfg, args), packed=bool(cfg.get("sample_packing")))


def describe_teacher(teacher: Teacher | None) -> str:
    if isinstance(teacher, SharedBaseTeacher):
        return "shared base (the student's own base with its adapter off; no second copy)"
    if isinstance(teacher, FrozenCopyTeacher):
        return f"frozen copy of the base ({sum(p.numel() for p in teacher.model.parameters()):,} parameters)"
    return "none (the objective needs no teacher)" if teacher is None else type(teacher).__name__


def announcement(trainer: MFTTrainer) -> str:
    """The plugin's one startup line in Axolotl's log: proof that MFT, not plain finetuning, runs."""
    objective = trainer.objective.params.model_dump(mode="json")
    mitigations = [m.params.model_dump(mode="json") for m in trainer.mitigations]
    evaluation = ", ".join(f"{name} ({len(data)} rows)" for name, data in trainer.eval_sets.items()) or "none"
    return (
        f"mft_plugin.axolotl.MFTPlugin active: objective {objective}; mitigations {mitigations or 'none'}; "
        f"teacher: {trainer.teacher_source}; loss: {trainer.loss_path}; "
        f"evaluation: {evaluation}, S/DG/DG-S against the base; best checkpoint by {SPEC_METRIC}; budget {trainer.budget}"
    )


def trainer_class(
    base: type[Trainer],
    objective: Objective,
    mitigations: Sequence[Mitigation],
    load_frozen_copy: Callable[[PreTrainedModel, PreTrainedTokenizerBase | None], PreTrainedModel],
    engine: Engine,
    eval_sets: Callable[[PreTrainedTokenizerBase, Dataset | None], dict[str, Dataset]] = lambda tokenizer, spec: {},
    budget: Budget | None = None,
    choose_loss: Callable[[PreTrainedModel], tuple[ChunkedLoss | None, str]] = lambda student: (None, "plain"),
    cache: AxolotlTeacherCache | None = None,
) -> type[MFTTrainer]:
    """MFTTrainer (loss and evaluation) on top of Axolotl's trainer class ``base``.

    Axolotl instantiates the class with its usual arguments; the teacher is built from the
    student it passes (the shared base under an adapter, else a frozen copy), and placed on the
    student's device, sharded like it under FSDP2/ZeRO-3 (:meth:`mft_plugin.train.engine.Engine.place_teacher`).
    ``eval_sets`` makes the evaluation sets from the tokenizer and Axolotl's eval dataset;
    ``evaluate`` is MFTTrainer's: perplexities, S, DG, DG/S. ``choose_loss`` picks the loss path for
    the student (:func:`loss_chooser`); the startup line says which and why (``loss_path``). ``cache``: the
    teacher is the teacher cache of Axolotl's training set, built here if missing, before the first step
    (:mod:`mft_plugin.axolotl.cache`); the startup line says so (``teacher_source``).
    """

    class AxolotlMFTTrainer(MFTTrainer, base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            student = kwargs["model"]
            student.config.update(NO_KV_CACHE)  # the shared-base teacher is the student
            if kwargs["args"].metric_for_best_model == SPEC_METRIC:  # Axolotl drops a false greater_is_better,
                kwargs["args"].greater_is_better = False  # and the Trainer would take a perplexity for a score
            tokenizer = kwargs.get("processing_class")
            make_teacher = lambda: build_teacher(objective.needs_teacher, student, lambda: load_frozen_copy(student, tokenizer))  # noqa: E731
            sets = eval_sets(tokenizer, kwargs.get("eval_dataset"))
            chunked_loss, self.loss_path = choose_loss(student)  # before the cache: it needs the chunked loss
            if cache is not None and objective.needs_teacher:  # p^T read from disk, as in mft-run
                teacher, kwargs["train_dataset"], kwargs["data_collator"], self.teacher_source = cache.build(
                    kwargs["train_dataset"], make_teacher, kwargs["args"], student, kwargs.get("data_collator")
                )
            else:
                teacher = make_teacher()
                self.teacher_source = describe_teacher(teacher)
            super().__init__(
                *args, objective=objective, teacher=teacher, mitigations=mitigations, engine=engine,
                eval_sets=sets, budget=budget, chunked_loss=chunked_loss, **kwargs,
            )  # fmt: skip

    return AxolotlMFTTrainer
