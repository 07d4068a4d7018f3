"""Bad data, as ``mft-run`` reports it: one message naming the file and the record (the line for
JSON Lines and csv), exit code 2, no traceback, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mft_plugin.cli import main
from tests.tiny import write_yaml


def jsonl(*records: Any) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def write_parquet(path: Path, column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: ["Some text."]}), path)


CASES: dict[str, tuple[dict[str, bytes], str, str]] = {  # name: (files, path, message after "bad data: ")
    "malformed-jsonl": ({"d.jsonl": b'{"text": "ok"}\n{"text": "cut\n'}, "d.jsonl",
                        "{d}/d.jsonl:2: not valid JSON: Unterminated string starting at (column 10)"),
    "not-utf8": ({"d.jsonl": b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n'}, "d.jsonl",
                 "{d}/d.jsonl:3: not UTF-8 text (byte 0xe9); re-encode the file as UTF-8"),
    "text-missing": ({"d.jsonl": jsonl({"text": "ok"}, {"body": "x"})}, "d.jsonl",
                     "{d}/d.jsonl:2: field 'text' is missing (datasets type: completion)"),
    "text-null": ({"d.jsonl": jsonl({"text": "ok"}, {"text": None})}, "d.jsonl",
                  "{d}/d.jsonl:2: field 'text' is null (datasets type: completion)"),
    "text-number": ({"d.jsonl": jsonl({"text": "ok"}, {"text": 42})}, "d.jsonl",
                    "{d}/d.jsonl:2: field 'text' must be a string, got int '42' (datasets type: completion)"),
    "text-list": ({"d.jsonl": jsonl({"text": "ok"}, {"text": ["a", "b"]})}, "d.jsonl",
                  "{d}/d.jsonl:2: field 'text' must be a string, got list \"['a', 'b']\" (datasets type: completion)"),
    "not-an-object": ({"d.json": b'[{"text": "ok"}, ["text"]]'}, "d.json",
                      "{d}/d.json: record 2: a record must be a JSON object of fields, got list"),
    "csv-without-field": ({"d.csv": b"body\nSome text.\n"}, "d.csv",
                          "{d}/d.csv:2: field 'text' is missing (datasets type: completion)"),
    "ragged-csv": ({"d.csv": b"text,id\nok,1\nnot ok,2,3\n"}, "d.csv",
                   "{d}/d.csv:3: 3 fields, but the header has 2 (text, id)"),
    "unreadable-parquet": ({"d.parquet": b"PAR1 this is not parquet"}, "d.parquet", "{d}/d.parquet: unreadable parquet file: "),
    "parquet-without-field": ({}, "body.parquet", "{d}/body.parquet: record 1: field 'text' is missing (datasets type: completion)"),
    "empty-folder": ({"folder/.keep": b""}, "folder",
                     "{d}/folder: no data files in this folder (looked for .csv, .json, .jsonl, .parquet, .txt)"),
    "mixed-folder": ({"folder/a.jsonl": jsonl({"text": "ok"}), "folder/b.csv": b"text\nok\n"}, "folder",
                     "{d}/folder: the folder mixes file types (csv, json); keep one type per folder, "
                     "or list the files to read in data_files"),
    "only-empty-strings": ({"d.jsonl": jsonl({"text": ""}, {"text": "  "})}, "d.jsonl",
                           "{d}/d.jsonl: none of its 2 records has a token to train on (empty texts?)"),
    "hub-offline": ({}, "no-such-org/no-such-dataset",
                    "no-such-org/no-such-dataset: not a local file or folder, and loading it as a hub dataset failed: "),
    "chat-without-messages": ({"c.jsonl": jsonl({"messages": [{"role": "user", "content": "Hi"}]}, {"turns": []})},
                              "c.jsonl", "{d}/c.jsonl:2: field 'messages' (field_messages) is missing "
                              "(datasets type: chat_template)"),
    "chat-unknown-role": ({"c.jsonl": jsonl({"messages": [{"role": "wizard", "content": "Hi"}]})}, "c.jsonl",
                          "{d}/c.jsonl:1: messages[0]: unknown role 'wizard'"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_message_naming_file_and_record(
    case: str, base_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files, path, expected = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(content)
    if case == "parquet-without-field":
        write_parquet(data / "body.parquet", "body")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    local = "/" not in path or case.startswith(("empty", "mixed"))
    entry = {"path": str(data / path) if local else path, "type": "chat_template" if case.startswith("chat") else "completion"}
    config = {key: value for key, value in base_config.items() if key not in ("test_datasets", "eval_steps")}
    code = main([str(write_yaml(tmp_path / "config.yml", {**config, "datasets": [entry]}))])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err and captured.out == ""
    (line,) = [line for line in captured.err.split("\n") if line and "\r" not in line]  # progress bars aside
    assert line.startswith("bad data: " + expected.replace("{d}", str(data)))
    assert not (Path(base_config["output_dir"]) / "model.safetensors").exists()


def test_a_local_file_is_sliced_as_datasets_slices_a_split(tmp_path: Path) -> None:
    """``split: train[74:]`` on a local file: the rows datasets' split syntax names, else one error."""
    from mft_plugin.config.schema import DatasetSource
    from mft_plugin.data.documents import DataError, read_records

    texts = [f"document {i}" for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(*({"text": text} for text in texts)))
    for split, expected in [("train[7:]", texts[7:]), ("train[:20%]", texts[:2]), ("train[2:4]", texts[2:4]), ("train", texts)]:
        records = read_records(DatasetSource(path=str(path), split=split))
        assert [record["text"] for _, record in records] == expected
    for split in ("test", "train[1:2]+train[3:4]", "train["):
        with pytest.raises(DataError, match=r"d\.jsonl: split '.*': a local file or folder has the split 'train'"):
            list(read_records(DatasetSource(path=str(path), split=split)))


def test_shards_keep_the_records_axolotl_keeps(tmp_path: Path) -> None:
    """``shards``/``shards_idx``: Axolotl's ``dataset.shuffle(seed=cfg.seed).shard(shards, shards_idx)``, run
    here on datasets' own Dataset of the records; every shard of one seed together is the whole file, once."""
    from datasets import Dataset

    from mft_plugin.config.schema import DatasetSource
    from mft_plugin.data.documents import read_records

    texts = [f"document {i}" for i in range(23)]
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(*({"text": text} for text in texts)))
    shards = []
    for index in range(3):
        spec = DatasetSource(path=str(path), shards=3, shards_idx=index)
        axolotls = Dataset.from_list([{"text": text} for text in texts]).shuffle(seed=7).shard(num_shards=3, index=index)["text"]
        shards.append([record["text"] for _, record in read_records(spec, seed=7)])
        assert shards[-1] == axolotls
    assert sorted(text for shard in shards for text in shard) == sorted(texts)
    other_seed = [record["text"] for _, record in read_records(DatasetSource(path=str(path), shards=3), seed=8)]
    assert len(other_seed) == len(shards[0]) and other_seed != shards[0]


def test_a_hub_dataset_is_loaded_at_its_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from mft_plugin.config.schema import DatasetSource
    from mft_plugin.data.documents import read_records

    asked: dict[str, object] = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: asked.update(kwargs, path=path) or [{"text": "a"}])
    assert [record for _, record in read_records(DatasetSource(path="org/corpus", revision="v2", split="train[:10]"))] == [{"text": "a"}]
    assert asked == {"path": "org/corpus", "name": None, "data_files": None, "split": "train[:10]", "revision": "v2"}


def test_line_separators_inside_a_jsonl_string_are_text(tmp_path: Path) -> None:
    """JSON Lines ends a record at \\n alone: U+2028, U+2029 or NEL written raw in a string stay in its record."""
    from mft_plugin.config.schema import DatasetSource
    from mft_plugin.data.documents import read_records

    texts = ["Section 1.\u2028Section 2.", "a\u2029b\x85c", "plain"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    assert [record["text"] for _, record in read_records(DatasetSource(path=str(path)))] == texts
