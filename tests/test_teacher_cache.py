"""The teacher caches: the hidden-state cache reproduces the online teacher exactly; the top-k cache
stores p^T_l and p^T_max exactly and approximates the tail (with the label's own mass kept); both are
keyed, reused across a sweep, and rebuilt when found damaged."""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from mft_plugin import get_objective, run
from mft_plugin.config.errors import validate_config
from mft_plugin.data.batches import ROW_COLUMN, PaddingCollator
from mft_plugin.data.labels import safe_labels, shift_for_causal_lm
from mft_plugin.loss.chunked import ChunkedLoss
from mft_plugin.loss.corrected import masked_mean
from mft_plugin.models.heads import output_head
from mft_plugin.teacher.cache import (
    BUILD_BATCH_ROWS,
    META_FILE,
    cache_folder,
    cached_teacher,
    open_fields,
    plan_cache,
    teacher_cache_key,
    write_cache,
)
from mft_plugin.teacher.hidden_states import HiddenStateCache, HiddenStates
from mft_plugin.teacher.sources import FrozenCopyTeacher
from mft_plugin.teacher.top_k import CachedTeacherChunks, TopK, TopKCache
from tests.test_chunked_loss import VOCAB, gradients, tiny_llama

COLLATOR = PaddingCollator(pad_token_id=0)


def blocks(seed: int = 0, rows: int = 5) -> Dataset:
    """Token blocks of unequal lengths (the last one is padded in a batch)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [9] * (rows - 1) + [6]
    return Dataset.from_dict({"input_ids": [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]})


def build(folder: Path, teacher: FrozenCopyTeacher, data: Dataset, top_k: int | None) -> TopKCache | HiddenStateCache:
    """A top-k cache, or the hidden-state cache of a full-finetuning run (``top_k`` None)."""
    layout = TopK(top_k) if top_k is not None else HiddenStates()
    write_cache(teacher, data, COLLATOR, folder, layout)
    return layout.open(open_fields(folder, layout.kind), tiny_llama(0))


def training_batch(data: Dataset, rows: list[int]) -> dict[str, torch.Tensor]:
    return COLLATOR([{**data[i], ROW_COLUMN: i} for i in rows])


def test_a_cached_chunk_is_the_top_k_the_label_and_the_rest_in_the_students_proportions() -> None:
    generator = torch.Generator().manual_seed(0)
    p_teacher = torch.softmax(torch.randn(3, 10, generator=generator), dim=1)
    log_p_student = torch.log_softmax(torch.randn(3, 10, generator=generator), dim=1)
    top = p_teacher.topk(4, dim=1)
    labels = torch.stack([top.indices[0, 1], p_teacher[1].argmin(), p_teacher[2].argsort()[3]])  # in, out, out of the top 4
    p_label = p_teacher.gather(1, labels.unsqueeze(1)).squeeze(1)
    rest = 1 - top.values.sum(1)
    cached = CachedTeacherChunks(p_label, top.values[:, 0], rest, top.values, top.indices)
    out = torch.empty(3, 10)
    stats = cached.chunk(slice(0, 3), labels, out, log_p_student)
    torch.testing.assert_close(out.sum(1), torch.ones(3))
    torch.testing.assert_close(out.gather(1, top.indices), top.values)
    torch.testing.assert_close(out.gather(1, labels.unsqueeze(1)).squeeze(1), p_label)  # the label's exact p^T_l
    outside = torch.ones(3, 10, dtype=torch.bool).scatter(1, top.indices, False).scatter(1, labels.unsqueeze(1), False)
    tail = log_p_student.exp() * outside
    label_outside = torch.tensor([0.0, 1.0, 1.0]) * p_label
    expected_tail = tail * ((rest - label_outside) / tail.sum(1)).unsqueeze(1)
    torch.testing.assert_close(out * outside, expected_tail)
    assert torch.equal(stats.p_label, p_label) and torch.equal(stats.p_max, p_teacher.amax(1))  # exact, not p~


def test_with_the_student_equal_to_the_teacher_a_cached_chunk_is_the_teacher_exactly() -> None:
    """Self-distillation starts from the teacher: then the cached target is p^T itself, at any k."""
    p_teacher = torch.softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(1)), dim=1)
    top = p_teacher.topk(3, dim=1)
    cached = CachedTeacherChunks(p_teacher[:, 0], top.values[:, 0], 1 - top.values.sum(1), top.values, top.indices)
    out = torch.empty(2, 12)
    labels = p_teacher.argmin(dim=1)  # outside the top 3
    cached = CachedTeacherChunks(p_teacher.gather(1, labels.unsqueeze(1)).squeeze(1), top.values[:, 0], 1 - top.values.sum(1), top.values, top.indices)
    cached.chunk(slice(0, 2), labels, out, p_teacher.log())
    torch.testing.assert_close(out, p_teacher)


def test_stored_label_and_max_probabilities_are_exact_at_any_top_k(tmp_path: Path) -> None:
    teacher, data = FrozenCopyTeacher(tiny_llama(1)), blocks()
    cache = build(tmp_path / "cache", teacher, data, top_k=3)
    batch = training_batch(data, [4, 0, 2])
    labels = safe_labels(shift_for_causal_lm(batch["labels"])).flatten()
    online, stored = teacher.targets(batch), cache.targets(batch)
    p_online = torch.empty(labels.shape[0], VOCAB)
    exact = online.chunk(slice(None), labels, p_online, None)
    valid = shift_for_causal_lm(batch["labels"]).flatten() != -100
    torch.testing.assert_close(stored.p_label[valid], exact.p_label[valid], rtol=0, atol=0)
    torch.testing.assert_close(stored.p_max[valid], exact.p_max[valid], rtol=0, atol=0)
    torch.testing.assert_close(stored.top_probs[valid], p_online.topk(3, dim=1).values[valid], rtol=0, atol=0)
    assert stored.top_ids.shape[1] == 3 and stored.top_ids.dtype == torch.long


@pytest.mark.parametrize("top_k", [None, VOCAB], ids=["hidden_states", "full_top_k"])
def test_the_hidden_state_cache_and_a_full_vocabulary_cache_train_exactly_like_the_online_teacher(
    tmp_path: Path, top_k: int | None
) -> None:
    teacher, data = FrozenCopyTeacher(tiny_llama(1)), blocks()
    cache = build(tmp_path / "cache", teacher, data, top_k=top_k)
    assert_trains_like_the_online_teacher(lambda: tiny_llama(0), teacher, cache, training_batch(data, [3, 4, 1]), chunk_size=7)


def assert_trains_like_the_online_teacher(
    student: Callable[[], torch.nn.Module], online: Any, cache: Any, batch: dict[str, torch.Tensor], chunk_size: int
) -> None:
    """The fused MFT loss per token and the student's gradients with ``cache`` equal those with ``online``;
    ``student()`` gives the student of each (a fresh one, or the same one, its gradients then reset)."""
    labels = shift_for_causal_lm(batch["labels"])
    results = []
    for source in (online, cache):
        model = student()
        model.zero_grad()
        losses = ChunkedLoss(get_objective("mft"), output_head(model), chunk_size=chunk_size)(model, source, batch, labels)
        masked_mean(losses, labels).backward()
        results.append((losses.detach(), gradients(model)))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("top_k", [None, VOCAB], ids=["hidden_states", "full_top_k"])
@pytest.mark.parametrize("built_padded", [True, False], ids=["built-padded", "built-unpadded"])
def test_batches_padded_past_the_longest_block_read_the_cache_like_the_online_teacher(
    tmp_path: Path, top_k: int | None, built_padded: bool
) -> None:
    """pad_to_sequence_len with no block reaching sequence_len: the collator pads to 12, the longest block
    is 9. The cache was as wide as the longest block and the build crashed (and so did reading a narrower one)."""
    teacher, data, padded = FrozenCopyTeacher(tiny_llama(1)), blocks(), PaddingCollator(pad_token_id=0, pad_to=12)
    layout = TopK(top_k) if top_k is not None else HiddenStates()
    write_cache(teacher, data, padded if built_padded else COLLATOR, tmp_path / "cache", layout)
    cache = layout.open(open_fields(tmp_path / "cache", layout.kind), tiny_llama(0))
    batch = padded([{**data[i], ROW_COLUMN: i} for i in (3, 4, 1)])
    labels, student = shift_for_causal_lm(batch["labels"]), tiny_llama(0)
    assert batch["input_ids"].shape[1] == 12
    fused = ChunkedLoss(get_objective("mft"), output_head(student), chunk_size=7)
    online, cached = fused(student, teacher, batch, labels), fused(student, cache, batch, labels)
    assert bool(online.isfinite().all()) and bool(cached.isfinite().all())
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)


def test_a_small_cache_changes_the_loss_only_through_the_distillation_term(tmp_path: Path) -> None:
    """Guard that the test above can fail: top_k = 2 of 37 tokens gives another (close) loss."""
    teacher, data = FrozenCopyTeacher(tiny_llama(1)), blocks()
    batch, mft = training_batch(data, [0, 1]), get_objective("mft")
    labels = shift_for_causal_lm(batch["labels"])
    student = tiny_llama(0)
    fused = ChunkedLoss(mft, output_head(student))
    online = masked_mean(fused(student, teacher, batch, labels), labels).item()
    small_cache = build(tmp_path / "cache", teacher, data, top_k=2)
    cached = masked_mean(fused(student, small_cache, batch, labels), labels).item()
    assert online != cached and cached == pytest.approx(online, rel=0.05)


def test_rows_are_read_back_for_the_blocks_of_the_batch_whatever_their_order(tmp_path: Path) -> None:
    teacher, data = FrozenCopyTeacher(tiny_llama(1)), blocks()
    cache = build(tmp_path / "cache", teacher, data, top_k=4)
    one_by_one = [cache.targets(training_batch(data, [i])).p_label for i in (2, 0)]
    together = cache.targets(training_batch(data, [2, 0])).p_label
    torch.testing.assert_close(together, torch.cat(one_by_one))
    exact = build(tmp_path / "exact", teacher, data, top_k=None)
    width = training_batch(data, [2, 0])["input_ids"].shape[1]
    one_by_one = [exact.targets(training_batch(data, [i])).hidden.view(1, width, -1) for i in (2, 0)]
    torch.testing.assert_close(exact.targets(training_batch(data, [2, 0])).hidden.view(2, width, -1), torch.cat(one_by_one))


def cache_config(base_config: dict[str, Any], tmp_path: Path, **cache: Any) -> Any:
    return validate_config({**base_config, "teacher_cache": {"path": str(tmp_path / "caches"), **cache}})


def make_teacher_counting(built: list[int]) -> Any:
    def make_teacher() -> FrozenCopyTeacher:
        built.append(1)
        return FrozenCopyTeacher(tiny_llama(1))

    return make_teacher


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_second_run_on_the_same_base_and_data_reuses_the_cache(base_config: dict[str, Any], tmp_path: Path, top_k: int | None) -> None:
    config, data = cache_config(base_config, tmp_path, top_k=top_k), blocks()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    built: list[int] = []
    first, indexed = cached_teacher(config, data, make_teacher_counting(built), COLLATOR, args, tiny_llama(0))
    second, _ = cached_teacher(config, data, make_teacher_counting(built), COLLATOR, args, tiny_llama(0))
    folder = cache_folder(config, data)
    assert len(built) == 1 and (folder / META_FILE).exists()
    assert indexed[ROW_COLUMN] == list(range(len(data)))
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left behind


def test_in_lockstep_the_main_process_decides_and_writes_and_the_others_run_every_batch_and_read_it(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZeRO-3's build (``CachePlan.built_in_lockstep``), one process standing in for each rank."""
    config, data = cache_config(base_config, tmp_path), blocks(rows=2 * BUILD_BATCH_ROWS + 1)
    plan, _ = plan_cache(config, data, COLLATOR, tiny_llama(0))
    main = SimpleNamespace(is_main_process=True, device=torch.device("cpu"), wait_for_everyone=lambda: None)
    built: list[int] = []
    written = plan.built_in_lockstep(make_teacher_counting(built), main)
    plan.built_in_lockstep(make_teacher_counting(built), main)  # usable: the main process tells the others not to build
    assert len(built) == 1
    files = {path.name: path.stat().st_mtime_ns for path in plan.folder.iterdir()}

    other_rank = FrozenCopyTeacher(tiny_llama(1))
    forwards: list[int] = []
    other_rank.model.register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setattr("mft_plugin.teacher.cache.broadcast_object_list", lambda decision: [True])  # the main said: build
    read = plan.built_in_lockstep(lambda: other_rank, SimpleNamespace(**{**vars(main), "is_main_process": False}))
    assert len(forwards) == 3  # every batch the main process ran, so that a collective forward never waits
    assert {path.name: path.stat().st_mtime_ns for path in plan.folder.iterdir()} == files  # nothing written
    assert [p.name for p in plan.folder.parent.iterdir()] == [plan.folder.name]
    batch = training_batch(data, [0, 16])
    assert torch.equal(read.targets(batch).hidden, written.targets(batch).hidden)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated array": lambda folder: truncate(folder / "hidden.npy"),
    "truncated meta.json": lambda folder: truncate(folder / META_FILE),
    "deleted meta.json": lambda folder: (folder / META_FILE).unlink(),
    "leftover folder": lambda folder: [f.unlink() for f in folder.iterdir() if f.name != "hidden.npy"],
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_logged_and_rebuilt(
    base_config: dict[str, Any], tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    config, data = cache_config(base_config, tmp_path), blocks()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    built: list[int] = []
    first, _ = cached_teacher(config, data, make_teacher_counting(built), COLLATOR, args, tiny_llama(0))
    expected = first.targets(training_batch(data, [0, 4])).hidden.clone()
    DAMAGES[damage](cache_folder(config, data))
    with caplog.at_level(logging.WARNING, logger="mft_plugin.teacher.cache"):
        rebuilt, _ = cached_teacher(config, data, make_teacher_counting(built), COLLATOR, args, tiny_llama(0))
    assert len(built) == 2 and "teacher cache damaged, rebuilding it" in caplog.text
    assert torch.equal(rebuilt.targets(training_batch(data, [0, 4])).hidden, expected)
    assert [p.name for p in cache_folder(config, data).parent.iterdir()] == [cache_folder(config, data).name]


def test_the_key_changes_with_what_is_stored_data_teacher_precision_and_attention(base_config: dict[str, Any], tmp_path: Path) -> None:
    key = teacher_cache_key(cache_config(base_config, tmp_path, top_k=8), blocks())
    assert key == teacher_cache_key(cache_config(base_config, tmp_path, top_k=8), blocks())
    assert key != teacher_cache_key(cache_config(base_config, tmp_path, top_k=16), blocks())
    assert key != teacher_cache_key(cache_config(base_config, tmp_path), blocks())  # hidden states
    assert key != teacher_cache_key(cache_config(base_config, tmp_path, top_k=8), blocks(seed=1))
    cheap = validate_config({**base_config, "teacher": {"dtype": "bfloat16"}, "teacher_cache": {"top_k": 8}})
    assert key != teacher_cache_key(cheap, blocks())
    grown = {**base_config, "special_tokens": {"pad_token": "<|pad|>"}}  # the teacher's vocabulary grows
    assert key != teacher_cache_key(cache_config(grown, tmp_path, top_k=8), blocks())
    mixed = validate_config({**base_config, "bf16": True, "teacher_cache": {"top_k": 8, "path": str(tmp_path / "caches")}})
    assert key != teacher_cache_key(mixed, blocks())
    eager = validate_config({**base_config, "attn_implementation": "eager", "teacher_cache": {"top_k": 8}})
    assert key != teacher_cache_key(eager, blocks())  # left out of the hand-written key


def test_under_bf16_the_cache_stores_the_bf16_hidden_states_the_online_teacher_gives(tmp_path: Path) -> None:
    teacher, data = FrozenCopyTeacher(tiny_llama(1)), blocks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = build(tmp_path / "cache", teacher, data, top_k=None)
        batch = training_batch(data, [1, 3])
        online, stored = teacher.targets(batch), cache.targets(batch)
    assert stored.hidden.dtype == torch.bfloat16 and stored.weight.dtype == torch.bfloat16
    assert torch.equal(stored.hidden, online.hidden) and torch.equal(stored.weight, online.weight)


@pytest.mark.slow
def test_runs_with_the_hidden_state_cache_and_online_train_alike_and_share_one_cache(
    two_step_config: dict[str, Any], tmp_path: Path
) -> None:
    cache = {"path": str(tmp_path / "caches")}
    online = run(validate_config({**two_step_config, "output_dir": str(tmp_path / "online")}))
    cached = [run(validate_config({**two_step_config, "output_dir": str(tmp_path / name), "teacher_cache": cache}))
              for name in ("first", "second")]
    assert cached[0]["train_loss"] == pytest.approx(online["train_loss"], rel=1e-5)
    assert cached[1]["train_loss"] == cached[0]["train_loss"]
    assert len(list((tmp_path / "caches").iterdir())) == 1


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_with_an_adapter_the_hidden_state_cache_uses_the_shared_base_head_or_its_stored_copy(
    base_config: dict[str, Any], tmp_path: Path, engine: str
) -> None:
    """Under FSDP2 and DeepSpeed the student's head is whole only inside its forward: the stored copy serves."""
    from peft import LoraConfig, get_peft_model

    from mft_plugin.teacher.cache import cache_layout
    from mft_plugin.teacher.sources import SharedBaseTeacher

    student = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    config = cache_config({**base_config, "fsdp": engine == "fsdp"}, tmp_path, layout="hidden_states")
    teacher, data, layout = SharedBaseTeacher(student), blocks(), cache_layout(config, student)
    write_cache(teacher, data, COLLATOR, tmp_path / "cache", layout)
    cache = layout.open(open_fields(tmp_path / "cache", layout.kind), student)
    if engine == "ddp":
        assert cache.shared_head is output_head(student) and cache.weight is None  # no copy of the head
    else:
        assert cache.shared_head is None and cache.weight is not None
    batch = training_batch(data, [4, 1])
    labels = shift_for_causal_lm(batch["labels"])
    online, stored = teacher.targets(batch), cache.targets(batch)
    assert torch.equal(stored.weight, online.weight)
    torch.testing.assert_close(stored.hidden, online.hidden, rtol=1e-6, atol=1e-6)
    fused = ChunkedLoss(get_objective("mft"), output_head(student), chunk_size=5)
    torch.testing.assert_close(fused(student, cache, batch, labels), fused(student, teacher, batch, labels), rtol=1e-5, atol=1e-6)
