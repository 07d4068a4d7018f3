"""The output folder: refusing to clobber another run, the base-perplexity cache, the best eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mft_plugin.config.adapters import QuantizationKeys
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.files import atomic_write_text, fingerprint
from mft_plugin.models.precision import precision_name
from mft_plugin.train.launch import is_main_process

BASE_PPL_FILE = "base_perplexity.json"
METRICS_FILE = "metrics.json"  # written last and atomically: a run with it is finished


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
    starting_over = has_checkpoints and config.overwrite_output_dir and not config.resume_from_checkpoint
    if starting_over and is_main_process():  # one rank deletes: several at once trip over each other
        for checkpoint in output_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def base_key(config: MFTConfigBase) -> str:
    """Hash of what the base perplexities depend on: the base model, how it is held and computed
    (precision, quantization, the loss path the evaluation shares), and the evaluation data.

    The files themselves are hashed (:func:`fingerprint`), not only their names: a model folder or a
    data file replaced in place makes the cache stale. The training data, ``val_set_size`` and
    ``seed`` count only when the specialized evaluation set is split off the training data; with
    ``test_datasets`` they do not, so the runs of a seed sweep share one measurement.
    """
    split_off_training_data = not config.test_datasets
    eval_specs = list(config.datasets if split_off_training_data else config.test_datasets)
    specs = [*eval_specs, *(config.general_eval_datasets or [])]
    data_files = [f for d in specs for f in ([d.data_files] if isinstance(d.data_files, str) else d.data_files or [])]
    sources = [config.base_model, config.tokenizer_config or config.base_model, *(d.path for d in specs), *data_files]
    relevant = {
        "base_model": config.base_model,
        "tokenizer": config.tokenizer_config,
        "sequence_len": config.sequence_len,
        "spec": [d.model_dump() for d in eval_specs],
        "split": {"val_set_size": config.val_set_size, "seed": config.seed} if split_off_training_data else None,
        "general": [d.model_dump() for d in config.general_eval_datasets or []],
        "precision": precision_name(config.bf16, config.fp16),
        "quantization": {key: getattr(config, key) for key in QuantizationKeys.model_fields},
        "loss_impl": config.loss_impl,
    }
    return fingerprint(*sources, settings=relevant)


def load_base_perplexities(output_dir: Path, config: MFTConfigBase) -> dict[str, float] | None:
    """The cached base perplexities if they were measured for this very base and data."""
    file = output_dir / BASE_PPL_FILE
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, truncated or not text: measured again
        return None
    if not (isinstance(cached, dict) and cached.get("key") == base_key(config)):
        return None  # another base or other data: stale, so measured again
    perplexities = cached.get("perplexities")
    if not (isinstance(perplexities, dict) and all(isinstance(v, (int, float)) for v in perplexities.values())):
        return None
    return {k: float(v) for k, v in perplexities.items()}


def save_base_perplexities(output_dir: Path, config: MFTConfigBase, perplexities: dict[str, float]) -> None:
    atomic_write_text(output_dir / BASE_PPL_FILE, json.dumps({"key": base_key(config), "perplexities": perplexities}))


def best_evaluation(log_history: list[dict[str, Any]], best_model_checkpoint: str | None) -> dict[str, Any] | None:
    """The logged evaluation of the checkpoint the Trainer loaded as best (``checkpoint-<step>``).

    Read off the checkpoint actually kept, not recomputed as the least logged perplexity, so that
    ``metrics.json`` always describes the saved model (the paper's choice, Sec. 3.1, within the
    degeneralization budget of ``mft_plugin.train.budget``). None when no checkpoint was selected.
    """
    if best_model_checkpoint is None:
        return None
    step = int(Path(best_model_checkpoint).name.rsplit("-", 1)[1])
    evaluations = [entry for entry in log_history if entry.get("step") == step and any(k.startswith("eval_") for k in entry)]
    return {k: v for k, v in evaluations[-1].items() if k.startswith("eval_") or k == "step"} if evaluations else None
