"""The Axolotl plugin: its Axolotl-free part everywhere, the plugin and ``axolotl train`` where Axolotl is.

Axolotl pins its own transformers/peft/accelerate/datasets, so it is not installed beside our
pinned stack (CI); the ``needs_axolotl`` tests run in an environment of its own (README:
"Axolotl plugin"). What proves MFT ran inside Axolotl: at the first step the student is the
teacher, so the MFT gradient is the FT gradient with each token's scaled by its label weight
w. A random teacher is wrong nearly everywhere and near-uniform, where w = alpha =
(d + tau) / (1 + d) with d = p^T_max - p^T_label small: w is tau or a little more. The tokens'
gradients partly cancel in the sum over a batch, so unequal weights move the norm of the sum a
little either way: the first gradient norm of ``mft`` is about tau times that of ``ft`` (seen:
0.208 to 0.25 for tau = 0.25; 1 would be plain finetuning), with the teacher a frozen copy (full
finetuning) and the shared base (Axolotl's ``adapter: lora``) alike.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mft_plugin.axolotl.bridge import (
    args_model,
    run_context,
    selected_strategies,
    trainer_class,
    unsupported,
)
from mft_plugin.registry import default_registry
from mft_plugin.teacher.sources import FrozenCopyTeacher
from mft_plugin.train.engine import Engine
from tests.tiny import REPO, write_yaml

TAU = 0.25


def assert_scaled_by_tau(mft_grad_norm: float, ft_grad_norm: float) -> None:
    assert 0.5 * TAU < mft_grad_norm / ft_grad_norm < 1.5 * TAU
needs_axolotl = pytest.mark.skipif(importlib.util.find_spec("axolotl") is None, reason="Axolotl is not installed")


# --- without Axolotl: the keys, the checks, the trainer class ------------------------------------


def test_axolotl_schema_gains_exactly_objective_and_mitigations() -> None:
    model = args_model(default_registry())
    assert set(model.model_fields) == {"objective", "mitigations"}
    defaults = model.model_validate({})
    assert (defaults.objective.name, defaults.objective.tau, defaults.mitigations) == ("mft", 0.25, [])
    with pytest.raises(ValidationError, match="tua"):
        model.model_validate({"objective": {"name": "mft", "tua": 0.5}})
    with pytest.raises(ValidationError, match="cannot be combined"):
        model.model_validate({"mitigations": ["lora", "dora"]})


def test_strategies_are_built_from_an_axolotl_config(corpora: dict[str, Path]) -> None:
    ewc = {"name": "ewc", "datasets": [{"path": str(corpora["general_val"])}]}
    objective, mitigations = selected_strategies({"objective": "ft", "mitigations": [ewc]}, default_registry())
    assert (objective.name, [m.name for m in mitigations]) == ("ft", ["ewc"])
    objective, mitigations = selected_strategies({"objective": None}, default_registry())  # Axolotl's unset key
    assert (objective.name, objective.params.tau, mitigations) == ("mft", TAU, [])


def test_what_axolotl_owns_is_refused_with_the_key_to_use_instead(corpora: dict[str, Path]) -> None:
    general = [{"path": str(corpora["general_val"])}]
    chosen = {"mitigations": ["lora", {"name": "replay", "datasets": general}, {"name": "ewc", "datasets": general}]}
    _, mitigations = selected_strategies(chosen, default_registry())
    problems = unsupported({"sample_packing": True, "rl": "dpo"}, mitigations)
    assert len(problems) == 4
    assert problems[0].startswith("rl/reward_model:")
    assert problems[1].startswith("sample_packing:") and "sample_packing: false" in problems[1]
    assert "'lora' acts at the prepare_model stage" in problems[2] and "adapter: lora" in problems[2]
    assert "'replay' acts at the prepare_data stage" in problems[3] and "datasets:" in problems[3]
    assert unsupported({"sample_packing": False}, mitigations[2:]) == []  # ewc acts on the loss: fine
    assert "ewc works with DDP only" in unsupported({"fsdp_config": {"fsdp_version": 2}}, mitigations[2:])[0]


def test_run_context_reads_the_keys_both_schemas_share(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    cfg = {"base_model": str(tiny_model), "sequence_len": 96, "seed": 7, "output_dir": "out", "datasets": [{"type": "alpaca"}]}
    context = run_context(cfg, AutoTokenizer.from_pretrained(tiny_model))
    assert (context.config.base_model, context.config.sequence_len, context.config.seed) == (str(tiny_model), 96, 7)
    assert context.output_dir == Path("out")
    assert "datasets" not in context.config.model_fields_set  # Axolotl's dataset entries are not ours
    assert not context.config.fsdp_enabled


def _first_grad_norm(objective_name: str, tiny_model: Path, corpora: dict[str, Path], tmp_path: Path) -> float:
    """One step of ``trainer_class`` over a plain Trainer; the logged gradient norm."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    from mft_plugin.config.schema import DatasetConfig
    from mft_plugin.data.batches import PaddingCollator
    from mft_plugin.data.packing import raw_text_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    blocks = raw_text_blocks([DatasetConfig(path=str(corpora["spec_train"]))], tokenizer, 64)
    objective, _ = selected_strategies({"objective": objective_name}, default_registry())
    loaded: list[Any] = []

    def load_copy(student: Any) -> Any:
        loaded.append(student)
        return AutoModelForCausalLM.from_pretrained(tiny_model)

    cls = trainer_class(Trainer, objective, [], load_copy, Engine())
    args = TrainingArguments(
        output_dir=str(tmp_path / objective_name), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-3, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, seed=0,
    )  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer = cls(model=student, args=args, train_dataset=blocks, data_collator=PaddingCollator(tokenizer.pad_token_id))
    if objective.needs_teacher:  # a frozen copy, loaded once for this student; none for ft
        assert isinstance(trainer.teacher, FrozenCopyTeacher) and loaded == [student]
    else:
        assert trainer.teacher is None and not loaded
    assert trainer.evaluate.__func__ is Trainer.evaluate  # the base trainer's own evaluation
    trainer.train()
    return next(entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry)


def test_mft_trainer_class_on_a_base_trainer_scales_the_first_gradient_by_tau(
    tiny_model: Path, corpora: dict[str, Path], tmp_path: Path
) -> None:
    assert_scaled_by_tau(_first_grad_norm("mft", tiny_model, corpora, tmp_path), _first_grad_norm("ft", tiny_model, corpora, tmp_path))


# --- with Axolotl -----------------------------------------------------------------------------


@needs_axolotl
def test_plugin_loads_and_merges_its_keys_into_axolotls_schema() -> None:
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.integrations.config import merge_input_args

    manager = PluginManager.get_instance()
    manager.register("mft_plugin.axolotl.MFTPlugin")
    plugin = manager.plugins["mft_plugin.axolotl.MFTPlugin"]
    assert isinstance(plugin, BasePlugin)
    try:
        _, input_config = merge_input_args()
        assert {"objective", "mitigations"} <= set(input_config.model_fields)
    finally:
        del manager.plugins["mft_plugin.axolotl.MFTPlugin"]


def _axolotl_train(config: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    path = write_yaml(folder / f"{config['output_dir'].rsplit('/', 1)[-1]}.yml", config)
    bin_dir = str(Path(sys.executable).parent)  # `axolotl train` runs `accelerate launch` from PATH
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "AXOLOTL_DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [os.path.join(bin_dir, "axolotl"), "train", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _logged_steps(result: subprocess.CompletedProcess[str]) -> list[dict[str, float]]:
    assert result.returncode == 0, result.stderr[-5000:]
    entries = [ast.literal_eval(match) for match in re.findall(r"\{'loss': [^}]*\}", result.stdout + result.stderr)]
    return [{key: float(entry[key]) for key in ("loss", "grad_norm")} for entry in entries]


@pytest.fixture
def axolotl_config(tiny_model: Path, corpora: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """A plain Axolotl SFT config on the tiny model, CPU-friendly (no kernels, no packing)."""
    return {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(corpora["spec_train"]), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "logging_steps": 1,
        "save_strategy": "no",
        "flash_attention": False,
        "bf16": False,  # float32 on CPU (Axolotl would otherwise pick a half precision)
        "fp16": False,
        "tf32": False,
        "seed": 0,
    }


def _with_plugin(config: dict[str, Any], folder: Path, name: str, **keys: Any) -> dict[str, Any]:
    return {**config, "plugins": ["mft_plugin.axolotl.MFTPlugin"], "output_dir": str(folder / name), **keys}


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_runs_mft_with_a_frozen_teacher(axolotl_config: dict[str, Any], tmp_path: Path) -> None:
    plain = _logged_steps(_axolotl_train({**axolotl_config, "output_dir": str(tmp_path / "plain")}, tmp_path))
    ft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ft", objective="ft"), tmp_path))
    mft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "mft", objective={"name": "mft", "tau": TAU}), tmp_path))
    assert len(plain) == len(ft) == len(mft) == 3
    assert ft == plain  # the plugin's trainer with objective ft is Axolotl's own training
    assert_scaled_by_tau(mft[0]["grad_norm"], ft[0]["grad_norm"])


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_runs_mft_on_axolotls_lora_with_the_shared_base(axolotl_config: dict[str, Any], tmp_path: Path) -> None:
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True}
    lora |= {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}  # triton kernels need CUDA
    ft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ft", objective="ft", **lora), tmp_path))
    mft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "mft", objective="mft", **lora), tmp_path))
    assert_scaled_by_tau(mft[0]["grad_norm"], ft[0]["grad_norm"])


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_applies_loss_stage_mitigations_and_refuses_the_others(
    axolotl_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    general = [{"path": str(corpora["general_val"])}]
    ewc = {"name": "ewc", "ewc_lambda": 1e8, "fisher_samples": 2, "datasets": general}
    steps = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ewc", mitigations=[ewc]), tmp_path))
    assert steps[1]["loss"] > 2 * steps[0]["loss"]  # the penalty, 0 at the start, dominates once weights move

    replay = _with_plugin(axolotl_config, tmp_path, "replay", mitigations=[{"name": "replay", "datasets": general}])
    refused = _axolotl_train(replay, tmp_path)
    assert refused.returncode != 0
    assert "mitigations: 'replay' acts at the prepare_data stage" in refused.stdout + refused.stderr
