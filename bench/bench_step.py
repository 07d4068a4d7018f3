"""Training-step time and peak memory: MFT against plain finetuning, online teacher and teacher cache.

One step is ``MFTTrainer.compute_loss`` (the trainer's own loss path: teacher, objective, fused or
naive head) + backward + an AdamW step, on a fixed batch of random tokens. Models are built from
configs (no downloads): the shipped reference model's architecture and a larger one.

Goals (issues 6, 13): full-finetuning MFT step / FT step <= 1.40 with an online teacher (the floor is
about 1.33: one more forward against a forward + backward) and <= 1.10 with the exact (hidden-state)
teacher cache, beside its multiply-add floor and its disk size per token (and the top-64 cache's);
LoRA+MFT peak memory / LoRA+FT <= 1.10, QLoRA likewise; and how step time and memory grow with the
sequence length and the vocabulary.

    OMP_NUM_THREADS=1 python bench/bench_step.py      # CPU, a few minutes
    OMP_NUM_THREADS=1 python bench/bench_step.py --only step-time   # bench/results/step-time-cpu.md
    python bench/bench_step.py --gpu-paper-size        # on a GPU: a ~270M model in bfloat16
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _harness import REPO, device, interleaved_times, live_bytes, markdown_table, mib, peak_extra_bytes, write_results
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TrainingArguments

from mft_plugin import get_objective
from mft_plugin.loss.chunked import ChunkedLoss
from mft_plugin.models.heads import output_head
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.models.loading import keep_4bit_layout_on_cpu
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher
from mft_plugin.data.batches import ROW_COLUMN
from mft_plugin.teacher.cache import open_fields, write_cache
from mft_plugin.teacher.hidden_states import HiddenStates
from mft_plugin.teacher.projected import Projected
from mft_plugin.teacher.stored import CacheLayout
from mft_plugin.teacher.top_k import TopK
from mft_plugin.train.trainer import MFTTrainer

SHIPPED = REPO / "models" / "mft-tiny-llama"
WORK = Path(tempfile.mkdtemp(prefix="mft-bench-step-"))


@dataclass(frozen=True)
class Shape:
    """A Llama built from a config; ``batch`` x ``seq`` tokens per step."""

    name: str
    hidden: int
    layers: int
    vocab: int
    batch: int
    seq: int
    heads: int = 4
    dtype: str = "float32"  # of the weights

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.hidden * 43 // 16,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=max(self.seq, 512), tie_word_embeddings=True,
        )  # fmt: skip

    def saved(self) -> Path:
        """The model saved like a hub checkpoint (the shipped one's architecture is read from models/)."""
        folder = WORK / self.name.replace(" ", "_")
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            LlamaForCausalLM(self.config()).save_pretrained(folder)
        return folder


def load(shape: Shape, quantized: bool = False) -> torch.nn.Module:
    dtype = getattr(torch, shape.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(shape.saved(), **kwargs)
    keep_4bit_layout_on_cpu(model)
    return model


def batch(shape: Shape) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=generator)
    collated = PaddingCollator(pad_token_id=0)([{"input_ids": row.tolist(), ROW_COLUMN: i} for i, row in enumerate(ids)])
    return {key: value.to(device()) for key, value in collated.items()}


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


CACHES = {"MFT hidden cache": None, "MFT top-64 cache": 64}  # variant: top_k (None: the exact hidden states)
ADAPTER_CACHES = {"MFT hidden cache": HiddenStates, "MFT projected cache": Projected}  # LoRA+<these>: the shared base's


def cache_folder(shape: Shape, tag: str) -> Path:
    return WORK / f"cache-{shape.name.replace(' ', '_')}-{tag}"


def built_cache(shape: Shape, student: torch.nn.Module, teacher: Any, layout: CacheLayout, tag: str) -> Any:
    """The cache of the benchmark batch's blocks (built by ``teacher``, then dropped), as ``student`` reads it."""
    folder = cache_folder(shape, tag)
    if not folder.exists():
        rows = batch(shape)["input_ids"].tolist()
        write_cache(teacher, Dataset.from_dict({"input_ids": rows}), PaddingCollator(pad_token_id=0), folder, layout)
    return layout.open(open_fields(folder, layout.kind), student)


def teacher_cache(shape: Shape, model: torch.nn.Module, top_k: int | None) -> Any:
    """The full-finetuning cache, built with a frozen copy."""
    layout = TopK(top_k) if top_k is not None else HiddenStates()
    return built_cache(shape, model, FrozenCopyTeacher(copy.deepcopy(model)), layout, str(top_k or "hidden"))


def disk_bytes_per_token(shape: Shape, tag: str) -> float:
    """The cache's per-token arrays (the frozen head, a fixed V x H, excluded) over the tokens they hold."""
    files = [f for f in cache_folder(shape, tag).glob("*.npy") if not f.name.startswith("head_")]
    return sum(f.stat().st_size for f in files) / (shape.batch * shape.seq)


def exact_cache_mac_ratio(shape: Shape) -> float:
    """(FT step + the exact cache's teacher head) / FT step, in multiply-adds: the floor that any exact
    recomputation of p^T from stored hidden states has where matmuls dominate the step.

    Per token, a forward costs the head's V x H plus, per layer, the projections (4 H^2), the MLP
    (3 H I) and the attention over the sequence (about seq x H); a training step costs three forwards
    (forward, and the backward's two products); the cache adds one head product, V x H.
    """
    intermediate = shape.hidden * 43 // 16
    layer = 4 * shape.hidden**2 + 3 * shape.hidden * intermediate + shape.seq * shape.hidden
    head = shape.vocab * shape.hidden
    return 1 + head / (3 * (head + shape.layers * layer))


def trainer_step(model: torch.nn.Module, objective: str, teacher: Any, fused: bool, inputs: dict) -> Callable[[], None]:
    """One optimizer step through ``MFTTrainer.compute_loss``."""
    chosen = get_objective(objective) if objective == "ft" else get_objective(objective, tau=0.25)
    chunked = ChunkedLoss(chosen, output_head(model)) if fused else None
    args = TrainingArguments(output_dir=str(WORK / "trainer"), report_to=[], use_cpu=device().type == "cpu")
    trainer = MFTTrainer(model=model, args=args, objective=chosen, teacher=teacher, chunked_loss=chunked)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()

    def step() -> None:
        trainer.compute_loss(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def variant(shape: Shape, kind: str) -> tuple[torch.nn.Module, str, Any]:
    """(student, objective, teacher) of a named variant: FT, MFT online, MFT cache, LoRA/QLoRA +FT/+MFT."""
    adapter, _, objective = kind.partition("+")
    if adapter in ("LoRA", "QLoRA"):
        student = with_lora(load(shape, quantized=adapter == "QLoRA"))
        if objective in ADAPTER_CACHES:
            layout = ADAPTER_CACHES[objective]()
            return student, "mft", built_cache(shape, student, SharedBaseTeacher(student), layout, f"{adapter}-{layout.kind}").to(device())
        return student, objective.lower(), SharedBaseTeacher(student) if objective == "MFT" else None
    student = load(shape).to(device())
    if kind == "FT":
        return student, "ft", None
    if kind in CACHES:
        return student, "mft", teacher_cache(shape, student, CACHES[kind]).to(device())
    return student, "mft", FrozenCopyTeacher(copy.deepcopy(student))


def measure(shape: Shape, kinds: list[str], fused: bool, repeats: int) -> dict[str, dict[str, float]]:
    """Median step seconds and peak bytes of each variant: the tensors it holds (student, teacher,
    gradients, optimizer states) plus the extra bytes its step allocates at its peak."""
    steps, memory = {}, {}
    for kind in kinds:
        before = live_bytes()
        student, objective, teacher = variant(shape, kind)
        steps[kind] = trainer_step(student, objective, teacher, fused, batch(shape))
        steps[kind]()  # optimizer states exist from here on
        memory[kind] = live_bytes() - before + peak_extra_bytes(steps[kind])
    times = interleaved_times(steps, repeats, warmup=0)
    return {
        kind: {"seconds": statistics.median(times[kind]), "fastest": min(times[kind]), "bytes": memory[kind]}
        for kind in kinds
    }


def ratio(result: dict[str, dict[str, float]], a: str, b: str, key: str) -> str:
    return f"{result[a][key] / result[b][key]:.2f}"


def both_ratios(result: dict[str, dict[str, float]], a: str, b: str) -> str:
    """``a`` / ``b`` step time: of the medians, then of the fastest steps."""
    return f"{ratio(result, a, b, 'seconds')} / {ratio(result, a, b, 'fastest')}"


def step_time_section(shapes: list[Shape], repeats: int) -> str:
    """Goal 3. The caches need the chunked loss, so the naive rows (for reference) have none."""
    rows = []
    for shape in shapes:
        for fused in (True, False):
            kinds = ["FT", "MFT online", *CACHES] if fused else ["FT", "MFT online"]
            r = measure(shape, kinds, fused, repeats)
            cache = ["-"] * 6
            if fused:
                cache = [
                    f"{r['MFT hidden cache']['seconds'] * 1e3:,.0f}",
                    f"{both_ratios(r, 'MFT hidden cache', 'FT')} (<= 1.10; MACs {exact_cache_mac_ratio(shape):.2f})",
                    f"{disk_bytes_per_token(shape, 'hidden'):,.0f}", f"{r['MFT top-64 cache']['seconds'] * 1e3:,.0f}",
                    both_ratios(r, "MFT top-64 cache", "FT"), f"{disk_bytes_per_token(shape, '64'):,.0f}",
                ]  # fmt: skip
            rows.append([
                shape.name, "chunked (auto)" if fused else "naive", f"{r['FT']['seconds'] * 1e3:,.0f}",
                f"{r['MFT online']['seconds'] * 1e3:,.0f}", f"{both_ratios(r, 'MFT online', 'FT')} (<= 1.40)",
                *cache, f"{shape.batch * shape.seq / r['FT']['seconds']:,.0f}",
            ])  # fmt: skip
    header = ["model", "loss", "FT ms", "MFT online ms", "MFT online / FT", "MFT hidden cache ms", "MFT hidden cache / FT",
              "hidden cache bytes/token", "MFT top-64 cache ms", "MFT top-64 / FT", "top-64 bytes/token",
              "FT tokens/s"]  # fmt: skip
    note = ("Ratios: of the median steps / of the fastest steps (on a shared CPU one variant's steps vary by up to "
            "+-25 % from run to run; the fastest estimates its own cost). MACs: the multiply-add ratio (FT step + the "
            "teacher head product) / FT step, the floor of an exact recomputation of p^T wherever matmuls dominate "
            "the step (`exact_cache_mac_ratio`).")
    return "## Full-finetuning step time\n\n" + note + "\n\n" + markdown_table(header, rows)


def adapter_cache_section(shapes: list[Shape], repeats: int) -> str:
    """Issue 24: LoRA+MFT with the projected cache / LoRA+FT <= 1.03, beside the online teacher and the
    hidden-state cache (both the shared base's), with each cache's disk per token."""
    kinds, rows = ["LoRA+FT", "LoRA+MFT", "LoRA+MFT hidden cache", "LoRA+MFT projected cache"], []
    for shape in shapes:
        r = measure(shape, kinds, fused=True, repeats=repeats)
        rows.append([
            shape.name, f"{r['LoRA+FT']['seconds'] * 1e3:,.0f}",
            f"{r['LoRA+MFT']['seconds'] * 1e3:,.0f}", both_ratios(r, "LoRA+MFT", "LoRA+FT"),
            f"{r['LoRA+MFT hidden cache']['seconds'] * 1e3:,.0f}", both_ratios(r, "LoRA+MFT hidden cache", "LoRA+FT"),
            f"{disk_bytes_per_token(shape, 'LoRA-hidden_states'):,.0f}",
            f"{r['LoRA+MFT projected cache']['seconds'] * 1e3:,.0f}",
            f"{both_ratios(r, 'LoRA+MFT projected cache', 'LoRA+FT')} (<= 1.03)",
            f"{disk_bytes_per_token(shape, 'LoRA-projected'):,.0f}",
        ])  # fmt: skip
    header = ["model", "LoRA+FT ms", "LoRA+MFT online ms", "online / FT", "hidden cache ms", "hidden / FT",
              "hidden bytes/token", "projected cache ms", "projected / FT", "projected bytes/token"]  # fmt: skip
    note = ("Rank-8 LoRA on q/k/v/o, chunked loss; teacher = the shared base (online), or its cache. Ratios: of the "
            "median steps / of the fastest steps. The projected cache stores u = W^T p^T (float32), p^T_l and p^T_max.")
    return "## LoRA step time: the projected teacher cache\n\n" + note + "\n\n" + markdown_table(header, rows)


def adapter_memory_section(shapes: list[Shape], repeats: int) -> str:
    kinds, rows = ["LoRA+FT", "LoRA+MFT", "QLoRA+FT", "QLoRA+MFT"], []
    for shape in shapes:
        r = measure(shape, kinds, fused=True, repeats=repeats)
        rows.append([
            shape.name, *(mib(r[k]["bytes"]) for k in kinds),
            f"{ratio(r, 'LoRA+MFT', 'LoRA+FT', 'bytes')} (<= 1.10)", f"{ratio(r, 'QLoRA+MFT', 'QLoRA+FT', 'bytes')} (<= 1.10)",
            ratio(r, "LoRA+MFT", "LoRA+FT", "seconds"), ratio(r, "QLoRA+MFT", "QLoRA+FT", "seconds"),
        ])  # fmt: skip
    header = ["model", "LoRA+FT MiB", "LoRA+MFT MiB", "QLoRA+FT MiB", "QLoRA+MFT MiB", "LoRA memory ratio",
              "QLoRA memory ratio", "LoRA time ratio", "QLoRA time ratio"]  # fmt: skip
    return "## Adapter peak memory (teacher = the shared base)\n\n" + markdown_table(header, rows)


def scale_section(base: Shape, seqs: list[int], vocabs: list[int], repeats: int) -> str:
    rows = []
    grid = [(seq, base.vocab) for seq in seqs] + [(base.seq, vocab) for vocab in vocabs if vocab != base.vocab]
    for seq, vocab in grid:
        shape = Shape(f"scale s{seq} v{vocab}", base.hidden, base.layers, vocab, base.batch, seq, base.heads)
        r = measure(shape, ["FT", "MFT online"], fused=True, repeats=repeats)
        tokens, mft = shape.batch * seq, r["MFT online"]
        rows.append([
            seq, f"{vocab:,}", f"{mft['seconds'] * 1e3:,.0f}", f"{mft['seconds'] / tokens * 1e6:,.0f}", mib(mft["bytes"]),
            ratio(r, "MFT online", "FT", "seconds"), ratio(r, "MFT online", "FT", "bytes"),
        ])  # fmt: skip
    header = ["seq", "vocab", "MFT step ms", "MFT us/token", "MFT peak MiB", "MFT/FT time", "MFT/FT memory"]
    note = (f"{base.name} architecture (H = {base.hidden}, {base.layers} layers), batch {base.batch}, online teacher, "
            f"chunked loss; the sequence length varied at vocabulary {base.vocab:,}, then the vocabulary at seq {base.seq}.")
    return "## Scaling with sequence length and vocabulary\n\n" + note + "\n\n" + markdown_table(header, rows)


def arguments() -> argparse.ArgumentParser:
    """The command line (also read by ``bench/gpu_check.py``, which runs ``--gpu-paper-size --only step-time``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-paper-size", action="store_true", help="a ~270M model, batch 8 x 1024 (needs a GPU)")
    parser.add_argument("--only", choices=["step-time", "lora-cache"], help="one section, written to bench/results/<it>-*.md")
    return parser


def main() -> None:
    args = arguments().parse_args()
    shipped = Shape("shipped 4.2M (V 4k)", 256, 4, 4096, batch=4, seq=256)
    larger = Shape("larger 29M (V 32k)", 512, 4, 32768, batch=2, seq=256, heads=8)
    shapes = [shipped, larger]
    if args.gpu_paper_size:
        shapes = [Shape("paper-size 283M (V 128k)", 1024, 12, 128256, batch=8, seq=1024, heads=16, dtype="bfloat16")]
    sections = [
        (f"Medians of {args.repeats} interleaved steps; random tokens; {shapes[0].dtype} weights; AdamW over the trainable "
        "parameters. Peak memory: the variant's live tensors after a first step (weights, teacher, gradients, "
        "optimizer states) plus the extra bytes its step allocates at its peak (bench/_harness.py). "
        "The hidden cache holds the teacher's final hidden states (exact; its frozen head, V x H, not counted per "
        "token); the top-64 cache the top 64 probabilities per token."),
    ]  # fmt: skip
    if args.only != "lora-cache":
        sections.append(step_time_section(shapes, args.repeats))
    if args.only != "step-time":
        sections.append(adapter_cache_section(shapes, args.repeats))
    if args.only is None:
        sections += [
            adapter_memory_section(shapes, args.repeats),
            scale_section(Shape("small", 256, 4, 4096, batch=2, seq=256), [128, 256, 512, 1024],
                          [4096, 16384, 65536, 131072], args.repeats),
        ]  # fmt: skip
    write_results(args.only or "step", "Training-step time and memory (bench/bench_step.py)", sections)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
