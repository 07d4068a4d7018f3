"""What a teacher cache stores and how its arrays are read (:mod:`mft_plugin.teacher.cache` builds them).

One :class:`CacheLayout` per kind of cache (:mod:`.hidden_states`, :mod:`.projected`, :mod:`.top_k`);
arrays are ``.npy`` files memory-mapped as :class:`Field`, in the dtype the teacher computed them in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol

import numpy as np
import torch

from mft_plugin.data.batches import RowRouting
from mft_plugin.data.labels import safe_labels
from mft_plugin.models.heads import default_chunk_size
from mft_plugin.strategy import TeacherStats
from mft_plugin.teacher.sources import Teacher
from mft_plugin.teacher.views import TeacherHead

# numpy has no bfloat16: its bits are stored as int16 and viewed back
STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int32: np.int32}


NO_ROW = -1  # the cache row of a block whose loss reads no p^T (``ft_loss`` rows): none was built
# A cached token's index (TOKEN_COLUMN) is row x TOKEN_STRIDE + position: independent of the cache's width,
# so that it can be written before the cache is opened; NO_ROW for a token no cache holds (padding).
TOKEN_STRIDE = 1 << 32


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

    def tokens(self, indices: np.ndarray) -> torch.Tensor:
        """The stored values of single tokens ``indices`` (any shape, :func:`token_indices`), as a tensor of
        that shape and the stored trailing dimensions; :data:`NO_ROW` reads as zeros, as in :meth:`rows`."""
        rows, positions = np.divmod(np.maximum(indices, 0), TOKEN_STRIDE)
        stored = self.array[rows, positions]  # advanced indexing: a copy, never the memory map
        stored[indices < 0] = 0
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


class PerTokenCache:
    """A cache whose arrays are all per token, ``[blocks, width, ...]`` (top-k, projected), read batch by
    batch: what its teachers share. A subclass's ``targets`` builds its view from :meth:`read`."""

    def __init__(self, fields: dict[str, Field], device: torch.device | str = "cpu") -> None:
        self.fields = fields
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> PerTokenCache:
        self.device = torch.device(device)
        return self

    def read(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every stored array at the batch's blocks, all rows (reading is free), ``[N, ...]`` on the device."""
        return {name: stored_at(field, batch).to(self.device).flatten(0, 1) for name, field in self.fields.items()}

    def logits(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        no_logits()


def stored_at(field: Field, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``field`` at every position of a training batch, ``[batch, seq, ...]``: read per token where the batch
    carries its tokens' cache indices (``teacher_token``: rows that concatenate cached rows), else per row
    (its ``teacher_row`` routing column: each row is one cached block)."""
    routing = RowRouting.of(batch)
    if routing.cache_tokens is not None:
        return field.tokens(routing.cache_tokens.cpu().numpy())
    return field.rows(routing.cache_rows.cpu().numpy(), batch["input_ids"].shape[1])


def token_indices(row: int, length: int) -> list[int]:
    """The cache indices of the first ``length`` tokens of cache row ``row`` (all :data:`NO_ROW` for a row
    not cached), which a collator that concatenates rows concatenates with their input ids."""
    return [NO_ROW] * length if row == NO_ROW else [row * TOKEN_STRIDE + position for position in range(length)]




def teacher_chunks(view: TeacherHead, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, TeacherStats]]:
    """p^T ``[n, V]`` (float32 at least, one reused buffer) and its stats, chunk by chunk over the tokens of
    ``labels`` ``[batch, seq]`` (shifted): what the layouts that store per-token outputs reduce p^T to."""
    flat = safe_labels(labels).flatten()
    vocab = view.weight.shape[0]
    chunk = default_chunk_size(flat.shape[0], vocab, with_teacher=False, hidden_size=view.weight.shape[1])
    buffer = torch.empty((chunk, vocab), dtype=torch.promote_types(view.hidden.dtype, torch.float32), device=view.hidden.device)
    for first in range(0, flat.shape[0], chunk):
        rows = slice(first, first + chunk)
        p_teacher = buffer[: flat[rows].shape[0]]
        yield p_teacher, view.chunk(rows, flat[rows], p_teacher, None)


def write_tokens(arrays: dict[str, np.ndarray], start: int, labels: torch.Tensor, parts: dict[str, list[torch.Tensor]]) -> None:
    """Store per-token outputs gathered chunk by chunk (``parts``: name -> ``[n, ...]`` pieces, in token
    order) as rows ``start ...`` of ``arrays``, for a batch whose ``labels`` are ``[batch, seq]``."""
    batch, seq = labels.shape
    for name, pieces in parts.items():
        values = torch.cat(pieces)
        arrays[name][start : start + batch, :seq] = as_stored(values.reshape(batch, seq, *values.shape[1:]))
