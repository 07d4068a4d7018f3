"""Datasets: load documents with ``datasets``, tokenize, and pack them into ``sequence_len`` blocks.

As in the paper (Section 3.1), documents are concatenated, each tokenized with the tokenizer's
own special tokens (e.g. a leading BOS) and followed by its end-of-sequence token, and cut into
fixed-length blocks; each map batch's remainder is kept as
one shorter block (padded by the collator) so that a corpus shorter than one block still trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase

from mft_plugin.config.errors import ConfigError
from mft_plugin.config.schema import DATA_SUFFIXES, DatasetConfig

PACK_BATCH_DOCUMENTS = 1000


def load_documents(spec: DatasetConfig) -> Dataset:
    """One ``datasets:`` entry as a Dataset with a single ``text`` column (one row per document)."""
    local = Path(spec.path).expanduser()
    if local.is_file():
        builder = spec.ds_type or DATA_SUFFIXES.get(local.suffix, "text")
        documents = load_dataset(builder, data_files=str(local), split=spec.split)
    else:  # a local folder or a hub dataset name
        documents = load_dataset(spec.path, name=spec.name, data_files=spec.data_files, split=spec.split)
    if spec.field not in documents.column_names:
        raise ValueError(
            f"datasets: {spec.path}: field {spec.field!r} not found; columns: {', '.join(documents.column_names)}"
        )
    documents = documents.select_columns([spec.field])
    return documents.rename_column(spec.field, "text") if spec.field != "text" else documents


def load_all_documents(specs: Sequence[DatasetConfig]) -> Dataset:
    return concatenate_datasets([load_documents(spec) for spec in specs])


def pack_documents(documents: Dataset, tokenizer: PreTrainedTokenizerBase, sequence_len: int) -> Dataset:
    """Tokenize, append EOS to every document, concatenate and cut into ``sequence_len`` blocks."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; packing needs one to separate documents")
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch["text"], verbose=False)["input_ids"]  # with the tokenizer's own BOS etc.
        stream = [token for ids in encoded if ids for token in (ids if ids[-1] == eos else [*ids, eos])]
        blocks = [stream[i : i + sequence_len] for i in range(0, len(stream), sequence_len)]
        return {"input_ids": [block for block in blocks if len(block) >= 2]}

    return documents.map(
        pack,
        batched=True,
        batch_size=PACK_BATCH_DOCUMENTS,
        remove_columns=documents.column_names,
        desc=f"Tokenizing and packing into {sequence_len}-token blocks",
    )


def split_documents(documents: Dataset, val_set_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out documents (Axolotl's ``val_set_size``: a fraction below 1, else a count)."""
    if val_set_size <= 0:
        return documents, None
    test_size = val_set_size if val_set_size < 1 else int(val_set_size)
    if (math.ceil(test_size * len(documents)) if test_size < 1 else test_size) >= len(documents):  # datasets' count
        raise ConfigError([
            f"val_set_size: {val_set_size:g} would hold out every one of the {len(documents)} training documents; "
            "use a smaller count or fraction, or give test_datasets"
        ])
    parts = documents.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
