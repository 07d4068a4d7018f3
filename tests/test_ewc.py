"""EWC: the Fisher and the penalty against formulas written out by hand, trainable parameters only,
and the saved Fisher reused only for the same model and data."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file

from mft_plugin import run
from mft_plugin.config.errors import validate_config
from mft_plugin.strategies.mitigations import ewc
from mft_plugin.strategies.mitigations import ewc_terms
from mft_plugin.strategies.mitigations.ewc import EWCMitigation
from mft_plugin.strategies.mitigations.ewc_terms import estimate_fisher

LAMBDA = 3.0


class ToyLM(torch.nn.Module):
    """A causal LM in miniature: frozen embedding, tanh, trainable head; returns ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(7, 3).requires_grad_(False)
        self.head = torch.nn.Linear(3, 7)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))


BLOCKS = [[1, 4, 2, 6, 3], [5, 5, 0, 2], [6, 1, 1, 3, 0, 4]]


def hand_fisher(model: ToyLM, bf16: bool = False) -> dict[str, torch.Tensor]:
    """F_i = sum over blocks of (d/d theta_i of the block's summed next-token NLL)^2, over all their
    next-token predictions; the NLL spelled out (in float32, from logits made in bf16 if ``bf16``)."""
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    for block in BLOCKS:
        ids = torch.tensor(block)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model.head(torch.tanh(model.embed.weight[ids]))  # [seq, vocab]
        logits = logits.float()
        nll = [torch.logsumexp(logits[t], 0) - logits[t, ids[t + 1]] for t in range(len(block) - 1)]
        grads = torch.autograd.grad(sum(nll), [model.head.weight, model.head.bias])
        squares["head.weight"] += grads[0] ** 2
        squares["head.bias"] += grads[1] ** 2
    tokens = sum(len(block) - 1 for block in BLOCKS)
    return {name: s / tokens for name, s in squares.items()}


@pytest.fixture
def toy_ewc(corpora: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[ToyLM, EWCMitigation]:
    model = ToyLM()
    mitigation = EWCMitigation(ewc_lambda=LAMBDA, datasets=[{"path": str(corpora["general_train"])}], fisher_samples=10)
    context = SimpleNamespace(
        config=SimpleNamespace(seed=0, bf16=False, fp16=False),
        tokenizer=SimpleNamespace(pad_token_id=0),
        packed_blocks=lambda specs: Dataset.from_dict({"input_ids": BLOCKS}),
    )
    mitigation.on_train_begin(model, context)  # type: ignore[arg-type]
    return model, mitigation


def test_fisher_matches_the_hand_computed_one(toy_ewc: tuple[ToyLM, EWCMitigation]) -> None:
    model, mitigation = toy_ewc
    expected = hand_fisher(model)
    fisher = {name: term.fisher for term, name in zip(mitigation.terms, ["head.weight", "head.bias"], strict=True)}
    assert len(mitigation.terms) == 2  # the frozen embedding takes no part
    for name, f in fisher.items():
        assert f.dtype == torch.float32 and f.abs().sum() > 0
        torch.testing.assert_close(f, expected[name])
    assert all(p.grad is None for p in model.parameters())  # estimating leaves no gradient behind


def test_penalty_is_zero_at_the_start_then_matches_the_formula(toy_ewc: tuple[ToyLM, EWCMitigation]) -> None:
    model, mitigation = toy_ewc
    penalty = mitigation.penalty(model)
    assert penalty is not None and penalty.item() == 0.0
    penalty.backward()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    fisher = hand_fisher(model)
    anchors = {"head.weight": model.head.weight.detach().clone(), "head.bias": model.head.bias.detach().clone()}
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))
        model.head.bias.add_(torch.randn_like(model.head.bias))
    deltas = {"head.weight": model.head.weight - anchors["head.weight"], "head.bias": model.head.bias - anchors["head.bias"]}
    penalty = mitigation.penalty(model)
    expected = LAMBDA / 2 * sum((fisher[n] * deltas[n] ** 2).sum() for n in fisher)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    torch.testing.assert_close(model.head.weight.grad, LAMBDA * fisher["head.weight"] * deltas["head.weight"].detach())
    torch.testing.assert_close(model.head.bias.grad, LAMBDA * fisher["head.bias"] * deltas["head.bias"].detach())


def test_no_penalty_before_train_begin(corpora: dict[str, Path]) -> None:
    assert EWCMitigation(datasets=[{"path": str(corpora["general_train"])}]).penalty(ToyLM()) is None


def test_minibatch_fisher_is_the_squared_batch_gradient_per_token() -> None:
    model = ToyLM()
    blocks = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]]})
    fisher = estimate_fisher(model, blocks, batch_size=2, pad_token_id=0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits = model(ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="sum")
    grad_bias = torch.autograd.grad(loss, model.head.bias)[0]
    torch.testing.assert_close(fisher["head.bias"], grad_bias**2 / 4)


def test_the_fisher_does_not_depend_on_the_block_length() -> None:
    """The same six next-token predictions as one block of 7 tokens or three blocks of 3 (overlapping by
    one). The toy model has no context, and every input token is distinct, so the per-token gradients
    on the embedding fall on distinct rows (uncorrelated): the per-token Fisher is then the same for
    both, where a Fisher of the mean NLL would be 3x larger for the short blocks."""
    model = ToyLM()
    model.embed.requires_grad_(True)
    long = estimate_fisher(model, Dataset.from_dict({"input_ids": [[0, 1, 2, 3, 4, 5, 6]]}), 1, pad_token_id=0)
    short = estimate_fisher(model, Dataset.from_dict({"input_ids": [[0, 1, 2], [2, 3, 4], [4, 5, 6]]}), 1, pad_token_id=0)
    assert long["embed.weight"][:6].abs().min() > 0 and not long["embed.weight"][6].any()
    torch.testing.assert_close(short["embed.weight"], long["embed.weight"], rtol=1e-6, atol=0)


# --- with the real model, adapters and the saved Fisher -----------------------------------------


def ewc_config(two_step_config: dict[str, Any], corpora: dict[str, Path], **params: Any) -> dict[str, Any]:
    spec = {"name": "ewc", "fisher_samples": 4, "datasets": [{"path": str(corpora["general_train"])}], **params}
    return {**two_step_config, "mitigations": [spec]}


def test_fisher_is_saved_and_reused_only_for_the_same_model_and_data(
    two_step_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    path = tmp_path / "fisher.safetensors"
    config = ewc_config(two_step_config, corpora, fisher_path=str(path))
    run(validate_config(config))
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata()[ewc.KEY] and handle.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    calls = []
    original = ewc_terms.estimate_fisher
    monkeypatch.setattr(ewc_terms, "estimate_fisher", lambda *args: calls.append(1) or original(*args))
    run(validate_config({**config, "overwrite_output_dir": True, "mitigations": [{**config["mitigations"][0], "ewc_lambda": 5.0}]}))
    assert calls == []  # same base, data and starting parameters: loaded
    with caplog.at_level(logging.WARNING):
        run(validate_config({**config, "overwrite_output_dir": True, "mitigations": [{**config["mitigations"][0], "fisher_samples": 3}]}))
    assert calls == [1] and "recomputing" in caplog.text
    lora = {**config, "overwrite_output_dir": True, "mitigations": ["lora", config["mitigations"][0]]}
    run(validate_config(lora))
    with safe_open(str(path), framework="pt") as handle:  # with an adapter: its parameters only
        assert set(handle.keys()) != names and all("lora_" in name for name in handle.keys())  # noqa: SIM118


# --- LoRA pairs, once per optimizer step, in the run's precision (issue 22) ----------------------


def lora_toy() -> tuple[ToyLM, ToyLM]:
    """The toy LM with LoRA (r 2, scaling 2) on its head, as peft starts it (B = 0), and its plain copy."""
    from peft import LoraConfig, inject_adapter_in_model

    plain = ToyLM()
    adapted = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["head"]), ToyLM())
    adapted.head.base_layer.bias.requires_grad_(False)
    return adapted, plain


def toy_context(bf16: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(seed=0, bf16=bf16, fp16=False),
        tokenizer=SimpleNamespace(pad_token_id=0),
        packed_blocks=lambda specs: Dataset.from_dict({"input_ids": BLOCKS}),
    )


def naive_pair_penalty(model: torch.nn.Module, anchors: tuple[torch.Tensor, torch.Tensor], fisher: torch.Tensor) -> torch.Tensor:
    """lambda/2 sum F_W (s (B A - B* A*))^2 for the head's LoRA pair, written out, through autograd."""
    a, b, scale = model.head.lora_A["default"].weight, model.head.lora_B["default"].weight, model.head.scaling["default"]
    delta = scale * (b @ a - anchors[1] @ anchors[0])
    return LAMBDA / 2 * (fisher * delta**2).sum()


def test_lora_pairs_take_the_fisher_of_their_layer_weight_and_regularize_a(corpora: dict[str, Path]) -> None:
    """At the start B = 0, so A has no gradient and its own Fisher would be 0: A would never be held.
    The pair is held through its weight delta, with the Fisher that full finetuning takes for the head."""
    model, plain = lora_toy()
    mitigation = EWCMitigation(ewc_lambda=LAMBDA, datasets=[{"path": str(corpora["general_train"])}], fisher_samples=10)
    mitigation.on_train_begin(model, toy_context())  # type: ignore[arg-type]
    (term,) = mitigation.terms
    assert isinstance(term, ewc_terms.PairTerm)
    torch.testing.assert_close(term.fisher, hand_fisher(plain)["head.weight"])  # B = 0: the layer weight is the base's
    a, b = model.head.lora_A["default"].weight, model.head.lora_B["default"].weight
    anchors = (a.detach().clone(), b.detach().clone())
    with torch.no_grad():
        a.add_(torch.randn_like(a))
        b.add_(torch.randn_like(b))
    naive = naive_pair_penalty(model, anchors, term.fisher)
    naive_grads = torch.autograd.grad(naive, [a, b])
    penalty = mitigation.penalty(model)
    torch.testing.assert_close(penalty, naive)
    penalty.backward()
    torch.testing.assert_close(a.grad, naive_grads[0])
    torch.testing.assert_close(b.grad, naive_grads[1])
    assert a.grad.abs().min() > 0  # A is held too


def test_the_fisher_is_computed_in_the_run_s_precision(corpora: dict[str, Path]) -> None:
    """Under ``bf16`` the Trainer's forward runs in bf16 autocast; the Fisher must be of that model."""
    model = ToyLM()
    mitigation = EWCMitigation(ewc_lambda=LAMBDA, datasets=[{"path": str(corpora["general_train"])}], fisher_samples=10)
    mitigation.on_train_begin(model, toy_context(bf16=True))  # type: ignore[arg-type]
    in_autocast, in_float32 = hand_fisher(model, bf16=True), hand_fisher(model)
    fisher = mitigation.terms[0].fisher
    torch.testing.assert_close(fisher, in_autocast["head.weight"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(fisher, in_float32["head.weight"], rtol=1e-3, atol=0)  # guard: the precision shows


def naive_penalty(mitigation: EWCMitigation) -> torch.Tensor:
    """lambda/2 sum F Delta^2 over every term, written out and differentiated by autograd."""
    total = 0.0
    for term in mitigation.terms:
        if isinstance(term, ewc_terms.PairTerm):
            (a, b), (a0, b0) = term.params, term.anchors
            delta = term.scale * (b.float() @ a.float() - b0 @ a0)
        else:
            delta = term.params[0].float() - term.anchor
        total = total + (term.fisher * delta**2).sum()
    return 0.5 * mitigation.params.ewc_lambda * total


def test_the_penalty_counts_once_per_optimizer_step_as_its_share_in_every_micro_batch(
    two_step_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA + EWC with 2 micro-batches per step: the penalty is computed once per step (not per
    micro-batch), and the run ends with the weights of the naive one, where every micro-batch adds
    1/2 of the penalty through autograd."""
    from mft_plugin.train.trainer import MFTTrainer

    config = ewc_config(two_step_config, corpora, ewc_lambda=1e7)
    config.update(mitigations=["lora", config["mitigations"][0]], micro_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    values: list[float] = []
    original = ewc_terms.penalty
    monkeypatch.setattr(ewc_terms, "penalty", lambda *args: (value := original(*args), values.append(value.item()))[0])
    run(validate_config({**config, "output_dir": str(tmp_path / "once")}))
    assert len(values) == 3 and values[0] == 0.0 and values[-1] > 0.01  # one per step; it bites from step 2 on

    def every_micro_batch(self: MFTTrainer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {m.name: naive_penalty(m) / self.current_gradient_accumulation_steps for m in self.mitigations if getattr(m, "terms", None)}

    monkeypatch.setattr(MFTTrainer, "_penalties", every_micro_batch)
    run(validate_config({**config, "output_dir": str(tmp_path / "naive")}))
    once, naive = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("once", "naive"))
    assert once.keys() == naive.keys()
    for name in once:
        torch.testing.assert_close(once[name], naive[name], rtol=1e-5, atol=1e-7)
