"""Records: read every record of a ``datasets:`` entry, naming bad data by file and record.

Local files are read here rather than through ``datasets.load_dataset``, so that a bad record is
reported as ``file:line`` (JSON Lines, csv) or ``file: record N`` (json, parquet) with what is wrong,
never as a pyarrow traceback: a malformed JSON line, bytes that are not UTF-8, a ragged csv row, an
unreadable parquet file, an empty folder or a folder mixing file types each stop the run before any
model is loaded. Only hub names go through ``load_dataset`` (and fail with one message offline).
Turning records into tokens is the data format's job (``mft_plugin.strategy.DataFormat``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mft_plugin.config.schema import DATA_SUFFIXES, DEFAULT_SEED, DatasetSource

Record = tuple[str, dict[str, Any]]  # (where, record): "file:line" or "file: record N", and the record


class DataError(ValueError):
    """Bad data, named by its file and record; reported as a message, without a traceback."""


def read_records(spec: DatasetSource, seed: int = DEFAULT_SEED) -> Iterator[Record]:
    """Every record of one ``datasets:`` entry, each with where it comes from (with ``shards``, those of
    its shard, drawn with the run's ``seed``)."""
    records = _split_records(spec)
    if spec.shards is None:
        yield from records
    else:
        yield from _shard(list(records), spec, seed)


def _split_records(spec: DatasetSource) -> Iterator[Record]:
    local = Path(spec.path).expanduser()
    if not (local.is_file() or local.is_dir()):
        yield from _hub_records(spec)
        return
    records = (
        record for file in _local_files(local, spec)
        for record in _file_records(file, spec.ds_type or DATA_SUFFIXES.get(file.suffix, "text"))
    )  # fmt: skip
    if spec.split == "train":
        yield from records
    else:
        yield from _split_slice(list(records), spec)


def _shard(records: list[Record], spec: DatasetSource, seed: int) -> list[Record]:
    """The records Axolotl keeps with ``shards``: the split shuffled with the run's seed, then shard
    ``shards_idx`` of ``shards`` contiguous ones (``Dataset.shuffle(seed).shard(shards, shards_idx)``,
    run here on the record numbers, so the same YAML and seed keep the same records)."""
    from datasets import Dataset

    numbers = Dataset.from_dict({"number": list(range(len(records)))})
    kept = numbers.shuffle(seed=seed).shard(num_shards=spec.shards, index=spec.shards_idx)["number"]
    return [records[number] for number in kept]


def _split_slice(records: list[Record], spec: DatasetSource) -> list[Record]:
    """A slice of a local file's records, spelled as ``datasets`` spells one (``train[74:]``,
    ``train[:10%]``) and read with its own parser, so that the same YAML means the same rows."""
    from datasets import ReadInstruction

    try:
        (instruction,) = ReadInstruction.from_spec(spec.split).to_absolute({"train": len(records)})
    except (AssertionError, ValueError) as error:  # unknown split name, malformed slice, several slices
        detail = " ".join(str(error).split())
        raise DataError(
            f"{spec.path}: split {spec.split!r}: a local file or folder has the split 'train', sliced as in "
            f"datasets (e.g. train[74:] or train[:10%]) ({detail})"
        ) from None
    return records[instruction.from_ : instruction.to]


def _local_files(local: Path, spec: DatasetSource) -> list[Path]:
    """The file itself, or the data files of a folder (``data_files`` relative to it, if given)."""
    if local.is_file():
        return [local]
    if spec.data_files:
        names = [spec.data_files] if isinstance(spec.data_files, str) else spec.data_files
        return [local / name for name in names]
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{local}: no data files in this folder (looked for {', '.join(sorted(DATA_SUFFIXES))})")
    kinds = sorted({DATA_SUFFIXES[p.suffix] for p in files})
    if len(kinds) > 1 and spec.ds_type is None:
        raise DataError(
            f"{local}: the folder mixes file types ({', '.join(kinds)}); keep one type per folder, "
            "or list the files to read in data_files"
        )
    return files


def _file_records(file: Path, builder: str) -> Iterator[Record]:
    try:
        data = file.read_bytes()
    except OSError as error:
        raise DataError(f"{file}: cannot be read: {error.strerror or error}") from None
    if builder == "parquet":
        yield from _parquet_records(file)
        return
    text = _utf8(file, data)
    if builder == "json":
        yield from _json_records(file, text)
    elif builder == "csv":
        yield from _csv_records(file, text)
    else:  # text: one record per line, as datasets' text builder reads it
        for number, line in enumerate(text.splitlines(), start=1):
            yield f"{file}:{number}", {"text": line}


def _utf8(file: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); re-encode the file as UTF-8") from None


def _json_records(file: Path, text: str) -> Iterator[Record]:
    """A JSON array of objects (``file: record N``), else JSON Lines (``file:line``)."""
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{error.lineno}: not valid JSON: {error.msg}") from None
        for number, record in enumerate(records, start=1):
            yield _object(f"{file}: record {number}", record)
        return
    for number, line in enumerate(text.split("\n"), start=1):  # JSON Lines ends lines at \n alone: a
        if not line.strip():  # U+2028 or a form feed inside a string is text, not a line break
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{number}: not valid JSON: {error.msg} (column {error.colno})") from None
        yield _object(f"{file}:{number}", record)


def _object(where: str, record: Any) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object of fields, got {type(record).__name__}")
    return where, record


def _csv_records(file: Path, text: str) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted fields may hold line breaks
    header = next(reader, None)
    if not header:
        raise DataError(f"{file}: empty csv (no header row)")
    for row in reader:
        if len(row) != len(header):
            raise DataError(f"{file}:{reader.line_num}: {len(row)} fields, but the header has {len(header)} ({', '.join(header)})")
        yield f"{file}:{reader.line_num}", dict(zip(header, row))


def _parquet_records(file: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{file}: unreadable parquet file: {str(error).splitlines()[0]}") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{file}: record {number}", record


@contextlib.contextmanager
def no_split_generation_bars() -> Iterator[None]:
    """datasets draws a "Generating train split" bar for every data file it reads: one line per file
    saying nothing the tokenizing bar does not. Hidden while loading (errors still raise, warnings
    still log); left alone when the user has turned datasets' bars off (or on, by its env variable)."""
    import datasets
    from datasets.utils import are_progress_bars_disabled

    if are_progress_bars_disabled() or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _hub_records(spec: DatasetSource) -> Iterator[Record]:
    from datasets import load_dataset

    try:
        with no_split_generation_bars():
            dataset = load_dataset(spec.path, name=spec.name, data_files=spec.data_files, split=spec.split, revision=spec.revision)
    except Exception as error:  # offline, unknown name, ...: one message, not the hub client's traceback
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(f"{spec.path}: not a local file or folder, and loading it as a hub dataset failed: {reason}") from None
    for number, record in enumerate(dataset, start=1):
        yield f"{spec.path}: record {number}", record
