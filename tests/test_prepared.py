"""``dataset_prepared_path``: the tokenized datasets are read back while their key matches, rebuilt
when anything that shapes them changes, and a damaged copy is rebuilt, never used."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from mft_plugin.config.errors import validate_config
from mft_plugin.models.loading import load_tokenizer
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.recipe import build_datasets


def built(config_dict: dict[str, Any], tmp_path: Path) -> dict[str, list[list[int]]]:
    config = validate_config(config_dict)
    train, eval_sets = build_datasets(config, RecipeContext(config, load_tokenizer(config), tmp_path))
    return {"train": train["input_ids"], **{name: data["input_ids"] for name, data in eval_sets.items()}}


def test_tokenized_data_is_cached_and_keyed(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "prepared"
    config = {**base_config, "dataset_prepared_path": str(cache)}
    first = built(config, tmp_path)
    (key,) = cache.iterdir()
    assert set(first) == {"train", "spec", "general"}

    def no_tokenizing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tokenized again despite a matching cache")

    with monkeypatch.context() as patch:
        patch.setattr("mft_plugin.train.context.records_of", no_tokenizing)
        assert built(config, tmp_path) == first  # read back
    assert built({**config, "sequence_len": 32}, tmp_path) != first  # another key ...
    assert len(list(cache.iterdir())) == 2  # ... beside the first

    for arrow in (key / "train").glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        assert built(config, tmp_path) == first  # rebuilt from the data, not read from the damaged copy
    assert f"dataset_prepared_path: {key} cannot be read" in caplog.text


def test_changed_data_gets_a_new_key(base_config: dict[str, Any], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "The court held that the licence applies."}\n')
    config = {**base_config, "datasets": [{"path": str(corpus)}], "dataset_prepared_path": str(tmp_path / "prepared")}
    before = built(config, tmp_path)["train"]
    corpus.write_text('{"text": "Appeal dismissed with costs."}\n')
    assert built(config, tmp_path)["train"] != before
