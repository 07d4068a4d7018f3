"""Labels as the data stage hands them on: ``IGNORE_INDEX`` where a token is not trained on.

The Hugging Face convention: ``labels`` are the input ids, unshifted, with ``-100`` at padding (and,
for prompt/response data, at the prompt). Every later stage (teacher, loss, evaluation) reads them
through these helpers, so that "which tokens count" is decided once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: the positions that carry a label (not ``IGNORE_INDEX``)."""
    return labels != IGNORE_INDEX


def safe_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels with ignored positions replaced by 0, so that they can index a gather."""
    return labels.masked_fill(~valid_mask(labels), 0)


def shift_for_causal_lm(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits position by position: position t predicts token t + 1.

    ``[batch, seq]`` -> ``[batch, seq]``, the last position ignored.
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def tokenize_segments(
    tokenizer: PreTrainedTokenizerBase, segments: Sequence[tuple[str, bool]], train_on_inputs: bool
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of text segments, each tokenized on its own (no special tokens
    added; a segment includes them as text) and labelled if its flag or ``train_on_inputs`` says so.

    Axolotl's prompt strategies build a record this way (``input_output``; ``alpaca``'s prompt and
    response), so token boundaries fall where the segments meet.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        input_ids += ids
        labels += ids if trained or train_on_inputs else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}
