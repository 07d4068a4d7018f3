"""The Axolotl plugin: its Axolotl-free part everywhere, the plugin and ``axolotl train`` where Axolotl is.

Axolotl pins its own transformers/peft/accelerate/datasets, so it is not installed beside our
pinned stack; ``.ci/run`` runs this whole file again in a virtualenv of its own, with Axolotl,
where the ``needs_axolotl`` tests run too (README: "Axolotl plugin"). What proves MFT ran inside Axolotl: at the first step the student is the
teacher, so the MFT gradient is the FT gradient with each token's scaled by its label weight
w. A random teacher is wrong nearly everywhere and near-uniform, where w = alpha =
(d + tau) / (1 + d) with d = p^T_max - p^T_label small: w is tau or a little more. The tokens'
gradients partly cancel in the sum over a batch, so unequal weights move the norm of the sum a
little either way: the first gradient norm of ``mft`` is about tau times that of ``ft`` (seen:
0.208 to 0.25 for tau = 0.25; 1 would be plain finetuning), with the teacher a frozen copy (full
finetuning) and the shared base (Axolotl's ``adapter: lora``) alike.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from datasets import Dataset
from pydantic import ValidationError

from mft_plugin.axolotl.bridge import (
    NO_KV_CACHE,
    args_model,
    best_checkpoint_keys,
    evaluation_sets,
    plugin_args,
    run_context,
    selected_strategies,
    trainer_class,
    unsupported,
)
from mft_plugin.data.labels import IGNORE_INDEX
from mft_plugin.registry import default_registry
from mft_plugin.teacher.sources import FrozenCopyTeacher
from mft_plugin.train.engine import Engine
from mft_plugin.train.trainer import MFTTrainer
from tests.tiny import DATA, REPO, build_tiny_model, write_block_corpus, write_yaml

TAU = 0.25


def assert_scaled_by_tau(mft_grad_norm: float, ft_grad_norm: float) -> None:
    assert 0.5 * TAU < mft_grad_norm / ft_grad_norm < 1.5 * TAU
needs_axolotl = pytest.mark.skipif(importlib.util.find_spec("axolotl") is None, reason="Axolotl is not installed")


# --- without Axolotl: the keys, the checks, the trainer class ------------------------------------


def test_axolotl_schema_gains_exactly_our_strategy_and_evaluation_keys(corpora: dict[str, Path]) -> None:
    model = args_model(default_registry())
    keys = {"objective", "mitigations", "general_eval_datasets", "max_degeneralization", "target_specialization", "loss_impl", "teacher_cache"}
    assert set(model.model_fields) == keys
    defaults = model.model_validate({})
    assert (defaults.objective.name, defaults.objective.tau, defaults.mitigations) == ("mft", 0.25, [])
    assert (defaults.general_eval_datasets, defaults.max_degeneralization) == (None, None)
    general = model.model_validate({"general_eval_datasets": [{"path": str(corpora["general_val"])}]})
    assert general.general_eval_datasets[0].field == "text"  # our dataset entries, validated as mft-run's
    with pytest.raises(ValidationError, match="general_eval_datasets.0.path"):
        model.model_validate({"general_eval_datasets": [{"path": "no/such/file.jsonl"}]})
    with pytest.raises(ValidationError, match="max_degeneralization"):
        model.model_validate({"max_degeneralization": -0.1})
    with pytest.raises(ValidationError, match="tua"):
        model.model_validate({"objective": {"name": "mft", "tua": 0.5}})
    with pytest.raises(ValidationError, match="cannot be combined"):
        model.model_validate({"mitigations": ["lora", "dora"]})


def test_strategies_are_built_from_an_axolotl_config(corpora: dict[str, Path]) -> None:
    ewc = {"name": "ewc", "datasets": [{"path": str(corpora["general_val"])}]}
    objective, mitigations = selected_strategies({"objective": "ft", "mitigations": [ewc]}, default_registry())
    assert (objective.name, [m.name for m in mitigations]) == ("ft", ["ewc"])
    objective, mitigations = selected_strategies({"objective": None}, default_registry())  # Axolotl's unset key
    assert (objective.name, objective.params.tau, mitigations) == ("mft", TAU, [])


def test_what_axolotl_owns_is_refused_with_the_key_to_use_instead(corpora: dict[str, Path]) -> None:
    general = [{"path": str(corpora["general_val"])}]
    chosen = {"mitigations": ["lora", {"name": "replay", "datasets": general}, {"name": "ewc", "datasets": general}]}
    _, mitigations = selected_strategies(chosen, default_registry())
    problems = unsupported({"sample_packing": True, "micro_batch_size": 2, "rl": "dpo", "metric_for_best_model": "eval_loss"}, mitigations)
    assert len(problems) == 4  # sample_packing alone is not refused; with replay it is
    assert problems[0].startswith("rl/reward_model:")
    assert problems[1].startswith("metric_for_best_model: 'eval_loss'") and "'eval_spec_ppl'" in problems[1]
    assert problems[2].startswith("sample_packing: true with mitigations: ['replay']") and "by length" in problems[2]
    assert "'lora' acts at the prepare_model stage" in problems[3] and "adapter: lora" in problems[3]
    assert unsupported({"micro_batch_size": 2}, mitigations[1:]) == []  # replay without packing: composed
    assert unsupported({"micro_batch_size": 2, "remove_unused_columns": True}, mitigations[1:2])[0].startswith("remove_unused_columns: true")
    (shuffled,) = unsupported({"micro_batch_size": 2, "shuffle_merged_datasets": True}, mitigations[1:2])
    assert shuffled.startswith("shuffle_merged_datasets: true: ") and "draws the order of the rows itself" in shuffled
    assert unsupported({"micro_batch_size": 2, "shuffle_merged_datasets": True}, mitigations[2:]) == []  # no data stage
    assert unsupported({"sample_packing": True}, mitigations[2:]) == []  # ewc acts on the loss: fine
    assert "ewc works with DDP only" in unsupported({"fsdp_config": {"fsdp_version": 2}}, mitigations[2:])[0]
    budget = unsupported({"max_degeneralization": 0.1, "target_specialization": 0.5}, [])
    assert budget == [
        "max_degeneralization: needs a specialized validation set (test_datasets or val_set_size)",
        "target_specialization: needs a specialized validation set (test_datasets or val_set_size)",
        "max_degeneralization: needs general_eval_datasets: DG is measured on them",
    ]
    assert unsupported({"max_degeneralization": 0.1, "val_set_size": 0.1, "general_eval_datasets": general}, []) == []


def test_replay_composes_axolotls_tokenized_rows_as_mft_run_composes_its_own(tiny_model: Path, corpora: dict[str, Path]) -> None:
    """Axolotl's rows (int32 ids, int8 masks, labels) through replay's own prepare_data: the general blocks are
    appended with the columns Axolotl's collator pads, flagged for the FT loss, and an epoch draws 1 + 1 rows
    per micro-batch of 2."""
    from transformers import AutoTokenizer

    from mft_plugin.axolotl.bridge import composed_training_set, required_keys, scheduled_steps
    from mft_plugin.data.batches import FT_LOSS_COLUMN, REPLAY_COLUMN

    ids = [[1, 5, 6, 7], [1, 8, 9]]
    axolotl_rows = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": ids})
    axolotl_rows = axolotl_rows.cast_column("input_ids", datasets_list("int32")).cast_column("attention_mask", datasets_list("int8"))
    cfg = {"micro_batch_size": 2, "sequence_len": 32, "seed": 0, "mitigations": [{"name": "replay", "datasets": [{"path": str(corpora["general_val"])}]}]}
    _, mitigations = selected_strategies(cfg, default_registry())
    train, epoch_rows = composed_training_set(cfg, mitigations, axolotl_rows, AutoTokenizer.from_pretrained(tiny_model))
    assert {key: value for key, (value, _) in required_keys(cfg, mitigations).items()} == {"remove_unused_columns": False, "shuffle_merged_datasets": False}
    assert train.select(range(2))["input_ids"] == ids and train[REPLAY_COLUMN][:2] == [0, 0]
    general = train.select(range(2, len(train)))
    assert set(general[REPLAY_COLUMN]) == set(general[FT_LOSS_COLUMN]) == {1} and len(general) > 1
    assert all(row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * len(row["input_ids"]) for row in general)
    assert epoch_rows == 4  # 2 micro-batches: 1 specialized row + 1 general block each
    # Axolotl's count (its default warmup is 3% of it), at most max_steps as in its prepare_datasets
    assert scheduled_steps({"num_epochs": 2, "batch_size": 4, "max_steps": None}, 384) == 192
    assert scheduled_steps({"num_epochs": 2, "batch_size": 4, "max_steps": 3}, 384) == 3
    order = mitigations[0].epoch_order(0)
    assert sorted(order[0::2]) == [0, 1] and all(i >= 2 for i in order[1::2])


def datasets_list(dtype: str) -> Any:
    from datasets import List, Value

    return List(Value(dtype))


def test_best_checkpoint_is_chosen_by_specialized_perplexity_among_evaluated_checkpoints() -> None:
    assert best_checkpoint_keys({"val_set_size": 0}) == {}  # no specialized evaluation: nothing to choose by
    keys = best_checkpoint_keys({"test_datasets": [{"path": "x"}], "eval_steps": 20})
    assert keys == {
        "metric_for_best_model": "eval_spec_ppl", "greater_is_better": False, "load_best_model_at_end": True,
        "eval_steps": 20, "save_steps": 20,
    }  # fmt: skip
    assert best_checkpoint_keys({"val_set_size": 0.1, "save_steps": 10})["eval_steps"] == 10
    assert "eval_steps" not in best_checkpoint_keys({"val_set_size": 0.1})  # Axolotl's evals_per_epoch decides
    assert unsupported({"val_set_size": 0.1, "save_steps": 10, "eval_steps": 4}, []) == [
        "save_steps: 10 must be a multiple of eval_steps (4): the best checkpoint by specialized perplexity "
        "is chosen among evaluated checkpoints"
    ]
    assert unsupported({"val_set_size": 0.1, "save_steps": 10, "eval_steps": 5}, []) == []
    assert unsupported({"val_set_size": 0.1, "eval_steps": 5, "save_strategy": "no"}, []) == [
        "save_strategy: 'no': the best checkpoint by specialized perplexity is chosen among checkpoints saved "
        "at evaluations; remove it (eval_steps and save_steps set the schedule)"
    ]
    assert unsupported({"val_set_size": 0, "eval_steps": 5, "save_strategy": "no"}, []) == []  # nothing to choose


def test_run_context_reads_the_keys_both_schemas_share(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    cfg = {"base_model": str(tiny_model), "sequence_len": 96, "seed": 7, "output_dir": "out", "datasets": [{"type": "alpaca"}]}
    context = run_context(cfg, AutoTokenizer.from_pretrained(tiny_model))
    assert (context.config.base_model, context.config.sequence_len, context.config.seed) == (str(tiny_model), 96, 7)
    assert context.output_dir == Path("out")
    assert "datasets" not in context.config.model_fields_set  # Axolotl's dataset entries are not ours
    assert not context.config.fsdp_enabled


def _first_grad_norm(objective_name: str, tiny_model: Path, corpora: dict[str, Path], tmp_path: Path) -> float:
    """One step of ``trainer_class`` over a plain Trainer; the logged gradient norm."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    from mft_plugin.config.schema import DatasetConfig
    from mft_plugin.data.batches import PaddingCollator
    from mft_plugin.data.packing import raw_text_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    blocks = raw_text_blocks([DatasetConfig(path=str(corpora["spec_train"]))], tokenizer, 64)
    objective, _ = selected_strategies({"objective": objective_name}, default_registry())
    loaded: list[Any] = []

    def load_copy(student: Any, tokenizer: Any) -> Any:
        loaded.append(student)
        return AutoModelForCausalLM.from_pretrained(tiny_model)

    cls = trainer_class(Trainer, objective, [], load_copy, Engine())
    args = TrainingArguments(
        output_dir=str(tmp_path / objective_name), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-3, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, seed=0,
    )  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer = cls(model=student, args=args, train_dataset=blocks, data_collator=PaddingCollator(tokenizer.pad_token_id))
    if objective.needs_teacher:  # a frozen copy, loaded once for this student; none for ft
        assert isinstance(trainer.teacher, FrozenCopyTeacher) and loaded == [student]
    else:
        assert trainer.teacher is None and not loaded
    assert trainer.evaluate.__func__ is MFTTrainer.evaluate  # mft-run's evaluation, not the base trainer's
    trainer.train()
    return next(entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry)


def test_mft_trainer_class_on_a_base_trainer_scales_the_first_gradient_by_tau(
    tiny_model: Path, corpora: dict[str, Path], tmp_path: Path
) -> None:
    assert_scaled_by_tau(_first_grad_norm("mft", tiny_model, corpora, tmp_path), _first_grad_norm("ft", tiny_model, corpora, tmp_path))


def test_the_plugins_trainer_evaluates_perplexities_s_and_dg_as_mft_run_does(
    tiny_model: Path, corpora: dict[str, Path], tmp_path: Path
) -> None:
    """general_eval_datasets are packed as mft-run packs them; evaluate() is MFTTrainer's, and its
    perplexity is exp(total NLL / predicted tokens) computed here by hand; the base scores S = DG = 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = {"sequence_len": 64, "val_set_size": 0.1, "general_eval_datasets": [{"path": str(corpora["general_val"])}]}
    args = plugin_args(cfg, default_registry())
    spec = Dataset.from_list([{"input_ids": ids, "labels": ids} for ids in tokenizer(["Licensed under the terms", "of the MIT licence"])["input_ids"]])
    sets = lambda tok, spec_set: evaluation_sets(args, cfg, tok, spec_set)  # noqa: E731
    objective, _ = selected_strategies({"objective": "ft"}, default_registry())
    cls = trainer_class(Trainer, objective, [], lambda student, tokenizer: student, Engine(), sets)
    training = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)  # Axolotl's collators pad as this one
    trainer = cls(model=model, args=training, eval_dataset=spec, processing_class=tokenizer, data_collator=collator)
    assert set(trainer.eval_sets) == {"spec", "general"} and trainer.eval_sets["spec"] is spec
    general = trainer.eval_sets["general"]
    assert {len(ids) for ids in general["input_ids"][:-1]} == {64} and general["labels"] == general["input_ids"]

    trainer.set_base_perplexities(None, lambda measured: None)
    metrics = trainer.evaluate()
    assert (metrics["eval_S"], metrics["eval_DG"]) == (0.0, 0.0)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]), reduction="sum")
               for ids in general["input_ids"]]  # fmt: skip
    expected = math.exp(sum(nll).item() / sum(len(ids) - 1 for ids in general["input_ids"]))
    assert metrics["eval_general_ppl"] == pytest.approx(expected, rel=1e-5)


def _packed(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """``rows`` packed into one row as a multipack collator packs them: positions restart at each
    sequence, the first token of each is no label (no sequence predicts it from the one before),
    and no attention mask (transformers then attends within each sequence, read off position_ids)."""
    ids = [token for row in rows for token in row]
    labels = [IGNORE_INDEX if i == 0 else token for row in rows for i, token in enumerate(row)]
    positions = [i for row in rows for i in range(len(row))]
    return {key: torch.tensor([value]) for key, value in zip(("input_ids", "labels", "position_ids"), (ids, labels, positions))}


def _step(trainer: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]


def test_a_packed_mft_step_equals_the_same_rows_unpacked(tiny_model: Path, tmp_path: Path) -> None:
    """sample_packing: the teacher gets exactly the student's packed inputs (position_ids included),
    so loss and gradients are those of the same sequences as separate padded rows."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from mft_plugin.data.batches import PaddingCollator

    other = build_tiny_model(tmp_path / "teacher", seed=1)  # a teacher unlike the student: p^T matters
    objective, _ = selected_strategies({"objective": "mft"}, default_registry())
    cls = trainer_class(Trainer, objective, [], lambda student, tokenizer: AutoModelForCausalLM.from_pretrained(other, **NO_KV_CACHE), Engine())
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 4000, (n,), generator=generator).tolist() for n in (17, 9, 30)]

    packed_loss, packed_grads = _step(trainer, _packed(rows))
    unpacked_loss, unpacked_grads = _step(trainer, PaddingCollator(0)([{"input_ids": row} for row in rows]))
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)
    for packed, unpacked in zip(packed_grads, unpacked_grads):
        torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-7)
    crossed = {key: value for key, value in _packed(rows).items() if key != "position_ids"}
    assert not torch.allclose(trainer.compute_loss(trainer.model, crossed), unpacked_loss)  # positions matter


def _multipack_collator(tokenizer: Any) -> Any:
    """Axolotl's multipack collator (its padding to a multiple of 64 included) where Axolotl is installed; else
    one that packs as it does: each pack's rows concatenated (labels as they are), padded on the right."""
    if importlib.util.find_spec("axolotl") is not None:
        from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq

        return V2BatchSamplerDataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=64)
    from mft_plugin.data.batches import PaddingCollator

    return lambda packs: PaddingCollator(0)([{key: [v for row in pack for v in row[key]] for key in pack[0]} for pack in packs])


CACHE_LAYOUTS = {  # (adapter, packed): the layout the plugin's cache takes, and why (the startup line)
    (False, False): "hidden_states layout (projected does not apply: the run has no adapter",
    (True, False): "projected layout (frozen head shared with the base)",
    (False, True): "hidden_states layout (sample_packing: Axolotl's multipack labels",
    (True, True): "hidden_states layout (sample_packing: Axolotl's multipack labels",
}


@pytest.mark.parametrize(("adapter", "packed"), list(CACHE_LAYOUTS))
def test_the_plugins_chunked_loss_equals_its_plain_loss(tiny_model: Path, tmp_path: Path, adapter: bool, packed: bool) -> None:
    """loss_impl inside the plugin: chosen as mft-run chooses it (probe forward), named in the startup
    line, and the fused loss gives the plain loss and gradients, packed rows included, for full finetuning
    (a frozen copy unlike the student) and a LoRA student (the shared base; adapters not zero). With
    ``teacher_cache: {}`` the plugin's trainer builds mft-run's cache of its training rows (projected for the
    adapter, hidden states otherwise) and reads it per row, or per token from rows packed by Axolotl's
    multipack collator, whose packed-in rows' last tokens are labelled with the next row's first token (hidden
    states then): the online teacher's loss and gradients again, and a second trainer reads the cache without
    loading the teacher."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from mft_plugin.axolotl.bridge import announcement, axolotl_teacher_cache, loss_chooser, run_config
    from mft_plugin.data.batches import ROW_COLUMN, TOKEN_COLUMN, PaddingCollator

    other = build_tiny_model(tmp_path / "teacher", seed=1)
    objective, _ = selected_strategies({"objective": "mft"}, default_registry())
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 4000, (n,), generator=generator).tolist() for n in (17, 9, 30)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows} | ({"position_ids": [list(range(len(r))) for r in rows]} if packed else {}))
    collator = _multipack_collator(AutoTokenizer.from_pretrained(tiny_model)) if packed else PaddingCollator(0)
    collate = lambda collator, rows: dict(collator([list(rows)] if packed else list(rows)))  # noqa: E731  one pack
    batch = collate(collator, data)
    loaded: list[weakref.ref] = []

    def load(student: Any, tokenizer: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(other, **NO_KV_CACHE)
        loaded.append(weakref.ref(model))
        return model

    def student() -> Any:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, **NO_KV_CACHE)
        torch.manual_seed(0)  # the same adapters in every trainer
        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)) if adapter else model

    steps = {}
    for loss_impl in ("naive", "chunked", "auto", "cache", "cache again"):
        cfg = {"loss_impl": "auto" if "cache" in loss_impl else loss_impl, "base_model": str(tiny_model), "sample_packing": packed}
        cfg |= {"teacher_cache": {"path": str(tmp_path / "cache")}} if "cache" in loss_impl else {}
        args = plugin_args(cfg, default_registry())
        chooser = loss_chooser(cfg, args, objective)
        cls = trainer_class(Trainer, objective, [], load, Engine(), choose_loss=chooser, cache=axolotl_teacher_cache(cfg, args))
        training = TrainingArguments(output_dir=str(tmp_path / loss_impl), report_to=[], use_cpu=True)
        loaded.clear()
        trainer = cls(model=student(), args=training, train_dataset=data, data_collator=collator)
        assert (trainer.chunked_loss is None) == (loss_impl == "naive")
        assert f"loss: {'plain' if loss_impl == 'naive' else 'chunked'} (loss_impl: {cfg['loss_impl']}" in announcement(trainer)
        assert len(loaded) == (0 if adapter or loss_impl == "cache again" else 1)  # a frozen copy, to build the cache only:
        assert "cache" not in loss_impl or all(ref() is None for ref in loaded)  # not held once built
        if "cache" in loss_impl:
            assert run_config(cfg, args).teacher_cache.path == str(tmp_path / "cache")
            assert announcement(trainer).count(f"teacher: teacher cache, {CACHE_LAYOUTS[adapter, packed]}") == 1
            column = TOKEN_COLUMN if packed else ROW_COLUMN
            assert column in trainer.train_dataset.column_names and [ROW_COLUMN, TOKEN_COLUMN][packed] not in batch
            cached_batch = collate(trainer.data_collator, trainer.train_dataset)
            assert {key: value for key, value in cached_batch.items() if key != column}.keys() == batch.keys()
            assert all(torch.equal(cached_batch[key], value) for key, value in batch.items())
            steps[loss_impl] = _step(trainer, cached_batch)
        else:
            steps[loss_impl] = _step(trainer, batch)
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1
    (naive_loss, naive_grads), (chunked_loss, chunked_grads) = steps["naive"], steps["chunked"]
    torch.testing.assert_close(chunked_loss, naive_loss, rtol=1e-5, atol=0)
    for chunked, naive in zip(chunked_grads, naive_grads):
        torch.testing.assert_close(chunked, naive, rtol=1e-4, atol=1e-7)
    for cached in ("cache", "cache again"):
        cache_loss, cache_grads = steps[cached]
        torch.testing.assert_close(cache_loss, chunked_loss, rtol=1e-5, atol=0)
        for cache, chunked in zip(cache_grads, chunked_grads):
            torch.testing.assert_close(cache, chunked, rtol=1e-5, atol=1e-8)


def test_cache_indices_are_laid_out_as_the_collator_lays_out_the_input_ids(tiny_model: Path) -> None:
    """TokenIndexCollator: per pack, its rows' cache indices concatenated and padded as the input ids are
    (NO_ROW), and read per token they are what the per-row read gives; a collator that lays the tokens out
    otherwise is an error, never another token's p^T. A tokenizer that pads on the left is refused before
    the cache is built (its padding token before each row is labelled with the row's first token)."""
    import numpy as np
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from mft_plugin.axolotl.bridge import run_config
    from mft_plugin.axolotl.cache import LEFT_PADDING, AxolotlTeacherCache, TokenIndexCollator
    from mft_plugin.data.batches import TOKEN_COLUMN, PaddingCollator
    from mft_plugin.teacher.stored import NO_ROW, TOKEN_STRIDE, Field, token_indices

    rows = [{"input_ids": ids, TOKEN_COLUMN: token_indices(row, len(ids))} for row, ids in [(0, [5, 6]), (2, [7]), (NO_ROW, [8, 9, 4, 3])]]
    concatenated = lambda packs: PaddingCollator(0)([{"input_ids": [t for row in pack for t in row["input_ids"]]} for pack in packs])  # noqa: E731
    batch = TokenIndexCollator(concatenated)([rows[:2], rows[2:]])
    assert batch[TOKEN_COLUMN].tolist() == [[0, 1, 2 * TOKEN_STRIDE, NO_ROW], [NO_ROW] * 4]
    field = Field(np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2), torch.float32)
    per_row = field.rows(np.array([0, 2, NO_ROW]), 2)  # rows 0 and 2 at positions 0, 1
    torch.testing.assert_close(field.tokens(batch[TOKEN_COLUMN].numpy())[0], torch.stack([per_row[0, 0], per_row[0, 1], per_row[1, 0], per_row[2, 0]]), rtol=0, atol=0)
    left = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(tiny_model, padding_side="left"), padding=True)
    with pytest.raises(RuntimeError, match="DataCollatorForSeq2Seq did not lay out row 0's input ids as concatenated rows"):
        TokenIndexCollator(left)([rows[0], rows[2]])
    cache = AxolotlTeacherCache(run_config({}, plugin_args({"teacher_cache": {}}, default_registry())), packed=False)
    with pytest.raises(ValueError, match=re.escape(LEFT_PADDING)):
        cache.build(Dataset.from_list(rows), lambda: pytest.fail("loaded a teacher"), None, None, left)  # type: ignore[arg-type]


def test_the_plugin_refuses_what_it_cannot_do_for_the_loss() -> None:
    assert unsupported({"teacher_cache": {}}, []) == unsupported({"teacher_cache": {}, "sample_packing": True}, []) == []
    assert unsupported({"teacher_cache": {}, "loss_impl": "naive"}, []) == [
        "teacher_cache needs the chunked loss: set loss_impl: auto or chunked, or remove teacher_cache"
    ]
    assert unsupported({"teacher_cache": {}, "fsdp_config": {"fsdp_version": 2}}, []) == [
        "teacher_cache: needs the fused loss, which is not used with fsdp/deepspeed inside axolotl train yet (mft-run "
        "fuses it there, inside the LM head's forward); remove teacher_cache"
    ]
    (unused,) = unsupported({"teacher_cache": {}, "remove_unused_columns": True}, [])
    assert unused.startswith("remove_unused_columns: true: the teacher cache's index column is needed by the loss")
    for layout in ({"layout": "projected"}, {"top_k": 8}):
        (packed,) = unsupported({"teacher_cache": layout, "sample_packing": True}, [])
        (key, value), = layout.items()
        assert packed.startswith(f"teacher_cache.{key}: {value} with sample_packing: true cannot be exact (Axolotl's multipack")
        assert unsupported({"teacher_cache": layout}, []) == []
    sharded = unsupported({"loss_impl": "chunked", "fsdp_config": {"fsdp_version": 2}}, [])
    assert any(problem.startswith("loss_impl: chunked cannot be used with fsdp/deepspeed") for problem in sharded)
    assert unsupported({"loss_impl": "auto", "fsdp_config": {"fsdp_version": 2}}, []) == []


def test_mft_run_axolotl_refuses_to_start_where_axolotl_would_not_run_mft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mft_plugin.cli import main

    config = write_yaml(tmp_path / "a.yml", {"base_model": "m", "plugins": ["mft_plugin.axolotl.MFTPlugin"]})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "axolotl" else real_find_spec(name, *a))
    assert main(["axolotl", str(config)]) == 2
    assert "Axolotl is not installed in this environment" in capsys.readouterr().err
    bad = write_yaml(tmp_path / "b.yml", {"plugins": "mft_plugin.axolotl.MFTPlugin"})
    assert main(["axolotl", str(bad)]) == 2
    assert "plugins: must be a list" in capsys.readouterr().err
    assert main(["axolotl"]) == 2 and "usage: mft-run axolotl CONFIG.yml" in capsys.readouterr().err
    typo = write_yaml(tmp_path / "c.yml", {"objectve": "mft", "general_eval_dataset": [], "learning_rate": 1e-3})
    assert main(["axolotl", str(typo)]) == 2
    error = capsys.readouterr().err
    assert f"{typo}: objectve: unknown key; did you mean 'objective'? (Axolotl would ignore it)" in error
    assert "general_eval_dataset: unknown key; did you mean 'general_eval_datasets'?" in error
    assert "learning_rate" not in error  # Axolotl's own keys are Axolotl's to check


def test_mft_run_axolotl_fails_when_training_ends_without_the_plugins_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mft_plugin.axolotl import command

    out = tmp_path / "out"
    config = write_yaml(tmp_path / "a.yml", {"output_dir": str(out), "plugins": [command.PLUGIN]})
    monkeypatch.setattr(command, "plugin_problems", lambda path, cfg: [])
    monkeypatch.setattr(command, "config_problems", lambda path, cfg: [])
    calls: list[list[str]] = []

    def train(path: str, extra: list[str], write: bool) -> int:
        calls.append([path, *extra])
        if write:
            out.mkdir(exist_ok=True)
            (out / "metrics.json").write_text("{}")
        return 0

    monkeypatch.setattr(command, "axolotl_train", lambda path, extra: train(path, extra, write=False))
    assert command.main([str(config), "--num-processes", "1"]) == 1
    assert "ended without writing" in capsys.readouterr().err and calls == [[str(config), "--num-processes", "1"]]
    monkeypatch.setattr(command, "axolotl_train", lambda path, extra: train(path, extra, write=True))
    assert command.main([str(config)]) == 0


# --- with Axolotl -----------------------------------------------------------------------------


@needs_axolotl
def test_mft_run_axolotl_says_what_the_plugin_refuses_in_one_message_before_axolotl_starts(
    axolotl_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from mft_plugin.axolotl import command

    monkeypatch.setattr(command, "axolotl_train", lambda path, extra: pytest.fail("axolotl train started"))
    replay = [{"name": "replay", "datasets": [{"path": str(corpora["general_val"])}]}]
    packed = write_yaml(tmp_path / "packed.yml", _with_plugin(axolotl_config, tmp_path, "a", mitigations=replay, sample_packing=True))
    out_of_range = write_yaml(tmp_path / "tau.yml", _with_plugin(axolotl_config, tmp_path, "b", objective={"name": "mft", "tau": 2.5}))
    for config, message in [
        (packed, f"{packed}: sample_packing: true with mitigations: ['replay'] (data stage)"),
        (out_of_range, "objective.tau: Input should be less than or equal to 1 (got 2.5)"),
    ]:
        assert command.main([str(config)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("mft-run axolotl: not starting, invalid config:\n  ") and message in error
        assert "Traceback" not in error


@needs_axolotl
def test_plugin_loads_and_merges_its_keys_into_axolotls_schema() -> None:
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.integrations.config import merge_input_args

    manager = PluginManager.get_instance()
    manager.register("mft_plugin.axolotl.MFTPlugin")
    plugin = manager.plugins["mft_plugin.axolotl.MFTPlugin"]
    assert isinstance(plugin, BasePlugin)
    try:
        _, input_config = merge_input_args()
        assert {"objective", "mitigations"} <= set(input_config.model_fields)
    finally:
        del manager.plugins["mft_plugin.axolotl.MFTPlugin"]


def _axolotl_train(config: dict[str, Any], folder: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``axolotl train CONFIG`` (or ``command`` CONFIG, e.g. ``mft-run axolotl``) from this environment."""
    path = write_yaml(folder / f"{config['output_dir'].rsplit('/', 1)[-1]}.yml", config)
    bin_dir = str(Path(sys.executable).parent)  # `axolotl train` runs `accelerate launch` from PATH
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "AXOLOTL_DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    program, *args = command or ("axolotl", "train")
    return subprocess.run(
        [os.path.join(bin_dir, program), *args, str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def _logged_steps(result: subprocess.CompletedProcess[str]) -> list[dict[str, float]]:
    assert result.returncode == 0, result.stderr[-5000:]
    entries = [ast.literal_eval(match) for match in re.findall(r"\{'loss': [^}]*\}", result.stdout + result.stderr)]
    return [{key: float(entry[key]) for key in ("loss", "grad_norm")} for entry in entries]


@pytest.fixture
def axolotl_config(tiny_model: Path, corpora: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """A plain Axolotl SFT config on the tiny model, CPU-friendly (no kernels, no packing)."""
    return {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(corpora["spec_train"]), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "logging_steps": 1,
        "save_strategy": "no",
        "flash_attention": False,
        "bf16": False,  # float32 on CPU (Axolotl would otherwise pick a half precision)
        "fp16": False,
        "tf32": False,
        "seed": 0,
    }


def _with_plugin(config: dict[str, Any], folder: Path, name: str, **keys: Any) -> dict[str, Any]:
    return {**config, "plugins": ["mft_plugin.axolotl.MFTPlugin"], "output_dir": str(folder / name), **keys}


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_runs_mft_with_a_frozen_teacher(axolotl_config: dict[str, Any], tmp_path: Path) -> None:
    plain = _logged_steps(_axolotl_train({**axolotl_config, "output_dir": str(tmp_path / "plain")}, tmp_path))
    ft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ft", objective="ft"), tmp_path))
    mft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "mft", objective={"name": "mft", "tau": TAU}), tmp_path))
    assert len(plain) == len(ft) == len(mft) == 3
    assert ft == plain  # the plugin's trainer with objective ft is Axolotl's own training
    assert_scaled_by_tau(mft[0]["grad_norm"], ft[0]["grad_norm"])


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_runs_mft_on_axolotls_lora_with_the_shared_base(axolotl_config: dict[str, Any], tmp_path: Path) -> None:
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True}
    lora |= {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}  # triton kernels need CUDA
    ft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ft", objective="ft", **lora), tmp_path))
    mft = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "mft", objective="mft", **lora), tmp_path))
    assert_scaled_by_tau(mft[0]["grad_norm"], ft[0]["grad_norm"])


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_applies_loss_stage_mitigations_and_refuses_the_others(
    axolotl_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    general = [{"path": str(corpora["general_val"])}]
    ewc = {"name": "ewc", "ewc_lambda": 1e8, "fisher_samples": 2, "datasets": general}
    steps = _logged_steps(_axolotl_train(_with_plugin(axolotl_config, tmp_path, "ewc", mitigations=[ewc]), tmp_path))
    assert steps[1]["loss"] > 2 * steps[0]["loss"]  # the penalty, 0 at the start, dominates once weights move

    replay = _with_plugin(axolotl_config, tmp_path, "replay", mitigations=[{"name": "replay", "datasets": general}], sample_packing=True)
    refused = _axolotl_train(replay, tmp_path)
    assert refused.returncode != 0
    assert "sample_packing: true with mitigations: ['replay']" in refused.stdout + refused.stderr


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_with_replay_steps_as_mft_run_does(
    axolotl_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    """Replay inside `axolotl train` (no packing): per-step losses and gradient norms equal mft-run's on the
    same keys and the same rows, within 1e-5 (full precision, from trainer_state.json).

    The specialized documents are one ``sequence_len`` block each (:func:`tests.tiny.write_block_corpus`),
    where mft-run's ``completion`` (the stream cut into blocks) and Axolotl's (each document cut on its own)
    give the same rows; on other raw text they differ by design (README "Where we differ from Axolotl"), and
    so do the steps (seen: gradient norms 0.8% to 1.3% apart). Axolotl would also shuffle its rows before
    replay composes them (``shuffle_merged_datasets``), which the plugin turns off: without that, the
    micro-batches hold other specialized rows than mft-run's and the gradient norms differ. An epoch of 72
    steps, of which the run takes 3: the steps the plugin schedules must be capped at max_steps as Axolotl
    caps them, or Axolotl's default warmup (3% of them) would start at a learning rate of 0."""
    spec = write_block_corpus(tmp_path / "blocks.jsonl", DATA / "legal" / "train.jsonl", 72, axolotl_config["sequence_len"])
    general = [{"path": str(corpora["general_train"])}]
    replay = {"name": "replay", "ratio": 0.5, "datasets": general}
    axolotl_config = {**axolotl_config, "datasets": [{"path": str(spec), "ds_type": "json", "type": "completion"}]}
    config = _with_plugin(axolotl_config, tmp_path, "replay", objective={"name": "mft", "tau": TAU}, mitigations=[replay])
    result = _axolotl_train(config, tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "training set composed by ['replay']" in result.stdout + result.stderr
    ours = {key: config[key] for key in ("base_model", "sequence_len", "micro_batch_size", "max_steps", "learning_rate",
                                         "optimizer", "lr_scheduler", "logging_steps", "seed", "objective", "mitigations")}
    ours |= {"datasets": [{"path": str(spec), "type": "completion"}], "output_dir": str(tmp_path / "mft-run")}
    mft_run = _axolotl_train(ours, tmp_path, "mft-run")
    assert mft_run.returncode == 0, mft_run.stderr[-5000:]
    axolotl_steps, mft_run_steps = _full_precision_steps(Path(config["output_dir"])), _full_precision_steps(tmp_path / "mft-run")
    assert len(axolotl_steps) == len(mft_run_steps) == 3
    for theirs, mine in zip(axolotl_steps, mft_run_steps, strict=True):
        assert theirs == pytest.approx(mine, rel=1e-5)  # seen: equal to the last bit


def _full_precision_steps(output_dir: Path) -> list[dict[str, float]]:
    """Each training step's loss, gradient norm and learning rate as the run's trainer_state.json holds them
    (the log prints 4 digits)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [{key: entry[key] for key in ("loss", "grad_norm", "learning_rate")} for entry in history if "loss" in entry]


@needs_axolotl
@pytest.mark.slow
def test_axolotl_train_with_the_fused_loss_trains_as_the_plain_loss(axolotl_config: dict[str, Any], tmp_path: Path) -> None:
    """The chunked loss inside `axolotl train` (full MFT, a frozen teacher) gives the plain loss's training
    loss, and so does the teacher cache (``teacher_cache: {}``: built before the first step from Axolotl's rows,
    the hidden states of full finetuning), step by step; with packing and added tokens (the teacher that builds
    the cache made by Axolotl's loader, with the student's vocabulary) the cache is read per token, and the run
    trains and says which teacher and loss path it took (the packed cache's exactness is tested outside
    Axolotl's CLI: ``test_the_plugins_chunked_loss_equals_its_plain_loss``)."""
    runs, steps = {}, {}
    for name, keys in {"naive": {"loss_impl": "naive"}, "chunked": {"loss_impl": "chunked"}, "cache": {"teacher_cache": {}}}.items():
        config = _with_plugin(axolotl_config, tmp_path, name, objective={"name": "mft", "tau": TAU}, **keys)
        result = _axolotl_train(config, tmp_path)
        log = result.stdout + result.stderr
        assert result.returncode == 0, result.stderr[-5000:]
        assert f"loss: {'plain' if name == 'naive' else 'chunked'} (loss_impl: {keys.get('loss_impl', 'auto')}" in log
        runs[name] = json.loads((Path(config["output_dir"]) / "metrics.json").read_text())
        steps[name] = [step["loss"] for step in _full_precision_steps(Path(config["output_dir"]))]
    assert "teacher: teacher cache, hidden_states layout (projected does not apply: the run has no adapter" in log
    assert runs["chunked"]["train_loss"] == pytest.approx(runs["naive"]["train_loss"], rel=1e-5)
    assert len(steps["cache"]) == 3 and steps["cache"] == pytest.approx(steps["naive"], rel=1e-5)

    packed = {"sample_packing": True, "attn_implementation": "sdpa", "tokens": ["<mft_a>", "<mft_b>"], "teacher_cache": {}}
    config = _with_plugin(axolotl_config, tmp_path, "packed", objective={"name": "mft", "tau": TAU}, **packed)
    result = _axolotl_train(config, tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "teacher: teacher cache, hidden_states layout (sample_packing: " in result.stdout + result.stderr
    assert "read per token; no teacher model held; loss: chunked (loss_impl: auto" in result.stdout + result.stderr


@needs_axolotl
def test_mft_run_axolotl_fails_loudly_on_a_typo_in_the_plugin_line(
    axolotl_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `axolotl train` would run as plain finetuning, exit code 0, is refused before anything loads."""
    from mft_plugin.cli import main

    config = write_yaml(tmp_path / "typo.yml", {**axolotl_config, "plugins": ["mft_plugin.axolotl.MFTPlugn"]})
    assert main(["axolotl", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"{config}: plugins: ['mft_plugin.axolotl.MFTPlugn'] does not list mft_plugin.axolotl.MFTPlugin; did you mean" in error
    assert "'mft_plugin.axolotl.MFTPlugn' cannot be loaded: AttributeError" in error
    module = write_yaml(tmp_path / "module.yml", {**axolotl_config, "plugins": ["mft_plugn.axolotl.MFTPlugin"]})
    assert main(["axolotl", str(module)]) == 2
    assert "'mft_plugn.axolotl.MFTPlugin' cannot be loaded: ModuleNotFoundError" in capsys.readouterr().err
    assert not (tmp_path / "prepared").exists()  # refused before Axolotl prepared any data


@needs_axolotl
@pytest.mark.slow
def test_mft_run_axolotl_trains_packed_mft_and_writes_the_papers_metrics(
    axolotl_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    """sample_packing under the plugin, S/DG at each evaluation, the best checkpoint by specialized
    perplexity, metrics.json as mft-run writes it, and `mft-run report` on the output folder."""
    packed = {"sample_packing": True, "attn_implementation": "sdpa", "val_set_size": 0.2, "eval_steps": 1, "max_steps": 2}
    packed |= {"save_strategy": None}  # checkpoints at evaluations, among which the best is chosen
    general = {"general_eval_datasets": [{"path": str(corpora["general_val"])}]}
    config = _with_plugin(axolotl_config, tmp_path, "packed", objective={"name": "mft", "tau": TAU}, **packed, **general)
    result = _axolotl_train(config, tmp_path, "mft-run", "axolotl")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert log.count("mft_plugin.axolotl.MFTPlugin active: objective {'tau': 0.25, 'name': 'mft'}; mitigations none; teacher: frozen copy") == 1

    out = Path(config["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_S" in entry and entry["step"] > 0]
    assert [entry["step"] for entry in evaluations] == [1, 2]
    best = min(evaluations, key=lambda entry: entry["eval_spec_ppl"])
    assert (metrics["step"], metrics["eval_spec_ppl"], metrics["eval_DG"]) == (best["step"], best["eval_spec_ppl"], best["eval_DG"])
    assert metrics["eval_S"] == pytest.approx((metrics["base_spec_ppl"] - metrics["eval_spec_ppl"]) / metrics["base_spec_ppl"])
    assert metrics["eval_DG"] == pytest.approx((metrics["eval_general_ppl"] - metrics["base_general_ppl"]) / metrics["base_general_ppl"])
    assert yaml.safe_load((out / "config.yml").read_text())["objective"] == {"name": "mft", "tau": TAU}

    from mft_plugin.cli import main

    assert main(["report", str(out)]) == 0
    assert f"| 1 | {100 * metrics['eval_S']:.1f} | {100 * metrics['eval_DG']:.1f} |" in (out / "results.md").read_text()
