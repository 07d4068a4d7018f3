"""Checkpoints that are complete or never resumed from: a kill while saving loses a step, not the run.

The Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG states,
``trainer_state.json``) with no mark of completion, and transformers' ``get_last_checkpoint`` takes
the highest N whatever it holds: after a SIGKILL in the middle of a save, ``resume_from_checkpoint:
true`` would load a truncated optimizer state or fail on a missing file. So a checkpoint gets a
manifest (every file and its size) written last and atomically; resuming takes the newest
checkpoint whose files match its manifest, and moves newer incomplete ones aside (the resumed run
will write those steps again).

Each checkpoint also carries the run's resolved config (:data:`RUN_CONFIG`), so that resuming
with a config that differs in anything but :data:`RESUMABLE_KEYS` is refused naming the keys:
another objective or ``sequence_len`` would mix two runs in one set of metrics. A checkpoint at
the run's last step is finished: resuming it ends the run without training (:func:`is_final`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mft_plugin.files import atomic_write_text

logger = logging.getLogger(__name__)
MANIFEST = "mft_checkpoint_complete.json"
RUN_CONFIG = "mft_run_config.json"  # the resolved config, in output_dir and in every checkpoint
# Keys that may differ on resume: where results go and how they are logged, never what is trained.
RESUMABLE_KEYS = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_steps", "save_total_limit",
    "dataloader_num_workers", "wandb_project", "wandb_entity", "wandb_name", "use_tensorboard", "sweep",
})  # fmt: skip
INCOMPLETE_PREFIX = "incomplete-"  # outside the Trainer's ``checkpoint-*`` glob: never rotated nor resumed
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint named by ``resume_from_checkpoint`` that cannot be resumed from."""


def _files(checkpoint: Path) -> dict[str, int]:
    return {
        path.relative_to(checkpoint).as_posix(): path.stat().st_size
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def finish_checkpoint(run_dir: Path, step: int, save_total_limit: int | None, best: str | None) -> Path:
    """Mark ``checkpoint-<step>`` complete, then rotate old checkpoints (main process, after every rank saved).

    Rotation comes after the mark so that a kill in between never leaves only an unmarked checkpoint.
    """
    checkpoint = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if (run_dir / RUN_CONFIG).is_file():  # before the manifest, which then lists it
        atomic_write_text(checkpoint / RUN_CONFIG, (run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    atomic_write_text(checkpoint / MANIFEST, json.dumps({"step": step, "files": _files(checkpoint)}, indent=1))
    rotate_checkpoints(str(run_dir), save_total_limit, best_model_checkpoint=best, use_mtime=True)
    return checkpoint


def is_complete(checkpoint: Path) -> bool:
    """Whether the checkpoint's manifest exists and every file it lists is there with its size."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
        return manifest["files"] == {
            name: size for name, size in _files(checkpoint).items() if name in manifest["files"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest step first."""
    found = [
        (int(m.group(1)), path)
        for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if (m := _CHECKPOINT.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found)]


def _set_aside(checkpoint: Path) -> Path:
    target = checkpoint.with_name(INCOMPLETE_PREFIX + checkpoint.name)
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"{INCOMPLETE_PREFIX}{suffix}-{checkpoint.name}")
    checkpoint.rename(target)
    return target


def latest_complete_checkpoint(run_dir: Path, set_aside: bool = True) -> Path | None:
    """The newest complete checkpoint; with ``set_aside``, newer incomplete ones are renamed
    ``incomplete-checkpoint-N`` (by one process only: the others find the same answer without renaming)."""
    found = checkpoints(run_dir)
    while found and not is_complete(found[-1]):
        checkpoint = found.pop()
        if set_aside:
            moved = _set_aside(checkpoint)
            logger.warning("%s was not completely written (killed while saving?); moved to %s", checkpoint, moved)
    return found[-1] if found else None


def resume_target(resume_from_checkpoint: bool | str | None, run_dir: Path, main_process: bool = True) -> str | None:
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets: a complete checkpoint's path, or None.

    ``true`` takes the newest complete checkpoint (none yet: a fresh start, with a warning); only the
    ``main_process`` moves incomplete ones aside. A path is refused if its manifest says files are
    missing or truncated; a checkpoint without a manifest (made by another tool) is trusted with a
    warning, since nothing can be checked.
    """
    if resume_from_checkpoint is True:
        latest = latest_complete_checkpoint(run_dir, set_aside=main_process)
        if latest is None:
            logger.warning(
                "resume_from_checkpoint: no complete checkpoint in %s yet; starting from the base model", run_dir
            )
        return str(latest) if latest is not None else None
    if not resume_from_checkpoint:
        return None
    return str(check_named_checkpoint(Path(resume_from_checkpoint)))


def check_named_checkpoint(checkpoint: Path) -> Path:
    """``resume_from_checkpoint: <path>`` as it may be resumed from, or :class:`CheckpointError`."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {checkpoint} is not a folder")
    if (checkpoint / MANIFEST).exists() and not is_complete(checkpoint):
        raise CheckpointError(
            f"resume_from_checkpoint: {checkpoint} is incomplete (files missing or truncated: killed while saving?); "
            "name an earlier checkpoint, or use resume_from_checkpoint: true for the newest complete one"
        )
    if not (checkpoint / MANIFEST).exists():
        logger.warning(
            "resume_from_checkpoint: %s has no %s (not written by mft-plugin); cannot check it is complete",
            checkpoint,
            MANIFEST,
        )
    return checkpoint


def record_run_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Write the run's resolved config (``model_dump(mode="json")``); each checkpoint copies it."""
    atomic_write_text(run_dir / RUN_CONFIG, json.dumps(resolved, indent=1, sort_keys=True))


def config_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (:data:`RESUMABLE_KEYS` aside)."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return [] if stored == current else [prefix or "(top level)"]
    differences = []
    for key in sorted(set(stored) | set(current)):
        if not (prefix or key not in RESUMABLE_KEYS):
            continue
        differences += config_differences(stored.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
    return differences


def check_resume_config(checkpoint: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` with a config that differs in a key that must not change."""
    try:
        stored = json.loads((checkpoint / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("resume_from_checkpoint: %s records no config (%s); cannot check it was made by this config",
                       checkpoint, RUN_CONFIG)  # fmt: skip
        return
    differences = config_differences(stored, resolved)
    if differences:
        raise CheckpointError(
            f"resume_from_checkpoint: {checkpoint} was made with another config; these keys differ: "
            f"{', '.join(differences)}. Resume with the run's own config, or start a new run in another "
            "output_dir (or with overwrite_output_dir: true)"
        )


def resume_checkpoint(resume_from_checkpoint: bool | str | None, run_dir: Path) -> Path | None:
    """The checkpoint a resume would start from, found without moving anything (for checks before a run)."""
    if resume_from_checkpoint is True:
        return latest_complete_checkpoint(run_dir, set_aside=False)
    return Path(resume_from_checkpoint) if resume_from_checkpoint else None


def is_final(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved at the run's last step (``global_step >= max_steps``)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        return 0 < state["max_steps"] <= state["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def restore_final(trainer: Trainer, checkpoint: Path, engine_name: str) -> None:
    """Finish a run from the checkpoint of its last step, without training (a kill came after it).

    ``Trainer.train`` would run one more step past ``max_steps``; instead the state is read back and
    the final model loaded as training would have left it: the best checkpoint when one was chosen,
    else this one. Under fsdp/deepspeed the weights load only inside ``train()``: refused there.
    """
    if engine_name != "ddp":
        raise CheckpointError(
            f"resume_from_checkpoint: {checkpoint} is the run's last step; finishing a run from it without "
            f"training is supported with DDP only, not {engine_name}. Its checkpoints hold the trained weights"
        )
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()
    else:
        trainer._load_from_checkpoint(str(checkpoint))
    logger.warning("%s is the run's last step (%d): finishing the run without training", checkpoint, trainer.state.global_step)
