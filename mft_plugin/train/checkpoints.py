"""Checkpoints that are complete or never resumed from: a kill while saving loses a step, not the run.

The Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG states,
``trainer_state.json``) with no mark of completion, and transformers' ``get_last_checkpoint`` takes
the highest N whatever it holds: after a SIGKILL in the middle of a save, ``resume_from_checkpoint:
true`` would load a truncated optimizer state or fail on a missing file. So a checkpoint gets a
manifest (every file and its size) written last and atomically; resuming takes the newest
checkpoint whose files match its manifest, and moves newer incomplete ones aside (the resumed run
will write those steps again).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mft_plugin.files import atomic_write_text

logger = logging.getLogger(__name__)
MANIFEST = "mft_checkpoint_complete.json"
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
