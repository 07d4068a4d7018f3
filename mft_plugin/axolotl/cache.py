"""``teacher_cache:`` inside ``axolotl train``: mft-run's cache (:func:`mft_plugin.teacher.cache.cached_teacher`)
of Axolotl's tokenized training rows, built when the trainer is created, before the first step.

Each of Axolotl's rows is one block of the cache, under mft-run's key (the rows, the base as it is held, the
layout), in mft-run's layouts: projected where an adapter shares the frozen head, else the hidden states.
Without packing every row then carries its cache row (``teacher_row``), exactly as in mft-run. With
``sample_packing: true`` Axolotl's multipack collator concatenates several rows into one packed row, so a
row index says nothing of a packed row's tokens: each row carries instead one cache index per token
(``teacher_token``, :func:`mft_plugin.teacher.stored.token_indices`), and :class:`TokenIndexCollator`
concatenates and pads them as Axolotl's collator lays out the input ids (it pads only the columns it knows).

Under packing the layout is the hidden states, whatever the adapter: Axolotl labels the last token of each
packed-in row with the first token of the next one (a completion row's first token is a label), which no
per-row cache can know, and the projected and top-k layouts store values of the label (p^T_l); hidden states
do not depend on it, so p^T is recomputed exactly there too.

A tokenizer that pads on the left is refused: Axolotl's collator then puts padding before each row, and the
last padding token, labelled with the row's first token, trains on the teacher's p^T at that padding token,
which no cache of the rows holds (seen: gradients 1e-4 apart, though the loss agreed to 1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainingArguments

from mft_plugin.config.loss import TeacherCacheConfig
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import LABELS, ROUTING_COLUMNS, ROW_COLUMN, TOKEN_COLUMN, PaddingCollator
from mft_plugin.teacher.cache import cache_layout, cached_teacher, layout_reason
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher, Teacher
from mft_plugin.teacher.stored import NO_ROW, token_indices

LEFT_PADDING = (
    "teacher_cache: the tokenizer pads on the left (padding_side: left; Axolotl sets it for Mistral-derived models "
    "with flash attention and no packing): the padding token before each row is then trained to predict the row's "
    "first token, against the teacher's p^T at that padding token, which no cache of the rows holds; remove "
    "teacher_cache, or use a tokenizer that pads on the right"
)
PACKED_LAYOUT = (
    "sample_packing: Axolotl's multipack labels each packed-in row's last token with the next row's first "
    "token, which a per-row cache of p^T_l cannot know; hidden states do not depend on the label"
)
CACHE_INPUTS = ("input_ids", LABELS)  # what the teacher is run on; the cache's collator makes the attention mask

Collator = Callable[[list[Any]], Mapping[str, torch.Tensor]]


def packing_problem(cache: TeacherCacheConfig | None, packed: bool) -> str | None:
    """Why ``teacher_cache`` (validated) cannot be as asked under ``sample_packing`` (``packed``: a layout
    that stores p^T_l), or None."""
    if not packed or cache is None:
        return None
    key = "top_k" if cache.top_k is not None else "layout" if cache.layout == "projected" else None
    if key is None:
        return None
    return (
        f"teacher_cache.{key}: {getattr(cache, key)} with sample_packing: true cannot be exact "
        f"({PACKED_LAYOUT.removeprefix('sample_packing: ')}); remove it (the hidden states are used) or set sample_packing: false"
    )


@dataclass(frozen=True)
class TokenIndexCollator:
    """Axolotl's collator (``inner``) with :data:`TOKEN_COLUMN` laid out as it lays out ``input_ids``.

    ``inner`` gets the features without the column (its ``tokenizer.pad`` would leave a per-token column
    unpadded); each of its rows is the concatenation of one pack's rows (multipack: a list of rows) or one
    row, padded on the right. The indices are concatenated in the same order, padded with :data:`NO_ROW`,
    and checked against the input ids: a collator that laid the tokens out otherwise fails here, never
    reads another token's p^T."""

    inner: Collator

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        packs = [pack if isinstance(pack, list) else [pack] for pack in features]
        indices = [np.concatenate([row[TOKEN_COLUMN] for row in pack]) for pack in packs]
        ids = [np.concatenate([row["input_ids"] for row in pack]) for pack in packs]
        stripped = [[{k: v for k, v in row.items() if k != TOKEN_COLUMN} for row in pack] for pack in packs]
        batch = dict(self.inner([pack if isinstance(given, list) else pack[0] for pack, given in zip(stripped, features)]))
        laid_out = torch.full(batch["input_ids"].shape, NO_ROW, dtype=torch.long)
        for row, (index, row_ids) in enumerate(zip(indices, ids, strict=True)):
            if not torch.equal(batch["input_ids"][row, : len(index)].cpu(), torch.as_tensor(row_ids, dtype=batch["input_ids"].dtype)):
                raise RuntimeError(f"{type(self.inner).__name__} did not lay out row {row}'s input ids as concatenated rows")
            laid_out[row, : len(index)] = torch.as_tensor(index, dtype=torch.long)
        batch[TOKEN_COLUMN] = laid_out
        return batch


@dataclass(frozen=True)
class AxolotlTeacherCache:
    """The teacher cache of a run under the plugin. ``config``: the run's config as mft-run reads it
    (:func:`mft_plugin.axolotl.bridge.run_config`, ``teacher_cache`` validated); ``packed``: ``sample_packing``."""

    config: MFTConfigBase
    packed: bool

    def build(
        self,
        rows: Dataset,
        make_teacher: Callable[[], FrozenCopyTeacher | SharedBaseTeacher],
        args: TrainingArguments,
        student: torch.nn.Module,
        collator: Collator,
    ) -> tuple[Teacher, Dataset, Collator, str]:
        """The cache of Axolotl's training ``rows`` (built with ``make_teacher()`` if missing), the rows with
        their cache index column, the collator that carries it, and the startup line's words for it.
        ValueError (:data:`LEFT_PADDING`) before anything is built where the tokenizer pads on the left."""
        if getattr(getattr(collator, "tokenizer", None), "padding_side", "right") != "right":
            raise ValueError(LEFT_PADDING)
        config = self.config
        if self.packed:  # see the module docstring
            config = config.model_copy(update={"teacher_cache": config.teacher_cache.model_copy(update={"layout": "hidden_states"})})
        layout = cache_layout(config, student)
        reason = PACKED_LAYOUT if self.packed else layout_reason(config, layout, student)
        inputs = [c for c in rows.column_names if c in CACHE_INPUTS or c in ROUTING_COLUMNS]
        teacher, indexed = cached_teacher(config, rows.select_columns(inputs), make_teacher, PaddingCollator(0), args, student)
        described = f"teacher cache, {layout.kind} layout ({reason}), read per {'token' if self.packed else 'row'}; no teacher model held"
        if not self.packed:
            return teacher, rows.add_column(ROW_COLUMN, indexed[ROW_COLUMN]), collator, described
        tokens = [token_indices(row, len(ids)) for row, ids in zip(indexed[ROW_COLUMN], rows["input_ids"], strict=True)]
        return teacher, rows.add_column(TOKEN_COLUMN, tokens), TokenIndexCollator(collator), described
