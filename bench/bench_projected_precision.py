"""The exact caches of a LoRA run against the online teacher in float32 and in bf16 autocast, on one batch.

Issue 24 asks whether the projected cache (u = W^T p^T stored in float32) gives the online teacher's
loss in both precisions, and whether u could be stored in the compute dtype. On the shipped reference
model with a rank-8 LoRA on every linear layer (adapters moved off zero), 4 x 256 random tokens: the
MFT loss (tau 0.25) of the batch, its per-token losses and the adapters' gradients with the
hidden-state cache and the projected cache, each against the online shared-base teacher.

    OMP_NUM_THREADS=1 python bench/bench_projected_precision.py     # bench/results/projected_precision-cpu.md
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from _harness import REPO, markdown_table, write_results
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from mft_plugin import get_objective
from mft_plugin.data.batches import ROW_COLUMN, PaddingCollator
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.loss.chunked import ChunkedLoss
from mft_plugin.loss.corrected import masked_mean
from mft_plugin.models.heads import output_head
from mft_plugin.teacher.cache import open_fields, write_cache
from mft_plugin.teacher.hidden_states import HiddenStates
from mft_plugin.teacher.projected import Projected
from mft_plugin.teacher.sources import SharedBaseTeacher
from mft_plugin.teacher.stored import CacheLayout

COLLATOR = PaddingCollator(pad_token_id=0)


def loss_and_gradients(student: torch.nn.Module, source: object, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's mean MFT loss, its per-token losses and the flattened adapter gradients."""
    labels = shift_for_causal_lm(batch["labels"])
    student.zero_grad()
    losses = ChunkedLoss(get_objective("mft", tau=0.25), output_head(student))(student, source, batch, labels)
    loss = masked_mean(losses, labels)
    loss.backward()
    return loss.detach(), losses.detach(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


def main() -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(REPO / "models" / "mft-tiny-llama")
    student = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    teacher = SharedBaseTeacher(student)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 4096, (256,), generator=generator).tolist() for _ in range(4)]
    data, batch = Dataset.from_dict({"input_ids": rows}), COLLATOR([{"input_ids": r, ROW_COLUMN: i} for i, r in enumerate(rows)])
    table = []
    for precision in ("float32", "bf16 autocast"):
        bf16 = precision != "float32"
        context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        with context():
            online = loss_and_gradients(student, teacher, batch)
        layouts: dict[str, CacheLayout] = {"hidden-state cache": HiddenStates(), "projected cache": Projected()}
        for name, layout in layouts.items():
            folder = Path(tempfile.mkdtemp(prefix="mft-bench-projected-")) / "cache"
            with context():
                write_cache(teacher, data, COLLATOR, folder, layout)
                loss, losses, grads = loss_and_gradients(student, layout.open(open_fields(folder, layout.kind), student), batch)
            table.append([
                precision, name, f"{abs(loss - online[0]).item() / abs(online[0]).item():.1e}",
                f"{((losses - online[1]).abs().max() / online[1].abs().max()).item():.1e}",
                f"{((grads - online[2]).norm() / online[2].norm()).item():.1e}",
            ])  # fmt: skip
    header = ["precision", "cache", "batch loss vs online (rel)", "per-token losses (max abs / max loss)", "adapter gradients (rel norm)"]
    sections = [__doc__.split("\n\n")[1].replace("\n", " "), markdown_table(header, table)]
    write_results("projected_precision", "Exact caches in float32 and bf16 (bench/bench_projected_precision.py)", sections)


if __name__ == "__main__":
    main()
