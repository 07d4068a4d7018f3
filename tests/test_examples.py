"""Every mft-run YAML in yaml_examples/ that a CPU can run validates as written and trains a few steps.

That is each paper-row YAML (asserted: none of them may drop out) and every other one on a local
model without a GPU engine; those written for GPUs (FSDP, DeepSpeed, an 8B hub model) or for
Axolotl (``plugins:``) are their own tests' business. The runs keep each YAML's model, objective
and mitigations and shorten only what costs time: 2 steps, 64-token blocks, the shipped corpora
cut to a few documents, outputs in a temporary folder. A sweep YAML trains its base config (the
grid itself is ``mft-run sweep``'s to test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mft_plugin import run
from mft_plugin.config.errors import load_config, validate_config
from tests.tiny import DATA, REFERENCE_MODEL, REPO

PAPER_ROWS = ["ft", "mft", "replay", "replay_mft", "lora", "lora_mft", "dora", "dora_mft", "ia3", "ia3_mft", "ewc", "qlora_mft"]
SHORT = {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "sequence_len": 64, "warmup_steps": 0}
GPU_OR_AXOLOTL_KEYS = {"fsdp", "fsdp_config", "deepspeed", "plugins"}


def runs_on_cpu(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    return not GPU_OR_AXOLOTL_KEYS & set(data) and (REPO / data["base_model"]).exists()


EXAMPLES = [path for path in sorted((REPO / "yaml_examples").glob("*.yml")) if runs_on_cpu(path)]


def test_one_yaml_per_paper_row_each_opening_with_its_command() -> None:
    names = {path.stem for path in EXAMPLES}
    assert set(PAPER_ROWS) <= names  # every paper row is among the CPU runs below
    for name in PAPER_ROWS:
        text = (REPO / "yaml_examples" / f"{name}.yml").read_text()
        assert text.startswith("# Paper row") and f"mft-run yaml_examples/{name}.yml" in text


def shortened(node: Any, corpora: dict[str, Path], tmp_path: Path) -> Any:
    """``node`` with the shipped corpora replaced by their cut-down copies and files moved to ``tmp_path``."""
    small = {
        str(Path("data") / path.relative_to(DATA)): str(corpora[key])
        for key, path in {
            "spec_train": DATA / "legal" / "train.jsonl",
            "spec_val": DATA / "legal" / "validation.jsonl",
            "general_train": DATA / "general" / "train.jsonl",
            "general_val": DATA / "general" / "validation.jsonl",
        }.items()
    }
    if isinstance(node, dict):
        out = {key: shortened(value, corpora, tmp_path) for key, value in node.items()}
        if out.get("fisher_path"):
            out["fisher_path"] = str(tmp_path / "fisher.safetensors")
        return out
    if isinstance(node, list):
        return [shortened(item, corpora, tmp_path) for item in node]
    return small.get(node, node) if isinstance(node, str) else node


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_trains_a_few_steps(
    example: Path, corpora: dict[str, Path], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the examples name repo-relative paths
    load_config(example)  # as written
    data = shortened(yaml.safe_load(example.read_text()), corpora, tmp_path)
    data.pop("sweep", None)
    data.update(SHORT, output_dir=str(tmp_path / "out"))
    if any(entry.get("type", "completion") != "completion" for entry in data["datasets"]):
        data["sequence_len"] = yaml.safe_load(example.read_text())["sequence_len"]  # shorter would drop the records
    if not (REFERENCE_MODEL / "model.safetensors").exists():  # the reference model is still being trained
        data["base_model"] = str(tiny_model)
    metrics = run(validate_config(data))
    assert metrics["step"] == 2 and metrics["train_loss"] > 0
    assert {"eval_S", "eval_DG", "eval_DG/S"} <= set(metrics)
