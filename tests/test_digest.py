"""One digest for every cache (``mft_plugin.digest``): a key that changes a row changes every key
computed from those rows, without being named; a sweep measures each run against its own base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from mft_plugin.cli import main
from mft_plugin.config.errors import validate_config
from mft_plugin.digest import NOT_ROW_SHAPING, cache_key, data_key, rows_digest
from mft_plugin.train.outputs import METRICS_FILE
from mft_plugin.train.recipe import run
from tests.tiny import write_yaml

INSTRUCTIONS = [
    {"instruction": f"Name the court that heard appeal number {i}.", "input": "", "output": f"The court of appeal, division {i}."}
    for i in range(8)
]


def rows(**columns: list[list[int]]) -> Dataset:
    return Dataset.from_dict(columns)


def test_the_rows_digest_sees_every_column_order_and_selection() -> None:
    data = rows(input_ids=[[1, 2, 3], [4, 5]], labels=[[1, 2, 3], [4, 5]])
    digest = rows_digest(data)
    assert digest == rows_digest(rows(input_ids=[[1, 2, 3], [4, 5]], labels=[[1, 2, 3], [4, 5]]))
    assert digest == rows_digest(data.select([0, 1]))
    assert digest != rows_digest(data.select([1, 0]))  # order
    assert digest != rows_digest(rows(input_ids=[[1, 2], [3, 4, 5]], labels=[[1, 2], [3, 4, 5]]))  # row boundaries
    assert digest != rows_digest(rows(input_ids=[[1, 2, 3], [4, 5]], labels=[[-100, 2, 3], [4, 5]]))  # a masked label
    assert digest != rows_digest(data.add_column("position_ids", [[0, 1, 0], [0, 1]]))  # a packed layout


def test_every_key_but_the_declared_row_neutral_ones_shapes_the_tokenized_data_key(base_config: dict[str, Any]) -> None:
    """A key the schema gains later counts until it is declared unable to change a row."""
    config = validate_config(base_config)
    assert data_key(config) != data_key(validate_config({**base_config, "train_on_inputs": True}))
    assert data_key(config) != data_key(validate_config({**base_config, "tokens": ["<court>"]}))
    assert data_key(config) == data_key(validate_config({**base_config, "learning_rate": 1.0, "seed": 1}))
    sharded = {**base_config, "datasets": [{**base_config["datasets"][0], "shards": 2}]}  # the seed draws the shard's rows
    assert data_key(validate_config(sharded)) != data_key(validate_config({**sharded, "seed": 1}))
    assert {"train_on_inputs", "sample_packing", "eval_sample_packing", "special_tokens", "tokens"}.isdisjoint(NOT_ROW_SHAPING)


def test_every_key_that_changes_the_models_outputs_changes_a_cache_key(base_config: dict[str, Any]) -> None:
    """Base perplexities and the teacher cache are computed by the base as it is held: a key that changes
    its outputs on the same rows (its config, new embedding rows, 4-bit experts) gives a new key."""
    data = rows(input_ids=[[1, 2, 3]], labels=[[1, 2, 3]])

    def key(**keys: Any) -> str:
        return cache_key("base perplexities", validate_config({**base_config, **keys}), rows=[data])

    plain = key()
    assert plain == key(learning_rate=1.0)
    for changed in ({"model_config": {"rms_norm_eps": 1e-3}}, {"resize_token_embeddings_to_32x": True},
                    {"load_in_4bit": True, "adapter": "qlora", "quantize_moe_experts": True}):  # fmt: skip
        assert key(**changed) != plain, changed
    assert key(load_in_4bit=True, adapter="qlora") != key(load_in_4bit=True, adapter="qlora", quantize_moe_experts=True)


def sweep_base(base_config: dict[str, Any], folder: Path, instructions: bool) -> dict[str, Any]:
    """A one-step run validated on its own spec set; with ``instructions`` on Alpaca records, whose
    prompt is masked unless ``train_on_inputs``, else on the raw legal text (concatenated into blocks
    unless ``sample_packing``)."""
    config = {k: v for k, v in base_config.items() if k != "general_eval_datasets"}
    if instructions:
        data = folder / "instructions.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in INSTRUCTIONS))
        config["datasets"] = config["test_datasets"] = [{"path": str(data), "type": "alpaca"}]
    return {**config, "sequence_len": 128, "max_steps": 1, "eval_steps": 1}


@pytest.mark.parametrize(
    ("key", "instructions"),
    [("train_on_inputs", True), ("sample_packing", False)],
    ids=["train_on_inputs-on-instructions", "sample_packing-on-raw-text"],
)
def test_each_run_of_a_sweep_is_measured_against_its_own_base(
    key: str, instructions: bool, base_config: dict[str, Any], tmp_path: Path
) -> None:
    """The old key left both out: the second run of a sweep read the first run's base perplexity, so its S
    was measured against another base. (Packing instruction records changes no perplexity: each record
    attends to itself alone either way; packing raw text does, unpacked blocks span documents.)"""
    config = sweep_base(base_config, tmp_path, instructions)
    sweep = write_yaml(tmp_path / "sweep.yml", {**config, "output_dir": str(tmp_path / "sweep"), "sweep": {key: [True, False]}})
    assert main(["sweep", str(sweep)]) == 0
    swept = {value: json.loads((tmp_path / "sweep" / f"{key}={value}" / METRICS_FILE).read_text()) for value in (True, False)}
    alone = {value: run(validate_config({**config, key: value, "output_dir": str(tmp_path / f"alone-{value}")})) for value in (True, False)}
    for value in (True, False):
        assert swept[value]["base_spec_ppl"] == alone[value]["base_spec_ppl"], value
    assert alone[True]["base_spec_ppl"] != alone[False]["base_spec_ppl"]
