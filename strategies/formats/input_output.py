"""``input_output``: a record is a list of text ``segments``, each with a ``label`` flag saying
whether it is trained on (Axolotl's template-free format).

    {"segments": [{"label": false, "text": "<s>Q: ..."}, {"label": true, "text": " A: ...</s>"}]}

Segments are tokenized one by one without special tokens (write BOS/EOS into the text, as in
Axolotl); ``train_on_inputs: true`` labels every segment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class InputOutputParams(StrategyParams):
    pass


def record_segments(record: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``(text, label)`` of each segment, or a :class:`RecordError` naming what is wrong."""
    segments = record.get("segments")
    if not isinstance(segments, list) or not segments:
        raise RecordError(f"'segments' must be a non-empty list of {{label, text}}, got {segments!r:.60}")
    for i, segment in enumerate(segments):
        if not (isinstance(segment, dict) and isinstance(segment.get("text"), str) and isinstance(segment.get("label"), bool)):
            raise RecordError(f"segments[{i}] must be {{label: true|false, text: string}}, got {segment!r:.60}")
    return [(segment["text"], segment["label"]) for segment in segments]


class InputOutputFormat(DataFormat):
    name = "input_output"
    Params = InputOutputParams
    fixed_columns = ("segments",)

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import tokenize_segments

        return tokenize_segments(tokenizer, record_segments(record), train_on_inputs)
