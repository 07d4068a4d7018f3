"""The output folder: refusing to clobber another run, the base-perplexity cache, the best eval."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mft_plugin.config import MFTConfigBase

BASE_PPL_FILE = "base_perplexity.json"


class OutputDirError(RuntimeError):
    pass


def prepare_output_dir(config: MFTConfigBase, create: bool = True) -> Path:
    """Create ``output_dir``; refuse one holding checkpoints unless resuming or overwriting."""
    output_dir = Path(config.output_dir)
    has_checkpoints = any(output_dir.glob("checkpoint-*"))
    if has_checkpoints and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise OutputDirError(
            f"output_dir: {output_dir} already holds checkpoints of another run; set "
            "resume_from_checkpoint: true to continue it, overwrite_output_dir: true to start over, "
            "or choose another output_dir"
        )
    if not create:
        return output_dir
    if has_checkpoints and config.overwrite_output_dir and not config.resume_from_checkpoint:
        for checkpoint in output_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def base_key(config: MFTConfigBase) -> str:
    """Hash of what the base perplexities depend on: the base model and the evaluation data."""
    relevant = {
        "base_model": config.base_model,
        "tokenizer": config.tokenizer_config,
        "sequence_len": config.sequence_len,
        "datasets": [d.model_dump() for d in config.datasets],
        "test_datasets": [d.model_dump() for d in config.test_datasets or []],
        "val_set_size": config.val_set_size,
        "seed": config.seed,
        "general": [d.model_dump() for d in config.general_eval_datasets or []],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def load_base_perplexities(output_dir: Path, config: MFTConfigBase) -> dict[str, float] | None:
    """The cached base perplexities if they were measured for this very base and data."""
    file = output_dir / BASE_PPL_FILE
    try:
        cached = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cached.get("key") != base_key(config) or not isinstance(cached.get("perplexities"), dict):
        return None
    return {k: float(v) for k, v in cached["perplexities"].items()}


def save_base_perplexities(output_dir: Path, config: MFTConfigBase, perplexities: dict[str, float]) -> None:
    atomic_write_text(output_dir / BASE_PPL_FILE, json.dumps({"key": base_key(config), "perplexities": perplexities}))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def best_evaluation(log_history: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The logged evaluation with the least ``metric`` (the paper's checkpoint choice)."""
    evaluations = [entry for entry in log_history if metric in entry]
    if not evaluations:
        return None
    best = min(evaluations, key=lambda entry: entry[metric])
    return {k: v for k, v in best.items() if k.startswith("eval_") or k == "step"}
