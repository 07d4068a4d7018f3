"""Sample packing: rows laid out as written by hand, the collator, and the point of it all: a packed
batch gives every token the loss it has when its record runs alone (sdpa and eager attention),
for the student, the teacher and the evaluation alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from mft_plugin import get_objective
from mft_plugin.data.batches import PaddingCollator, model_inputs
from mft_plugin.data.labels import IGNORE_INDEX, shift_for_causal_lm, valid_mask
from mft_plugin.data.packing import pack_rows, record_rows
from mft_plugin.loss.chunked import ChunkedLoss
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.loss.plain import plain_token_losses
from mft_plugin.models.heads import output_head
from mft_plugin.teacher.sources import FrozenCopyTeacher

X = IGNORE_INDEX


def test_records_are_packed_greedily_with_restarting_positions() -> None:
    rows = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
        {"input_ids": [4, 5], "labels": [X, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [X, X, 8, 9]},
    ]
    assert pack_rows(rows, sequence_len=6) == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [X, X, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]


def test_long_records_are_dropped_and_counted_or_cut_for_raw_text(caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"input_ids": [1] * 5, "labels": [1] * 5}, {"input_ids": [2] * 3, "labels": [X, 2, 2]},
            {"input_ids": [3] * 2, "labels": [X, X]}]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        kept = record_rows(rows, sequence_len=4, cut_long=False, source="chat.jsonl")
    assert kept == [rows[1]]
    assert "chat.jsonl: dropped 1 of 3 records longer than sequence_len 4 and 1 with no label" in caplog.text
    assert [row["input_ids"] for row in record_rows(rows[:1], 4, cut_long=True, source="raw")] == [[1] * 4]


def test_the_collator_gives_packed_rows_positions_and_no_attention_mask() -> None:
    packed = {"input_ids": [5, 6, 7], "labels": [X, 6, 7], "position_ids": [0, 0, 1]}
    batch = PaddingCollator(pad_token_id=0, pad_to=5)([packed, {"input_ids": [8, 9], "labels": [X, 9], "position_ids": [0, 1]}])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 1, 2]]  # padding: a block of its own
    assert batch["labels"].tolist() == [[X, 6, 7, X, X], [X, 9, X, X, X]]
    assert model_inputs(batch)["use_cache"] is False  # else transformers ignores the packing (masking_utils)
    plain = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and "position_ids" not in plain
    assert plain["labels"].tolist() == [[5, 6, 7], [8, X, X]] and "use_cache" not in model_inputs(plain)


RECORDS = [
    {"input_ids": [0, 11, 12, 13, 14, 15, 1], "labels": [X, X, X, 13, 14, 15, 1]},
    {"input_ids": [0, 21, 22, 1], "labels": [0, 21, 22, 1]},
    {"input_ids": [0, 31, 32, 33, 34, 1], "labels": [X, X, 32, 33, 34, 1]},
    {"input_ids": [0, 41, 42], "labels": [X, 41, 42]},
]


def per_record(model: torch.nn.Module, batch_rows: list[dict[str, list[int]]], token_losses) -> list[torch.Tensor]:  # noqa: ANN001
    """Each record alone (batch of one, no padding): its per-token losses at its labelled positions."""
    out = []
    for row in batch_rows:
        batch = PaddingCollator(pad_token_id=2)([row])
        labels = shift_for_causal_lm(batch["labels"])
        out.append(token_losses(model, batch, labels)[valid_mask(labels)])
    return out


def packed_losses(model: torch.nn.Module, token_losses) -> list[torch.Tensor]:  # noqa: ANN001
    packed = pack_rows(RECORDS, sequence_len=12)
    assert len(packed) == 2  # records 0+1 share a row, 2+3 the other: a real packing
    batch = PaddingCollator(pad_token_id=2, pad_to=14)(packed)
    labels = shift_for_causal_lm(batch["labels"])
    losses = token_losses(model, batch, labels)
    return [losses[row][valid_mask(labels)[row]] for row in range(len(packed))]


def student_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nll_token_losses(model(**model_inputs(batch)).logits, labels)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_gives_each_token_its_loss_alone(tiny_model: Path, attention: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    assert model.config.use_cache  # the case where a KV cache would silently undo the block-diagonal mask
    alone = per_record(model, RECORDS, student_nll)
    packed = packed_losses(model, student_nll)
    torch.testing.assert_close(packed[0], torch.cat(alone[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], torch.cat(alone[2:]), rtol=1e-5, atol=1e-5)

    def crossing(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return student_nll(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, labels)

    # the control: the same rows with attention allowed across records give other losses
    assert not torch.allclose(packed_losses(model, crossing)[0], torch.cat(alone[:2]), atol=1e-3)


def test_the_teacher_and_the_mft_loss_see_the_packed_inputs(tiny_model: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(1)
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a teacher unlike the student, so that p^T matters
    teacher, mft = FrozenCopyTeacher(teacher_model), get_objective("mft", tau=0.25)

    def mft_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return plain_token_losses(mft, teacher, model(**model_inputs(batch)).logits, batch, labels)

    chunked = ChunkedLoss(mft, output_head(student), chunk_size=5)

    def chunked_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return chunked(model, teacher, batch, labels)

    for losses in (mft_losses, chunked_losses):  # the plain path and the chunked one fused with the head
        alone, packed = per_record(student, RECORDS, losses), packed_losses(student, losses)
        torch.testing.assert_close(packed[0], torch.cat(alone[:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[1], torch.cat(alone[2:]), rtol=1e-5, atol=1e-5)


CHATS = [
    [{"role": "user", "content": f"What is clause {i}?"}, {"role": "assistant", "content": f"Clause {i} grants the licence."}]
    for i in range(12)
]


def test_a_packed_chat_run_measures_the_answers_only(base_config: dict, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    import json
    import math

    from transformers import AutoTokenizer

    from mft_plugin import run
    from mft_plugin.config.errors import validate_config
    from mft_plugin.registry import default_registry

    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS[:8]))
    valid.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS[8:]))
    config = validate_config({
        **base_config, "datasets": [{"path": str(train), "type": "chat_template"}],
        "test_datasets": [{"path": str(valid), "type": "chat_template"}],
        "sample_packing": True, "pad_to_sequence_len": True, "objective": {"name": "mft", "tau": 0.25},
    })  # fmt: skip
    metrics = run(config)
    assert metrics["step"] == 4 and {"eval_S", "eval_DG", "eval_DG/S"} <= set(metrics)

    # the base's specialized perplexity, by hand: each validation chat alone, NLL of its answer tokens only
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    chat = default_registry().get("format", "chat_template").cls()
    total, count = 0.0, 0
    for conversation in CHATS[8:]:
        row = chat.tokenize({"messages": conversation}, tokenizer, False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        for t, label in enumerate(row["labels"][1:]):
            if label != IGNORE_INDEX:
                total -= torch.log_softmax(logits[t].double(), -1)[label].item()
                count += 1
    assert count < sum(len(chat.tokenize({"messages": c}, tokenizer, False)["input_ids"]) for c in CHATS[8:]) / 2
    assert metrics["base_spec_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ft", "distill_ft", "singly_corrective", "mft"])
def test_every_objective_trains_on_packed_chat_data_with_replay_and_ewc(
    objective: str, two_step_config: dict, corpora: dict[str, Path], tmp_path: Path  # type: ignore[type-arg]
) -> None:
    import json
    import math

    from mft_plugin import run
    from mft_plugin.config.errors import validate_config

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    general = [{"path": str(corpora["general_train"])}]
    config = validate_config({
        **two_step_config, "datasets": [{"path": str(train), "type": "chat_template"}], "sample_packing": True, "sequence_len": 64,
        "objective": objective, "mitigations": [{"name": "replay", "datasets": general},
                                                {"name": "ewc", "datasets": general, "fisher_samples": 2}],
    })  # fmt: skip
    metrics = run(config)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert (Path(config.output_dir) / "model.safetensors").exists()


# --- the probe: a model that would let packed records attend to each other is refused -----------


def ignoring_position_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama as a model that ignores ``position_ids`` (remote code, another attention implementation)."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaModel.forward
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", lambda self, *a, position_ids=None, **k: forward(self, *a, **k))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_probe_finds_no_leak_where_packing_keeps_records_apart(tiny_model: Path, attention: str) -> None:
    from mft_plugin.models.attention import packing_leak

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
    assert packing_leak(model, model.config.vocab_size) < 1e-5


def test_packing_on_a_model_that_ignores_position_ids_is_refused_before_training(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mft_plugin.cli import main
    from mft_plugin.models.attention import packing_leak
    from tests.tiny import write_yaml

    ignoring_position_ids(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(base_config["base_model"])
    assert packing_leak(model, model.config.vocab_size) > 0.1  # guard: this model does leak
    config = write_yaml(tmp_path / "packed.yml", {**base_config, "sample_packing": True})
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    refusal = [line for line in err.splitlines() if "sample_packing" in line]  # (the rest: progress bars)
    assert len(refusal) == 1 and refusal[0].startswith("sample_packing: true, but this model (LlamaForCausalLM"), err
    assert "attend to each other" in refusal[0] and "set sample_packing: false" in refusal[0]
    assert not (tmp_path / "out" / "metrics.json").exists() and not list((tmp_path / "out").glob("checkpoint-*"))


def test_exact_duplicates_are_dropped_as_axolotl_drops_them(base_config: dict[str, Any], tmp_path: Path) -> None:
    """``dataset_exact_deduplication``: a record whose tokens and labels repeat an earlier one's is dropped, before the
    ``val_set_size`` split (Axolotl's ``deduplicate_and_log_datasets``); off, every record stays."""
    import json

    from mft_plugin.config.errors import validate_config
    from mft_plugin.models.loading import load_tokenizer
    from mft_plugin.train.context import RecipeContext
    from mft_plugin.train.recipe import build_datasets

    answers = ["Paris.", "Rome.", "Paris.", "Madrid.", "Rome.", "Paris."]
    records = tmp_path / "alpaca.jsonl"
    records.write_text("".join(json.dumps({"instruction": "Name a capital.", "output": a}) + "\n" for a in answers))

    def train_rows(**keys: Any) -> list[list[int]]:
        config = validate_config({**base_config, "datasets": [{"path": str(records), "type": "alpaca"}], "sequence_len": 256, **keys})
        context = RecipeContext(config=config, tokenizer=load_tokenizer(config), output_dir=tmp_path)
        return build_datasets(config, context)[0]["input_ids"]

    assert len(train_rows()) == 6
    deduplicated = train_rows(dataset_exact_deduplication=True)
    assert len(deduplicated) == 3 and len({tuple(row) for row in deduplicated}) == 3
