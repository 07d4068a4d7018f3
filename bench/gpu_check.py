"""The checks a session runs first when a GPU is lent (issue 23, section 4), in one run, to one file.

A GPU lease is short and rare, so what needs one is prepared here and run as one command
(``bash bench/gpu_check.sh``, under 8 minutes on one H200). Each check prints its numbers and a
verdict; the file ``bench/results/gpu_check-{cuda|cpu}.md`` (or ``--out``) holds them all:

- **fused bf16 training**: a few mft-run steps of the shipped model with ``loss_impl: chunked`` and
  with ``naive``, in bf16: the same per-step losses (bf16 round-off apart);
- **QLoRA + MFT**: bitsandbytes 4-bit base, LoRA adapter, the shared base as teacher (adapters
  disabled): finite losses and a saved adapter;
- **packing**: a packed batch gives every token the loss it has when its record runs alone, with
  sdpa and (where installed) flash-attention 2; the control (attention across records) does not;
- **step-time ratios**: ``bench/bench_step.py --gpu-paper-size --only step-time`` (283M model, V 128k);
- **loss memory at V 128k**: peak extra memory of the naive MFT loss against the chunked one
  (``bench/bench_loss.py``'s measurement).

Without a GPU the CPU parts run (float32 where bf16 or 4-bit needs CUDA, small sizes), so the
script keeps working between leases: ``tests/test_gpu_check.py`` runs it so in CI. Exit status 1
if a check failed, 0 otherwise (a skipped check says why).

    bash bench/gpu_check.sh                      # on the GPU machine
    OMP_NUM_THREADS=1 python bench/gpu_check.py --out /tmp/check.md   # anywhere (CPU parts)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _harness import REPO, RESULTS, device, machine, markdown_table, mib

SHIPPED = REPO / "models" / "mft-tiny-llama"
VOCAB_128K = 128256  # Llama 3's vocabulary


@dataclass(frozen=True)
class Outcome:
    """One check's verdict (``pass``, ``FAIL`` or ``skipped``) and what was measured, in one line."""

    verdict: str
    numbers: str


def on_gpu() -> bool:
    return device().type == "cuda"


def training_config(work: Path, name: str, **keys: Any) -> dict[str, Any]:
    """A few MFT steps of the shipped model on the first legal documents; ``keys`` vary the run."""
    corpus = work / "legal.jsonl"
    if not corpus.exists():
        lines = (REPO / "data" / "legal" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    steps, sequence_len = (8, 256) if on_gpu() else (2, 64)
    return {
        "base_model": str(SHIPPED), "datasets": [{"path": str(corpus), "type": "completion"}],
        "sequence_len": sequence_len, "micro_batch_size": 4, "max_steps": steps, "save_steps": steps, "logging_steps": 1,
        "learning_rate": 1e-4, "output_dir": str(work / name), "overwrite_output_dir": True, "seed": 0,
        "objective": {"name": "mft", "tau": 0.25}, **keys,
    }  # fmt: skip


def train(config: dict[str, Any]) -> list[float]:
    """Train through ``mft_plugin.run``; the logged loss of every step."""
    from mft_plugin import run
    from mft_plugin.config.errors import validate_config

    run(validate_config(config))
    history = json.loads((Path(config["output_dir"]) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def fused_bf16_training(work: Path) -> Outcome:
    """The fused loss trains as the naive one: per-step losses within bf16 round-off (1e-2 relative)."""
    precision = {"bf16": True} if on_gpu() else {}  # bf16 autocast on a CPU is not what a GPU run does
    fused = train(training_config(work, "fused", loss_impl="chunked", **precision))
    naive = train(training_config(work, "naive", loss_impl="naive", **precision))
    worst = max(abs(f - n) / abs(n) for f, n in zip(fused, naive, strict=True))
    tolerance = 1e-2 if precision else 1e-5
    losses = ", ".join(f"{f:.4f}/{n:.4f}" for f, n in zip(fused, naive, strict=True))
    kind = "bf16" if precision else "float32"
    return Outcome("pass" if worst <= tolerance else "FAIL",
                   f"{kind}; fused/naive losses {losses}; largest relative difference {worst:.2e} (<= {tolerance:g})")  # fmt: skip


def qlora_shared_teacher(work: Path) -> Outcome:
    """bitsandbytes 4-bit QLoRA with MFT, the teacher being the shared base under ``disable_adapter()``."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return Outcome("skipped", "bitsandbytes is not installed (carry its wheel: .library/device/README.md)")
    precision = {"bf16": True} if on_gpu() else {}
    keys = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 8}
    if on_gpu():
        torch.cuda.reset_peak_memory_stats()
    losses = train(training_config(work, "qlora", **keys, **precision))
    adapter = work / "qlora" / "adapter_model.safetensors"
    peak = f"; peak {mib(torch.cuda.max_memory_allocated())} MiB" if on_gpu() else ""
    good = all(math.isfinite(loss) for loss in losses) and adapter.is_file()
    return Outcome("pass" if good else "FAIL", f"losses {', '.join(f'{x:.4f}' for x in losses)}; adapter saved: {adapter.is_file()}{peak}")


def token_losses(model: torch.nn.Module, rows: list[dict[str, list[int]]], across: bool = False) -> list[torch.Tensor]:
    """Per-token NLL at each row's labelled positions; ``across``: attention allowed across packed records."""
    from mft_plugin.data.batches import PaddingCollator, model_inputs
    from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
    from mft_plugin.loss.corrected import nll_token_losses

    batch = {key: value.to(device()) for key, value in PaddingCollator(pad_token_id=2)(rows).items()}
    if across:
        batch = {key: value for key, value in batch.items() if key != "position_ids"}
    labels = shift_for_causal_lm(batch["labels"])
    with torch.no_grad():
        losses = nll_token_losses(model(**model_inputs(batch)).logits, labels)
    return [losses[row][valid_mask(labels)[row]] for row in range(len(rows))]


def packing_against_rows_alone(work: Path) -> Outcome:
    """Packed rows (restarting position ids) give each record's own per-token losses, per attention kernel."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.import_utils import is_flash_attn_2_available

    from mft_plugin.data.packing import pack_rows

    generator = torch.Generator().manual_seed(0)
    records = [torch.randint(3, 4096, (n,), generator=generator).tolist() for n in (40, 17, 29, 11, 55, 8, 33)]
    rows = [{"input_ids": ids, "labels": ids} for ids in records]
    packed = pack_rows(rows, sequence_len=96)
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    tolerance = 5e-2 if on_gpu() else 1e-4  # bf16: other kernel shapes round differently
    kernels = ["sdpa"] + (["flash_attention_2"] if on_gpu() and is_flash_attn_2_available() else [])
    parts, good = [], True
    for kernel in kernels:
        model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=dtype, attn_implementation=kernel).to(device()).eval()
        alone = torch.cat([losses for row in rows for losses in token_losses(model, [row])])
        together = torch.cat(token_losses(model, packed))
        control = torch.cat(token_losses(model, packed, across=True))
        worst, crossing = (together - alone).abs().max().item(), (control - alone).abs().max().item()
        good &= worst <= tolerance < crossing
        parts.append(f"{kernel}: largest difference {worst:.2e} (<= {tolerance:g}), across records {crossing:.2e}")
    if "flash_attention_2" not in kernels:
        parts.append("flash-attention 2: not installed" if on_gpu() else "flash-attention 2: needs CUDA")
    return Outcome("pass" if good else "FAIL", f"{len(records)} records in {len(packed)} packed rows, {dtype}; " + "; ".join(parts))


STEP_TIME_ARGUMENTS = ["--gpu-paper-size", "--only", "step-time", "--repeats", "3"]


def step_time_ratios(work: Path) -> Outcome:
    """``bench/bench_step.py --gpu-paper-size --only step-time``; its paper-size row is quoted."""
    from bench_step import arguments

    arguments().parse_args(STEP_TIME_ARGUMENTS)  # the flags exist, on any machine
    if not on_gpu():
        return Outcome("skipped", "needs CUDA (a 283M model, 8 x 1024 tokens a step); its arguments parse")
    command = [sys.executable, str(REPO / "bench" / "bench_step.py"), *STEP_TIME_ARGUMENTS]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    table = RESULTS / "step-time-cuda.md"
    if result.returncode != 0 or not table.is_file():
        return Outcome("FAIL", f"bench_step.py exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| paper-size")]
    return Outcome("pass", f"see {table.relative_to(REPO)}; " + " ".join(rows))


def loss_memory_128k(work: Path) -> Outcome:
    """Peak extra memory of the naive MFT loss against the chunked one at V 128k (goal: chunked <= 25 %)."""
    from bench_loss import measure  # bench/ is on the path: this script runs from there

    tokens, hidden, dtype = (16384, 2048, torch.bfloat16) if on_gpu() else (128, 32, torch.float32)
    result = measure(tokens, hidden, VOCAB_128K, dtype, repeats=1)
    naive, chunked = result["naive MFT"]["bytes"], result["chunked MFT"]["bytes"]
    share = chunked / naive
    return Outcome("pass" if share <= 0.25 else "FAIL",
                   f"N {tokens} x H {hidden}, {dtype}: naive MFT {mib(naive)} MiB, chunked MFT {mib(chunked)} MiB "
                   f"({share:.3f} of naive, <= 0.25); fused CE {mib(result['fused CE']['bytes'])} MiB")  # fmt: skip


CHECKS: dict[str, Callable[[Path], Outcome]] = {
    "fused bf16 training": fused_bf16_training,
    "QLoRA + MFT, shared teacher": qlora_shared_teacher,
    "packing vs rows alone": packing_against_rows_alone,
    "step-time ratios (--gpu-paper-size)": step_time_ratios,
    "loss memory at V 128k": loss_memory_128k,
}


def run_checks(names: list[str], work: Path) -> list[list[str]]:
    """Each check in turn; one that raises is a failure with its error, and the others still run."""
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            outcome = CHECKS[name](work)
        except Exception as error:  # noqa: BLE001  (a lease is too short to stop at the first failure)
            traceback.print_exc()
            outcome = Outcome("FAIL", f"{type(error).__name__}: {error}".splitlines()[0])
        rows.append([name, outcome.verdict, f"{time.perf_counter() - start:.0f}", outcome.numbers])
        print(f"[gpu_check] {name}: {outcome.verdict}: {outcome.numbers}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results/gpu_check-{cuda|cpu}.md)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="CHECK", help="these checks alone")
    args = parser.parse_args()
    out = args.out or RESULTS / f"gpu_check-{device().type}.md"
    with tempfile.TemporaryDirectory(prefix="mft-gpu-check-") as work:
        rows = run_checks(args.only or list(CHECKS), Path(work))
    text = "\n\n".join([
        "# GPU check (bench/gpu_check.py)", f"Machine: {machine()}.",
        markdown_table(["check", "verdict", "seconds", "measured"], rows),
    ]) + "\n"  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"[gpu_check] results: {out}")
    return 1 if any(row[1] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
