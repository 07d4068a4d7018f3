"""Axolotl 0.18.0's own example YAMLs, changed only where a user moving here must change them
(tests/axolotl_population.py), validate (issue 25); the keys that made them fail mean what they mean in Axolotl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.train.recipe import training_arguments
from tests.axolotl_population import POPULATION, problems_of

VALIDATING = 67  # of the 198 (51 before issue 25); README "Axolotl's example YAMLs" lists what stops the rest


def test_the_population_is_axolotls_198_supervised_text_examples() -> None:
    assert len(list(POPULATION.glob("*.y*ml"))) == 198
    assert (POPULATION / "NOTICE.md").is_file()


def test_axolotls_examples_validate(tmp_path: Path) -> None:
    failing = {path.name: found for path in sorted(POPULATION.glob("*.y*ml")) if (found := problems_of(path, tmp_path / path.stem))}
    assert 198 - len(failing) >= VALIDATING, "\n".join(p for found in failing.values() for p in found)


# --- evaluation without a validation set -----------------------------------------------------------


def test_evals_per_epoch_without_a_validation_set_trains_unevaluated(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "test_datasets": None, "eval_steps": None, "evals_per_epoch": 4})
    (note,) = config.start_notes
    assert note.startswith("evals_per_epoch: 4 with no specialized validation set") and "without S" in note
    args = training_arguments(config, train_blocks=40, evaluate=False)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
    with pytest.raises(ConfigError, match="evals_per_epoch: 0 is no evaluation"):
        validate_config({**base_config, "eval_steps": None, "evals_per_epoch": 0})


# --- keys of Axolotl's current spelling ------------------------------------------------------------


def test_warmup_steps_below_one_is_a_ratio(base_config: dict[str, Any]) -> None:
    assert training_arguments(validate_config({**base_config, "warmup_steps": 0.1}), 40, True).warmup_steps == 0.1
    assert validate_config({**base_config, "warmup_steps": 10.0}).warmup_steps == 10
    with pytest.raises(ConfigError, match="warmup_steps: 2.5 is neither a whole number of steps nor a fraction below 1"):
        validate_config({**base_config, "warmup_steps": 2.5})


def test_top_level_fsdp_version(base_config: dict[str, Any]) -> None:
    assert validate_config({**base_config, "fsdp_version": 2}).fsdp_version == 2
    with pytest.raises(ConfigError, match="fsdp_version: only FSDP2 is supported"):
        validate_config({**base_config, "fsdp_version": 1})


# --- speed-only switches ---------------------------------------------------------------------------


def test_speed_switches_are_said_inactive_once(base_config: dict[str, Any]) -> None:
    keys = {"liger_rms_norm": True, "lora_mlp_kernel": True, "use_kernels": False, "gradient_checkpointing": "offload", "tf32": True}
    config = validate_config({**base_config, **keys})
    notes = config.start_notes
    assert [note.split(":")[0] for note in notes][:3] == ["liger_rms_norm", "lora_mlp_kernel", "activation_offloading"]
    assert all("inactive here" in note for note in notes)
    args = training_arguments(config, 40, True)
    assert args.activation_checkpointing  # the checkpointing half of `offload` is applied
    with pytest.raises(ConfigError, match="activation_offloading"):
        validate_config({**base_config, "activation_offloading": "sometimes"})
