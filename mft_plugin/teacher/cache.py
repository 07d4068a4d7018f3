"""The teacher's outputs, computed once per training block and memory-mapped from disk (README "Performance").

The paper trains 1000 steps over 4M tokens (Sec. 3.1): every context is seen about 8 times, and
an online teacher recomputes the same p^T each time. ``teacher_cache: {top_k: 64}`` runs the
teacher once over the training blocks before training and keeps, per token,

- p^T_l and p^T_max exactly, so the correction weight w (alpha, beta; Sec. 2) is exact
  (the argmax is the first top-k index);
- the ``top_k`` largest probabilities and their indices, and the remaining mass, which the
  distillation target spreads over the other tokens as the student's own p^S does there:
  p~^T stays a distribution, and its tail is the teacher's own at the start of training.

During training no teacher model is held in memory at all. The cache lives in
``{path}/{key}``, where the key hashes the base model's files, the teacher's precision, ``top_k``
and the tokens of every block: runs of a sweep that share the base model and data share the cache.
It is written to a temporary folder renamed into place when complete, so that a killed build
leaves nothing half-written, and two processes never mix their writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainingArguments

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import ROW_COLUMN, PaddingCollator, RowRouting
from mft_plugin.data.labels import safe_labels, shift_for_causal_lm
from mft_plugin.files import fingerprint
from mft_plugin.models.forms import is_quantized
from mft_plugin.models.heads import default_chunk_size
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher
from mft_plugin.strategy import TeacherStats
from mft_plugin.teacher.views import TeacherHead

FORMAT_VERSION = 1
META_FILE = "meta.json"
FIELDS = {  # name: (numpy dtype, trailing shape is top_k)
    "p_label": (np.float32, False),
    "p_max": (np.float32, False),
    "rest": (np.float32, False),
    "top_probs": (np.float32, True),
    "top_ids": (np.int32, True),
}
BUILD_BATCH_ROWS = 8


@dataclass(frozen=True)
class CachedTeacherChunks:
    """One batch's cached teacher outputs, per token (``[N]`` and ``[N, k]``), as the chunked loss reads them."""

    p_label: torch.Tensor
    p_max: torch.Tensor
    rest: torch.Tensor
    top_probs: torch.Tensor
    top_ids: torch.Tensor

    def chunk(self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor) -> TeacherStats:
        """p~^T into ``out`` ``[n, V]``: the top-k probabilities, and the rest of the mass over the other
        tokens in the proportions of the student's own p^S there (a constant target, like all of p~^T).

        The student starts as the teacher (self-distillation), so this tail is exactly the teacher's at
        the start; it then only asks the tail to keep its total mass, not to take any given shape.
        """
        top_ids = self.top_ids[rows]
        tail = torch.exp(log_p_student, out=out).scatter_(1, top_ids, 0.0)  # p^S outside the top k
        tail.mul_((self.rest[rows] / tail.sum(dim=1).clamp(min=torch.finfo(out.dtype).tiny)).unsqueeze(1))
        out.scatter_(1, top_ids, self.top_probs[rows].to(out.dtype))
        return TeacherStats(p_label=self.p_label[rows], p_max=self.p_max[rows])


class TeacherCache:
    """The cache of one base model and training set, read batch by batch (a teacher for ``MFTTrainer``)."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu") -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in FIELDS}
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> TeacherCache:
        self.device = torch.device(device)
        return self

    def targets(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> CachedTeacherChunks:
        """The cached outputs of the batch's blocks (its ``teacher_row`` routing column), all rows
        (reading is free)."""
        blocks = RowRouting.of(batch).cache_rows.cpu().numpy()
        width = batch["input_ids"].shape[1]
        read = lambda name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][blocks, :width]))  # noqa: E731
        fields = {name: read(name).to(self.device).flatten(0, 1) for name in FIELDS}
        fields["top_ids"] = fields["top_ids"].long()
        return CachedTeacherChunks(**fields)

    def logits(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        raise TypeError("the teacher cache stores no logits: it serves the chunked loss only (loss_impl: auto/chunked)")


def blocks_digest(blocks: Dataset) -> str:
    """sha256 of every block's tokens, in order (the cache's rows are the blocks' indices)."""
    digest = hashlib.sha256()
    for ids in blocks["input_ids"]:
        digest.update(len(ids).to_bytes(8, "little") + np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_key(config: MFTConfigBase, blocks: Dataset) -> str:
    """What the cached outputs depend on: the base model's files, how the teacher is held, the data."""
    teacher = config.teacher.model_dump() if config.teacher is not None else None
    bnb = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
    quantization = {k: getattr(config, k) for k in bnb}
    grown = config.special_tokens or config.tokens  # added tokens: new embedding rows, drawn with the seed
    added = {"special": config.special_tokens.model_dump() if config.special_tokens else None, "tokens": config.tokens}
    settings = {
        "format": FORMAT_VERSION,
        "top_k": config.teacher_cache.top_k,
        "teacher": teacher,
        "base_quantization": quantization,
        "added_tokens": {**added, "seed": config.seed} if grown else None,
        "blocks": blocks_digest(blocks),
    }
    return fingerprint(config.base_model, settings=settings)


def _write_batch(arrays: dict[str, np.ndarray], start: int, head: TeacherHead, labels: torch.Tensor, k: int) -> None:
    """The outputs of one batch of blocks (``labels`` ``[batch, seq]``, shifted), chunk by chunk."""
    batch, seq = labels.shape
    flat = safe_labels(labels).flatten()
    vocab = head.weight.shape[0]
    chunk = default_chunk_size(flat.shape[0], vocab, with_teacher=False)
    buffer = torch.empty((chunk, vocab), dtype=torch.promote_types(head.hidden.dtype, torch.float32),
                         device=head.hidden.device)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    for first in range(0, flat.shape[0], chunk):
        rows = slice(first, first + chunk)
        p_teacher = buffer[: flat[rows].shape[0]]
        stats = head.chunk(rows, flat[rows], p_teacher, None)
        top = p_teacher.topk(k, dim=1)
        out["p_label"].append(stats.p_label)
        out["p_max"].append(stats.p_max)
        out["top_probs"].append(top.values)
        out["top_ids"].append(top.indices)
        out["rest"].append((1.0 - top.values.float().sum(dim=1)).clamp(min=0.0))
    for name, parts in out.items():
        values = torch.cat(parts).float() if name != "top_ids" else torch.cat(parts)
        arrays[name][start : start + batch, :seq] = values.reshape(batch, seq, *values.shape[1:]).cpu().numpy()


def write_cache(
    teacher: FrozenCopyTeacher | SharedBaseTeacher, blocks: Dataset, collator: PaddingCollator, folder: Path, top_k: int
) -> None:
    """Run ``teacher`` over every block and store its outputs in ``folder`` (built aside, renamed into place)."""
    device = next(teacher.model.parameters()).device
    width = max(len(ids) for ids in blocks["input_ids"])
    k = min(top_k, teacher.model.get_output_embeddings().weight.shape[0])
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.mkdir(parents=True)
    try:
        shapes = {False: (len(blocks), width), True: (len(blocks), width, k)}
        arrays = {
            name: np.lib.format.open_memmap(temporary / f"{name}.npy", mode="w+", dtype=dtype, shape=shapes[ranked])
            for name, (dtype, ranked) in FIELDS.items()
        }
        for start in tqdm(range(0, len(blocks), BUILD_BATCH_ROWS), desc="Building the teacher cache (batches)"):
            batch = collator([blocks[i] for i in range(start, min(start + BUILD_BATCH_ROWS, len(blocks)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            _write_batch(arrays, start, teacher.targets(batch), shift_for_causal_lm(batch["labels"]), k)
        for array in arrays.values():
            array.flush()
        meta = {"format": FORMAT_VERSION, "blocks": len(blocks), "width": width, "top_k": k}
        (temporary / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        os.replace(temporary, folder)
    except OSError:
        if not (folder / META_FILE).exists():  # not another process's complete cache: a real failure
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def cached_teacher(
    config: MFTConfigBase,
    blocks: Dataset,
    make_teacher: Callable[[], FrozenCopyTeacher | SharedBaseTeacher],
    collator: PaddingCollator,
    args: TrainingArguments,
) -> tuple[TeacherCache, Dataset]:
    """The cache of these blocks (built with ``make_teacher()`` if missing) and the blocks with their
    cache row in :data:`ROW_COLUMN`. The main process builds it; the others then read it."""
    root = Path(config.teacher_cache.path or Path(config.output_dir) / "teacher_cache")
    folder = root / cache_key(config, blocks)
    with args.main_process_first(desc="teacher cache"):
        if not (folder / META_FILE).exists():
            teacher = make_teacher()
            if not is_quantized(teacher.model):
                teacher.model.to(args.device)
            write_cache(teacher, blocks, collator, folder, config.teacher_cache.top_k)
            del teacher  # the teacher model is not held during training
    return TeacherCache(folder), blocks.add_column(ROW_COLUMN, list(range(len(blocks))))

