"""``completion``: raw text, the paper's setting (Sec. 3.1): every token is a label.

Each document is tokenized with the tokenizer's own special tokens (e.g. a leading BOS) and ends
with the end-of-sequence token; the data stage concatenates the documents into one stream cut into
``sequence_len`` blocks, or, with ``sample_packing``, cuts each longer document into
``sequence_len`` pieces (as Axolotl's ``completion`` does) and packs them without cross-attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class CompletionParams(StrategyParams):
    field: str = Field("text", description="column holding the document text")


def record_text(record: Mapping[str, Any], field: str) -> str:
    """The string in ``record[field]``, or a :class:`RecordError` saying what was found instead."""
    value = record.get(field)
    if value is None:
        raise RecordError(f"field {field!r} is {'null' if field in record else 'missing'}")
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be a string, got {type(value).__name__} {str(value)[:60]!r}")
    return value


class CompletionFormat(DataFormat):
    name = "completion"
    Params = CompletionParams
    concatenates = True
    column_keys = ("field",)

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        text = record_text(record, self.params.field)
        if not text.strip():  # an empty document adds nothing (a corpus of them is an error of the data stage)
            return {"input_ids": [], "labels": []}
        ids = tokenizer(text, verbose=False)["input_ids"]
        ids = ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
