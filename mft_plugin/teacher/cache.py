"""The teacher computed once per training block and memory-mapped from disk (README "Performance").

The paper trains 1000 steps over 4M tokens (Sec. 3.1): every context is seen about 8 times, and an
online teacher recomputes the same p^T each time. ``teacher_cache:`` runs the teacher once over the
training blocks before training and stores, per token, either

- in adapter runs (a frozen head shared by teacher and student), u = W^T p^T, p^T_l and p^T_max
  (the default there, :mod:`.projected`): the loss and its gradient then need no teacher logits at all;
- otherwise its final hidden states (the default, :mod:`.hidden_states`): p^T is then recomputed exactly,
  chunk by chunk, from them and the frozen head; no other teacher weight is held during training;
- or p^T_l, p^T_max and the ``top_k`` largest probabilities (:mod:`.top_k`): an approximation.

This module owns what both share. The cache lives in ``{path}/{key}``, where the key hashes the base
model as it is held, the teacher's own settings, what is stored and every block's rows
(:mod:`mft_plugin.digest`): runs of a sweep that share those share the cache. It is written to a temporary folder renamed
into place when complete, so that a killed build leaves nothing half-written, and two processes never
mix their writes. A cache found damaged (a truncated array, a missing or unreadable ``meta.json``, a
leftover folder) is logged, discarded and rebuilt. Under every engine (:class:`CachePlan`): the main
process builds it where the teacher's weights are whole before the Trainer exists; under ZeRO-3, when
training begins, every rank runs the teacher in lockstep and the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainingArguments

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import FT_LOSS_COLUMN, ROUTING_COLUMNS, ROW_COLUMN, PaddingCollator
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.digest import cache_key
from mft_plugin.models.forms import is_quantized
from mft_plugin.models.precision import run_autocast
from mft_plugin.teacher.hidden_states import HiddenStates
from mft_plugin.teacher.projected import Projected, projection_problem
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher, Teacher
from mft_plugin.teacher.stored import NO_ROW, STORAGE, CacheLayout, Field
from mft_plugin.teacher.top_k import TopK

FORMAT_VERSION = 2
META_FILE = "meta.json"
BUILD_BATCH_ROWS = 8
logger = logging.getLogger(__name__)


class CacheDamaged(ValueError):
    """A cache folder that cannot be read as its ``meta.json`` describes it (the message says why)."""


def cache_layout(config: MFTConfigBase, student: torch.nn.Module | None = None) -> CacheLayout:
    """What ``teacher_cache:`` stores for ``student`` (None: as for full finetuning): the top-k
    approximation if asked; else the projected layout where its identity holds (``layout: auto``) or
    where it is asked for (UnfusableError if it does not hold); else the hidden states."""
    settings = config.teacher_cache
    if settings.top_k is not None:
        return TopK(settings.top_k)
    if settings.layout == "hidden_states" or (settings.layout == "auto" and projection_problem(student) is not None):
        return HiddenStates(student_head=config.engine_name == "ddp")
    return Projected.for_student(student)


def layout_reason(config: MFTConfigBase, layout: CacheLayout, student: torch.nn.Module) -> str:
    """The startup line's words for which layout was chosen, and why."""
    if layout.kind != HiddenStates.kind:
        return "asked for" if layout.kind == TopK.kind or config.teacher_cache.layout != "auto" else "frozen head shared with the base"
    return "asked for" if config.teacher_cache.layout == "hidden_states" else f"projected does not apply: {projection_problem(student)}"


def cache_folder(config: MFTConfigBase, blocks: Dataset, layout: CacheLayout | None = None) -> Path:
    """``{teacher_cache.path}/{key}`` (default path: ``output_dir/teacher_cache``)."""
    root = Path(config.teacher_cache.path or Path(config.output_dir) / "teacher_cache")
    return root / teacher_cache_key(config, blocks, layout)


def teacher_cache_key(config: MFTConfigBase, blocks: Dataset, layout: CacheLayout | None = None) -> str:
    """The key of the cache of ``blocks`` (:func:`mft_plugin.digest.cache_key`: the rows and the base as it
    is held), plus what only this cache adds: its format, what it stores (``layout``, default
    :func:`cache_layout` without a student) and how the teacher is held."""
    layout = layout or cache_layout(config)
    teacher = config.teacher.model_dump(mode="json") if config.teacher is not None else None
    settings = {"format": FORMAT_VERSION, "store": {"kind": layout.kind, **layout.settings()}, "teacher": teacher}
    return cache_key("teacher cache", config, rows=[blocks], settings=settings)


def _batches(
    blocks: Dataset, collator: PaddingCollator, device: torch.device, shown: bool = True
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    starts = range(0, len(blocks), BUILD_BATCH_ROWS)
    for start in tqdm(starts, desc="Building the teacher cache (batches)", disable=not shown):
        batch = collator([blocks[i] for i in range(start, min(start + BUILD_BATCH_ROWS, len(blocks)))])
        yield start, {key: value.to(device) for key, value in batch.items()}


def write_cache(
    teacher: FrozenCopyTeacher | SharedBaseTeacher,
    blocks: Dataset,
    collator: PaddingCollator,
    folder: Path,
    layout: CacheLayout,
    store: bool = True,
) -> None:
    """Run ``teacher`` over every block and store what ``layout`` keeps in ``folder`` (built aside, renamed
    into place). Run it in the run's precision context (:func:`mft_plugin.models.precision.run_autocast`).

    ``store``: False on the other ranks where the teacher's forward is collective (ZeRO-3 gathers each
    layer from every rank): they run it over the same batches as the main process, in lockstep, and
    write nothing."""
    device = next(teacher.model.parameters()).device
    if not store:
        for _, batch in _batches(blocks, collator, device, shown=False):  # the main process shows the progress
            teacher.targets(batch)
        return
    width = max([len(ids) for ids in blocks["input_ids"]] + [collator.pad_to or 0])  # pad_to_sequence_len pads past the longest
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.mkdir(parents=True)
    try:
        arrays: dict[str, np.ndarray] = {}
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for start, batch in _batches(blocks, collator, device):
            view = teacher.targets(batch)
            if not arrays:
                specs = layout.fields(view, len(blocks), width)
                arrays = {
                    name: np.lib.format.open_memmap(temporary / f"{name}.npy", mode="w+", dtype=STORAGE[dtype], shape=shape)
                    for name, (dtype, shape) in specs.items()
                }
            layout.write_batch(arrays, start, view, shift_for_causal_lm(batch["labels"]))
        for array in arrays.values():
            array.flush()
        fields = {name: {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)} for name, (dtype, shape) in specs.items()}
        meta = {"format": FORMAT_VERSION, "kind": layout.kind, "blocks": len(blocks), "width": width, "fields": fields}
        (temporary / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        os.replace(temporary, folder)
    except OSError:
        if not (folder / META_FILE).exists():  # not another process's complete cache: a real failure
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def open_fields(folder: Path, kind: str) -> dict[str, Field]:
    """The arrays of a complete cache of ``kind``, memory-mapped; CacheDamaged if any is not as
    ``meta.json`` describes it (missing, truncated, another shape or dtype)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") != kind:
            raise CacheDamaged(f"{META_FILE} says format {meta.get('format')!r}, kind {meta.get('kind')!r}")
        fields = {}
        for name, spec in meta["fields"].items():
            dtype, shape = getattr(torch, spec["dtype"]), tuple(spec["shape"])
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if array.shape != shape or array.dtype != STORAGE[dtype]:
                raise CacheDamaged(f"{name}.npy holds {array.dtype} {array.shape}, {META_FILE} says {spec}")
            fields[name] = Field(array, dtype)
        return fields
    except CacheDamaged as error:
        raise CacheDamaged(f"{folder}: {error}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # truncated, missing, not JSON
        raise CacheDamaged(f"{folder}: {type(error).__name__}: {error}") from None


def _usable(folder: Path, kind: str) -> dict[str, Field] | None:
    """The cache's arrays, or None when it must be built (absent; damaged, which is logged and discarded)."""
    if not folder.exists():
        return None
    try:
        return open_fields(folder, kind)
    except CacheDamaged as error:
        logger.warning("teacher cache damaged, rebuilding it: %s", error)
        discarded = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.damaged")
        os.replace(folder, discarded)  # out of the way at once; a half-deleted folder never looks like a cache
        shutil.rmtree(discarded, ignore_errors=True)
        return None


def _taught_blocks(blocks: Dataset) -> list[int]:
    """The blocks whose loss reads p^T: all but those routed to the plain FT loss (``ft_loss``)."""
    if FT_LOSS_COLUMN not in blocks.column_names:
        return list(range(len(blocks)))
    return [i for i, ft in enumerate(blocks[FT_LOSS_COLUMN]) if not ft]


@dataclass(frozen=True)
class CachePlan:
    """The cache of one run's taught blocks (``built``: their model inputs alone) in ``folder``, and how to
    make it: by the main process alone where the teacher's weights are whole (:meth:`built_by_main`), or
    by every rank in lockstep where only the training engine runs them (ZeRO-3, :meth:`built_in_lockstep`).
    Either way the training ranks read the same folder."""

    config: MFTConfigBase
    built: Dataset
    layout: CacheLayout
    folder: Path
    collator: PaddingCollator
    student: torch.nn.Module

    def _write(self, teacher: FrozenCopyTeacher | SharedBaseTeacher, device_type: str, store: bool = True) -> None:
        with run_autocast(self.config.bf16, self.config.fp16, device_type):
            write_cache(teacher, self.built, self.collator, self.folder, self.layout, store)

    def _open(self, fields: dict[str, Field] | None = None) -> Teacher:
        return self.layout.open(fields if fields is not None else open_fields(self.folder, self.layout.kind), self.student)

    def built_by_main(self, make_teacher: Callable[[], FrozenCopyTeacher | SharedBaseTeacher], args: TrainingArguments) -> Teacher:
        """The cache, built with ``make_teacher()`` if missing or damaged by the main process while the
        others wait; they then read it (DDP, FSDP2 before ``fully_shard``, ZeRO-1/2: whole weights)."""
        with args.main_process_first(desc="teacher cache"):
            fields = _usable(self.folder, self.layout.kind)
            if fields is None:
                teacher = make_teacher()
                if not is_quantized(teacher.model):
                    teacher.model.to(args.device)
                self._write(teacher, args.device.type)
                del teacher  # the teacher model is not held during training
        return self._open(fields)

    def built_in_lockstep(
        self, make_teacher: Callable[[], FrozenCopyTeacher | SharedBaseTeacher], accelerator: Accelerator
    ) -> Teacher:
        """The cache, built if missing or damaged by every rank running ``make_teacher()`` (placed by the
        engine) over the same batches while the main process alone writes: a ZeRO-3 forward gathers each
        layer from every rank, so a rank that ran it alone would wait forever. The main process decides
        whether to build (a damaged cache is discarded there only) and tells the others."""
        main = accelerator.is_main_process
        fields = _usable(self.folder, self.layout.kind) if main else None
        build = broadcast_object_list([main and fields is None])[0]
        if build:
            self._write(make_teacher(), accelerator.device.type, store=main)
        accelerator.wait_for_everyone()  # the folder is complete
        return self._open(fields)


def plan_cache(config: MFTConfigBase, blocks: Dataset, collator: PaddingCollator, student: torch.nn.Module) -> tuple[CachePlan, Dataset]:
    """The cache of these blocks and the blocks with their cache row in :data:`ROW_COLUMN`.

    Only the blocks whose loss reads p^T are built: those routed to the plain FT loss (replayed
    general text, ``ft_loss``) get :data:`NO_ROW`, as the online teacher skips them. The cache is
    built from the model inputs alone (no routing column), so a replay run shares it with a run on
    the same specialized data without replay."""
    taught = _taught_blocks(blocks)
    built = (blocks.select(taught) if len(taught) < len(blocks) else blocks).remove_columns(
        [column for column in ROUTING_COLUMNS if column in blocks.column_names]
    )
    layout = cache_layout(config, student)
    folder = cache_folder(config, built, layout)
    logger.warning("teacher cache: %s layout (%s), in %s", layout.kind, layout_reason(config, layout, student), folder)
    rows = [NO_ROW] * len(blocks)
    for row, block in enumerate(taught):
        rows[block] = row
    return CachePlan(config, built, layout, folder, collator, student), blocks.add_column(ROW_COLUMN, rows)


def cached_teacher(
    config: MFTConfigBase,
    blocks: Dataset,
    make_teacher: Callable[[], FrozenCopyTeacher | SharedBaseTeacher],
    collator: PaddingCollator,
    args: TrainingArguments,
    student: torch.nn.Module,
) -> tuple[Teacher, Dataset]:
    """The cache of these blocks (built with ``make_teacher()``, in the run's precision, if missing or
    damaged) and the blocks with their cache row (:func:`plan_cache`). The main process builds it;
    the others then read it (:meth:`CachePlan.built_by_main`)."""
    plan, indexed = plan_cache(config, blocks, collator, student)
    return plan.built_by_main(make_teacher, args), indexed
