"""``pretokenized``: records that are already token ids (Axolotl's ``type:`` left empty).

Axolotl uses a dataset whose records hold ``input_ids``, ``attention_mask`` and ``labels`` as they are,
whatever its ``type``; its examples write ``type:`` with no value for it ("leave empty to load
pre-tokenized"). Here ``type:`` empty (or ``type: pretokenized``) selects this format:

    {"input_ids": [1, 415, 2], "attention_mask": [1, 1, 1], "labels": [-100, 415, 2]}

The ids and labels are used unchanged (``labels`` omitted: every token is one; ``train_on_inputs`` has
nothing to unmask, the labels say what trains). Each record stays one row, as in Axolotl. Padding
inside a record (an ``attention_mask`` with zeros) is an error: rows are padded by the collator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PretokenizedParams(StrategyParams):
    pass


def _ids(record: Mapping[str, Any], column: str, low: int) -> list[int]:
    """``record[column]`` as a list of ints of at least ``low``, or a :class:`RecordError` saying what it is."""
    values = record.get(column)
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise RecordError(f"{column!r} must be a list of integers >= {low}, got {str(values)[:60]}")
    return values


class PretokenizedFormat(DataFormat):
    name = "pretokenized"
    Params = PretokenizedParams
    fixed_columns = ("input_ids",)

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import IGNORE_INDEX  # torch, which the schema does not import

        ids = _ids(record, "input_ids", 0)
        if any(i >= len(tokenizer) for i in ids):
            raise RecordError(f"'input_ids' holds {max(ids)}, past the tokenizer's {len(tokenizer)} tokens")
        labels = _ids(record, "labels", IGNORE_INDEX) if "labels" in record else list(ids)
        mask = _ids(record, "attention_mask", 0) if "attention_mask" in record else [1] * len(ids)
        if not len(ids) == len(labels) == len(mask):
            raise RecordError(f"'input_ids', 'labels' and 'attention_mask' have {len(ids)}, {len(labels)} and {len(mask)} entries")
        if any(value != 1 for value in mask):
            raise RecordError("'attention_mask' has zeros: padding inside a record; give the record unpadded (the collator pads rows)")
        if any(label not in (IGNORE_INDEX, token) for label, token in zip(labels, ids)):
            raise RecordError("'labels' must be each position's input id or -100 (the shift to the next token is the loss's)")
        return {"input_ids": ids, "labels": labels}
