"""Replay: exact per-micro-batch proportions through the Trainer's real dataloader, and its loss."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils.data import DataLoader

from mft_plugin import get_objective
from mft_plugin.data.batches import MicroBatchSampler, FT_LOSS_COLUMN, REPLAY_COLUMN
from mft_plugin.loss.plain import plain_token_losses
from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.train.context import RecipeContext
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.models.loading import load_model, load_tokenizer
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.train.recipe import build_datasets, build_strategies, training_arguments
from mft_plugin.registry import default_registry
from mft_plugin.strategies.mitigations.replay import composed_order
from mft_plugin.train.trainer import MFTTrainer


def replay_config(base_config: dict[str, Any], corpora: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    replay = {"name": "replay", "ratio": 0.5, "datasets": [{"path": str(corpora["general_train"])}]}
    replay.update(overrides.pop("replay", {}))
    return {**base_config, "sequence_len": 32, "mitigations": [replay], **overrides}


def composed_dataset(config_dict: dict[str, Any], tmp_path: Path) -> tuple[Any, Dataset, RecipeContext, Any]:
    """The config, the training set replay prepared (specialized rows, then every general row), the
    context and the replay mitigation itself (its ``epoch_order`` composes the epochs)."""
    config = validate_config(config_dict)
    context = RecipeContext(config=config, tokenizer=load_tokenizer(config), output_dir=tmp_path)
    train_blocks, _ = build_datasets(config, context)
    (replay,) = build_strategies(config, default_registry())[1]
    return config, replay.prepare_data(train_blocks, context), context, replay


def epoch_column(mixed: Dataset, replay: Any, column: str, epoch: int = 0) -> list[Any]:
    """``column`` of the rows in the order of one epoch."""
    return [mixed[i][column] for i in replay.epoch_order(epoch)]


def replay_counts(flags: list[int], micro_batch_size: int) -> list[int]:
    return [sum(flags[i : i + micro_batch_size]) for i in range(0, len(flags), micro_batch_size)]


# --- the layout -------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_new", "num_general", "k", "mbs"), [(10, 50, 2, 4), (9, 3, 3, 4), (7, 100, 1, 8), (5, 5, 4, 4)])
def test_composed_order_has_k_new_rows_in_every_micro_batch(num_new: int, num_general: int, k: int, mbs: int) -> None:
    order = composed_order(num_new, num_general, k, mbs, seed=0)
    assert len(order) % mbs == 0
    batches = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    assert all(sum(row < num_new for row in batch) == k for batch in batches)
    assert set(range(num_new)) <= set(order)  # every specialized row once per epoch (a few topped up)
    assert all(num_new <= row < num_new + num_general for row in order if row >= num_new)
    assert composed_order(num_new, num_general, k, mbs, seed=0) == order
    assert composed_order(num_new, num_general, k, mbs, seed=1) != order


@pytest.mark.parametrize(("ratio", "mbs"), [(0.3, 4), (0.5, 1), (0.1, 4)])
def test_ratio_must_give_a_whole_number_of_new_rows(
    base_config: dict[str, Any], corpora: dict[str, Path], ratio: float, mbs: int
) -> None:
    config = replay_config(base_config, corpora, micro_batch_size=mbs, replay={"ratio": ratio})
    with pytest.raises(ConfigError, match=rf"mitigations\.replay\.ratio: {ratio} x micro_batch_size {mbs}"):
        validate_config(config)


def test_prepared_data_has_the_exact_proportion_and_every_new_block(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    config_dict = replay_config(base_config, corpora, replay={"ratio": 0.75})  # 3 new + 1 general of 4
    config, mixed, context, replay = composed_dataset(config_dict, tmp_path)
    train_blocks, _ = build_datasets(config, context)
    for epoch in range(2):
        assert set(replay_counts(epoch_column(mixed, replay, REPLAY_COLUMN, epoch), 4)) == {1}
        new_rows = [row for row, flag in zip(epoch_column(mixed, replay, "input_ids", epoch),
                                             epoch_column(mixed, replay, REPLAY_COLUMN, epoch), strict=True) if not flag]
        assert {tuple(row) for row in new_rows} == {tuple(row) for row in train_blocks["input_ids"]}
    assert mixed[FT_LOSS_COLUMN] == mixed[REPLAY_COLUMN]  # replay_loss: ft (the default)
    assert composed_dataset(config_dict, tmp_path)[1]["input_ids"] == mixed["input_ids"]  # deterministic


def test_each_epoch_replays_general_rows_the_previous_ones_did_not(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    _, mixed, _, replay = composed_dataset(replay_config(base_config, corpora, replay={"ratio": 0.75}), tmp_path)
    num_new, num_general = mixed[REPLAY_COLUMN].count(0), mixed[REPLAY_COLUMN].count(1)
    general = [{i for i in replay.epoch_order(epoch) if i >= num_new} for epoch in range(2)]
    assert len(general[0]) + len(general[1]) <= num_general  # the general data holds two epochs' worth
    assert general[0].isdisjoint(general[1])
    assert sorted(replay.epoch_order(0)) != sorted(replay.epoch_order(1))


def test_composed_order_continues_the_general_stream_across_epochs() -> None:
    epochs = [composed_order(4, 100, 2, 4, seed=0, epoch=e) for e in range(3)]
    general = [[i - 4 for i in order if i >= 4] for order in epochs]
    assert len(set(general[0] + general[1] + general[2])) == 12  # 3 epochs x 2 batches x 2 rows, none repeated
    assert [sorted(i for i in order if i < 4) for order in epochs] == [[0, 1, 2, 3]] * 3


def test_replay_loss_objective_flags_no_row_for_the_ft_loss(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    _, mixed, _, replay = composed_dataset(replay_config(base_config, corpora, replay={"replay_loss": "objective"}), tmp_path)
    flags = epoch_column(mixed, replay, REPLAY_COLUMN)
    assert sum(flags) == len(flags) // 2 and sum(mixed[FT_LOSS_COLUMN]) == 0


def test_short_general_data_is_cycled_and_logged(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_general = tmp_path / "general.jsonl"
    tiny_general.write_text('{"text": "It is a truth universally acknowledged."}\n')
    config_dict = replay_config(base_config, corpora, replay={"datasets": [{"path": str(tiny_general)}]})
    with caplog.at_level(logging.WARNING):
        _, mixed, _, replay = composed_dataset(config_dict, tmp_path)
    assert "cycling them" in caplog.text
    assert set(replay_counts(epoch_column(mixed, replay, REPLAY_COLUMN), 4)) == {2}


# --- through the Trainer ----------------------------------------------------------------------


def replay_trainer(config_dict: dict[str, Any], tmp_path: Path) -> MFTTrainer:
    config, mixed, context, replay = composed_dataset(config_dict, tmp_path)
    objective, _ = build_strategies(config, default_registry())
    return MFTTrainer(
        model=load_model(config),
        args=training_arguments(config, len(replay.epoch_order(0)), evaluate=False),
        train_dataset=mixed,
        data_collator=PaddingCollator(context.tokenizer.pad_token_id),
        objective=objective,
        teacher=None,
        mitigations=[replay],
    )


def test_trainer_dataloader_keeps_the_proportion_in_every_batch_and_epoch(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    trainer = replay_trainer(replay_config(base_config, corpora, gradient_accumulation_steps=2), tmp_path)
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [int(b[REPLAY_COLUMN].sum()) for b in batches] == [2] * len(batches)
        new, general = ([row[:8].tolist() for b in batches for row, flag in zip(b["input_ids"], b[REPLAY_COLUMN]) if flag == f]
                        for f in (0, 1))
        orders.append((sorted(map(str, new)), general))
    assert orders[0][0] == orders[1][0]  # every specialized row once in each epoch
    assert orders[0][1] != orders[1][1]  # general rows drawn afresh


def test_each_of_two_ranks_gets_the_proportion(base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path) -> None:
    """What ``accelerator.prepare`` does to the Trainer's sampler under 2 processes (rank r: batches r, r + 2, ...)."""
    trainer = replay_trainer(replay_config(base_config, corpora, replay={"ratio": 0.25}), tmp_path)  # 1 new + 3 general
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, MicroBatchSampler)
    seen = []
    for rank in range(2):
        loader = DataLoader(trainer.train_dataset, batch_size=4, sampler=sampler, collate_fn=trainer.data_collator)
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        flags = [batch[REPLAY_COLUMN].tolist() for batch in shard]
        assert all(sum(f) == 3 for f in flags) and len(flags) >= len(sampler) // 8
        seen += [batch["input_ids"].tolist() for batch in shard]
    assert len({str(batch) for batch in seen}) == len(sampler) // 4  # between them, every batch


def test_replay_rows_train_on_plain_nll_and_the_teacher_sees_only_new_rows() -> None:
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    input_ids = torch.randint(0, 11, (4, 6))
    labels = shift_for_causal_lm(input_ids)
    ft_rows = torch.tensor([0, 1, 0, 1])
    seen: list[torch.Tensor] = []

    class Teacher:
        def logits(self, batch: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(batch["input_ids"][rows])
            return teacher_logits[ft_rows == 0]

    mft = get_objective("mft", tau=0.25)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), FT_LOSS_COLUMN: ft_rows}
    losses = plain_token_losses(mft, Teacher(), student, batch, labels)
    assert torch.equal(seen[0], input_ids[[0, 2]])
    expected_new = mft.token_losses(student[[0, 2]], teacher_logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(losses[[0, 2]], expected_new)
    torch.testing.assert_close(losses[[1, 3]], nll_token_losses(student[[1, 3]], labels[[1, 3]]))


def test_a_replay_run_trains(corpora: dict[str, Path], two_step_config: dict[str, Any]) -> None:
    from mft_plugin import run

    config = validate_config(replay_config(two_step_config, corpora))
    metrics = run(config)
    assert metrics["train_loss"] > 0 and Path(config.output_dir, "model.safetensors").exists()


def test_the_teacher_cache_holds_only_the_rows_whose_loss_reads_the_teacher(
    corpora: dict[str, Path], two_step_config: dict[str, Any], tmp_path: Path
) -> None:
    """Replay rows train on plain NLL (w = 1): the cache is built over the specialized rows alone (it was
    built over every general block) and the run trains exactly as with the online teacher."""
    import json

    from mft_plugin import run
    from mft_plugin.teacher.cache import META_FILE, teacher_cache_key

    config = replay_config({**two_step_config, "logging_steps": 1}, corpora)
    caches = tmp_path / "caches"
    online = run(validate_config({**config, "output_dir": str(tmp_path / "online")}))
    cached = run(validate_config({**config, "output_dir": str(tmp_path / "cached"), "teacher_cache": {"path": str(caches)}}))
    (folder,) = caches.iterdir()
    specialized, _ = build_datasets(validate_config(config), RecipeContext(validate_config(config), load_tokenizer(validate_config(config)), tmp_path))
    assert json.loads((folder / META_FILE).read_text())["blocks"] == len(specialized)
    plain = validate_config({key: value for key, value in config.items() if key != "mitigations"} | {"teacher_cache": {}})
    assert folder.name == teacher_cache_key(plain, specialized)  # shared with a run without replay

    def losses(name: str) -> list[float]:
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert len(losses("online")) == 2
    assert losses("cached") == pytest.approx(losses("online"), rel=1e-5)
    assert cached["train_loss"] == pytest.approx(online["train_loss"], rel=1e-5)
