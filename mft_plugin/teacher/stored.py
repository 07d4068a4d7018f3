"""What a teacher cache stores and how its arrays are read (:mod:`mft_plugin.teacher.cache` builds them).

One :class:`CacheLayout` per kind of cache (:mod:`.hidden_states`, :mod:`.top_k`); arrays are ``.npy``
files memory-mapped as :class:`Field`, in the dtype the teacher computed them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol

import numpy as np
import torch

from mft_plugin.data.batches import RowRouting
from mft_plugin.teacher.sources import Teacher
from mft_plugin.teacher.views import TeacherHead

# numpy has no bfloat16: its bits are stored as int16 and viewed back
STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int32: np.int32}


NO_ROW = -1  # the cache row of a block whose loss reads no p^T (``ft_loss`` rows): none was built


@dataclass(frozen=True)
class Field:
    """One stored array, ``[blocks, width, ...]`` or a whole tensor (the frozen head), memory-mapped."""

    array: np.ndarray
    dtype: torch.dtype

    def rows(self, blocks: np.ndarray, width: int) -> torch.Tensor:
        """The first ``width`` positions of ``blocks``, as a tensor of the stored dtype; a block
        :data:`NO_ROW` (trained on the plain FT loss, so never cached) reads as zeros.

        Positions past the stored width read as zeros: the cache is as wide as its longest block (or the
        collator that built it), so they are padding, never a label (``pad_to_sequence_len`` batches
        where no block reaches ``sequence_len``, reading a cache built without it)."""
        stored = self.array[np.maximum(blocks, 0), :width]
        stored[blocks < 0] = 0  # a row not cached (NO_ROW): the zeros an online teacher gives rows it skips
        if stored.shape[1] < width:
            padding = np.zeros((stored.shape[0], width - stored.shape[1], *stored.shape[2:]), dtype=stored.dtype)
            stored = np.concatenate([stored, padding], axis=1)
        return as_tensor(np.ascontiguousarray(stored), self.dtype)

    def whole(self) -> torch.Tensor:
        return as_tensor(np.array(self.array), self.dtype)


def no_logits() -> NoReturn:
    """What a cache answers when asked for logits (the plain loss path)."""
    raise TypeError("the teacher cache stores no logits: it serves the chunked loss only (loss_impl: auto/chunked)")


def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(array).view(dtype)


def as_stored(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as the numpy array that stores it (bfloat16 as its int16 bits)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


class CacheLayout(Protocol):
    """What one kind of cache stores, and how it serves the loss."""

    kind: str

    def settings(self) -> dict[str, object]:
        """What the stored values depend on besides the teacher and the data (part of the key)."""

    def fields(self, view: TeacherHead, blocks: int, width: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each array's dtype and shape, given the teacher's view of a first batch."""

    def write_batch(self, arrays: dict[str, np.ndarray], start: int, view: TeacherHead, labels: torch.Tensor) -> None:
        """Store one batch of blocks from ``start`` (``labels`` ``[batch, seq]``, shifted)."""

    def open(self, fields: dict[str, Field], student: torch.nn.Module) -> Teacher:
        """The teacher that reads these arrays during training."""


def cache_rows(batch: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The cache rows of a training batch's blocks (its ``teacher_row`` routing column)."""
    return RowRouting.of(batch).cache_rows.cpu().numpy()


