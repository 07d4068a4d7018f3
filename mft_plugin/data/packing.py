"""Token rows: each record through its data format, then laid out in rows of at most ``sequence_len``.

Raw text (a format that ``concatenates``, e.g. ``completion``) is the paper's setting (Sec. 3.1):
documents are concatenated and cut into ``sequence_len`` blocks, each group of
``PACK_BATCH_DOCUMENTS`` documents' remainder kept as one shorter block, so that a corpus shorter than
one block still trains. Every other record is one row: a record longer than ``sequence_len`` is
dropped, as Axolotl drops it, and so is a record with no label; both are counted in the log.

With ``sample_packing`` records share rows without seeing each other: each row lists its records
back to back with ``position_ids`` restarting at 0 per record, which transformers turns into a
block-diagonal causal mask (``mft_plugin.data.batches.model_inputs``), and the first label of every
record is ``-100``, so that no record predicts the next one's first token. A packed row's per-token
losses are then those of its records run one by one. Raw text longer than ``sequence_len`` is cut
into ``sequence_len`` pieces first (Axolotl's ``completion``). Rows are filled greedily, in order.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from mft_plugin.config.errors import ConfigError
from mft_plugin.config.schema import DEFAULT_SEED, DatasetSource
from mft_plugin.data.batches import LABELS, POSITIONS
from mft_plugin.data.documents import DataError, read_records
from mft_plugin.data.labels import IGNORE_INDEX
from mft_plugin.registry import Registry, default_registry
from mft_plugin.strategy import DataFormat, RecordError

logger = logging.getLogger(__name__)

ATTENTION_MASK = "attention_mask"

PACK_BATCH_DOCUMENTS = 1000
Row = dict[str, list[int]]


def tokenized_records(
    spec: DatasetSource, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool, seed: int = DEFAULT_SEED
) -> list[Row]:
    """``input_ids``/``labels`` of every record of one entry; bad records are errors naming file and record."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; records need one to end")
    rows = []
    for where, record in tqdm(read_records(spec, seed), desc=f"Tokenizing {spec.path} ({data_format.name})", unit=" records"):
        try:
            row = data_format.tokenize(record, tokenizer, train_on_inputs)
        except RecordError as error:
            raise DataError(f"{where}: {error} (datasets type: {data_format.name})") from None
        if len(row["input_ids"]) != len(row[LABELS]):
            raise DataError(f"{where}: data format {data_format.name!r} gave {len(row['input_ids'])} tokens but {len(row[LABELS])} labels")
        rows.append(row)
    if not any(_has_label(row) for row in rows):
        raise DataError(f"{spec.path}: none of its {len(rows)} records has a token to train on (empty texts?)")
    return rows


def _has_label(row: Row) -> bool:
    return any(label != IGNORE_INDEX for label in row[LABELS][1:])  # the first token is never predicted


def stream_blocks(rows: Sequence[Row], sequence_len: int) -> list[Row]:
    """Raw text without packing: the records concatenated and cut into ``sequence_len`` blocks."""
    blocks = []
    for start in range(0, len(rows), PACK_BATCH_DOCUMENTS):
        group = rows[start : start + PACK_BATCH_DOCUMENTS]
        ids = [token for row in group for token in row["input_ids"]]
        labels = [label for row in group for label in row[LABELS]]
        blocks += [
            {"input_ids": ids[i : i + sequence_len], LABELS: labels[i : i + sequence_len]}
            for i in range(0, len(ids), sequence_len)
            if len(ids[i : i + sequence_len]) >= 2
        ]
    return blocks


def record_rows(rows: Sequence[Row], sequence_len: int, cut_long: bool, source: str) -> list[Row]:
    """One row per record: longer ones cut into pieces (``cut_long``) or dropped; unlabelled ones dropped."""
    if cut_long:
        rows = [
            {key: row[key][i : i + sequence_len] for key in ("input_ids", LABELS)}
            for row in rows
            for i in range(0, len(row["input_ids"]), sequence_len)
            if len(row["input_ids"][i : i + sequence_len]) >= 2
        ]
    kept = [row for row in rows if len(row["input_ids"]) <= sequence_len and _has_label(row)]
    too_long = sum(len(row["input_ids"]) > sequence_len for row in rows)
    if too_long or len(kept) + too_long < len(rows):
        logger.warning(
            "%s: dropped %d of %d records longer than sequence_len %d and %d with no label",
            source, too_long, len(rows), sequence_len, len(rows) - len(kept) - too_long,
        )  # fmt: skip
    return kept


def pack_rows(rows: Sequence[Row], sequence_len: int) -> list[Row]:
    """Records (each at most ``sequence_len``) packed greedily into rows with restarting position ids."""
    packed: list[Row] = []
    for row in rows:
        n = len(row["input_ids"])
        if not packed or len(packed[-1]["input_ids"]) + n > sequence_len:
            packed.append({"input_ids": [], LABELS: [], POSITIONS: []})
        target = packed[-1]
        target["input_ids"] += row["input_ids"]
        target[LABELS] += [IGNORE_INDEX, *row[LABELS][1:]]
        target[POSITIONS] += list(range(n))
    return packed


Records = list[tuple[Row, bool]]  # each record's tokens, and whether its format concatenates (raw text)


def records_of(
    specs: Sequence[DatasetSource],
    format_of: Callable[[DatasetSource], DataFormat],
    tokenizer: PreTrainedTokenizerBase,
    train_on_inputs: bool = False,
    seed: int = DEFAULT_SEED,
) -> Records:
    """The tokenized records of some ``datasets:`` entries, in order, each with its format's kind (``seed``:
    the run's, which draws an entry's ``shards``)."""
    records: Records = []
    for spec in specs:
        data_format = format_of(spec)
        records += [(row, data_format.concatenates) for row in tokenized_records(spec, data_format, tokenizer, train_on_inputs, seed)]
    return records


def without_exact_duplicates(records: Records, source: str = "datasets") -> Records:
    """``records`` without the repeats of an earlier record's tokens and labels, the first kept (Axolotl's
    ``dataset_exact_deduplication``, which hashes each tokenized row); the count dropped is logged."""
    seen: set[bytes] = set()
    kept: Records = []
    for row, concatenates in records:
        digest = hashlib.sha256(repr((row["input_ids"], row["labels"], concatenates)).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append((row, concatenates))
    if len(kept) < len(records):
        logger.info("dataset_exact_deduplication: %d of the %d records of %s were repeats; dropped", len(records) - len(kept), len(records), source)
    return kept


def split_records(records: Records, val_set_size: float, seed: int) -> tuple[Records, Records | None]:
    """Hold out records (Axolotl's ``val_set_size``: a fraction below 1, else a count), with the
    seeded permutation of ``datasets``' ``train_test_split``."""
    if val_set_size <= 0:
        return records, None
    test_size = val_set_size if val_set_size < 1 else int(val_set_size)
    if (math.ceil(test_size * len(records)) if test_size < 1 else test_size) >= len(records):  # datasets' count
        raise ConfigError([
            f"val_set_size: {val_set_size:g} would hold out every one of the {len(records)} training documents; "
            "use a smaller count or fraction, or give test_datasets"
        ])
    parts = Dataset.from_dict({"i": list(range(len(records)))}).train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return [records[i] for i in parts["train"]["i"]], [records[i] for i in parts["test"]["i"]]


def lay_out(records: Records, sequence_len: int, sample_packing: bool = False, source: str = "datasets") -> Dataset:
    """The rows of the records as a Dataset: ``input_ids``, ``labels``, and ``position_ids`` when packed.
    ``source`` names the records in the log (e.g. ``test_datasets``)."""
    stream = [row for row, concatenates in records if concatenates]
    single = [row for row, concatenates in records if not concatenates]
    if sample_packing:
        rows = record_rows(stream, sequence_len, True, f"{source} (raw text)") + record_rows(single, sequence_len, False, source)
        return _as_dataset(pack_rows(rows, sequence_len), sequence_len)
    rows = stream_blocks(stream, sequence_len) + (record_rows(single, sequence_len, False, source) if single else [])
    return _as_dataset(rows, sequence_len)


def format_lookup(registry: Registry | None = None) -> Callable[[DatasetSource], DataFormat]:
    """Each entry's data format, as its ``type`` names it in ``registry`` (default: the installed plugins)."""
    return lambda spec: (registry or default_registry()).get("format", spec.type).cls(spec)  # type: ignore[return-value]


def raw_text_blocks(
    specs: Sequence[DatasetSource],
    tokenizer: PreTrainedTokenizerBase,
    sequence_len: int,
    registry: Registry | None = None,
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """Raw-text entries concatenated and cut into ``sequence_len`` blocks, every token a label."""
    return lay_out(records_of(specs, format_lookup(registry), tokenizer, seed=seed), sequence_len)


def _as_dataset(rows: list[Row], sequence_len: int) -> Dataset:
    if not rows:
        raise DataError(f"no record is left: each is longer than sequence_len {sequence_len} or has no label (see the log)")
    return Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]})


def concatenate_rows(first: Dataset, second: Dataset) -> Dataset:
    """``first`` then ``second``, e.g. specialized and replayed general rows: a column only one of them
    has is filled in for the other (``labels`` = the input ids, ``position_ids`` = 0, 1, ... per row,
    ``attention_mask`` = all ones, which Axolotl's tokenized rows carry)."""
    fills = {
        LABELS: lambda ids: ids,
        POSITIONS: lambda ids: list(range(len(ids))),
        ATTENTION_MASK: lambda ids: [1] * len(ids),
    }

    def filled(dataset: Dataset, columns: set[str]) -> Dataset:
        for column in sorted(columns - set(dataset.column_names)):
            if column in fills:
                dataset = dataset.add_column(column, [fills[column](ids) for ids in dataset["input_ids"]])
        return dataset

    columns = set(first.column_names) | set(second.column_names)
    first, second = filled(first, columns), filled(second, columns)
    return concatenate_datasets([first, second.cast(first.features)])  # e.g. Axolotl's int32 ids, int8 masks
