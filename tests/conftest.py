from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import DATA, build_tiny_model, write_corpus


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def weightless_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config and tokenizer without its weights: a check that loaded a weight would fail."""
    folder = tmp_path_factory.mktemp("weightless")
    for file in tiny_model.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpora")
    return {
        "spec_train": write_corpus(folder / "legal_train.jsonl", DATA / "legal" / "train.jsonl", 24),
        "spec_val": write_corpus(folder / "legal_val.jsonl", DATA / "legal" / "validation.jsonl", 6),
        "general_val": write_corpus(folder / "general_val.jsonl", DATA / "general" / "validation.jsonl", 6),
        "general_train": write_corpus(folder / "general_train.jsonl", DATA / "general" / "train.jsonl", 24),
    }


@pytest.fixture
def base_config(tiny_model: Path, corpora: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """A complete, valid config dict for a few-step run on the tiny model."""
    return {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(corpora["spec_train"]), "type": "completion"}],
        "test_datasets": [{"path": str(corpora["spec_val"]), "type": "completion"}],
        "general_eval_datasets": [{"path": str(corpora["general_val"]), "type": "completion"}],
        "sequence_len": 64,
        "micro_batch_size": 4,
        "max_steps": 4,
        "eval_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "output_dir": str(tmp_path / "out"),
        "objective": {"name": "mft", "tau": 0.25},
        "seed": 0,
    }


@pytest.fixture
def two_step_config(base_config: dict[str, Any]) -> dict[str, Any]:
    """``base_config`` cut to a 2-step run with no evaluation sets, for tests that only train."""
    dropped = ("test_datasets", "general_eval_datasets", "eval_steps")
    config = {key: value for key, value in base_config.items() if key not in dropped}
    return {**config, "sequence_len": 32, "max_steps": 2, "save_steps": 2}
