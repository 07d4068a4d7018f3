"""Memory per rank of full MFT under each engine, measured on 2 processes (README "Scaling out").

The README's per-rank table for an 8B model is computed from the parameter count. This measures the
same accounting for real: a random Llama trains a few MFT steps (full finetuning, float32, AdamW,
frozen float32 teacher) as one plain process, then on 2 processes with DDP, DeepSpeed ZeRO-2 and
ZeRO-3 (on CPU: gloo, DeepSpeed's CPU accelerator). Each rank reports the bytes of the tensors it
holds after the first optimizer step (``bench_memory.live_tensor_bytes``: its weights, gradients,
Adam states, the teacher) and its peak memory since the model began to load; beside them, the
states predicted for Ψ parameters and N = 2 ranks (float32: 4 bytes of weights, 4 of gradients,
8 of Adam states per parameter):

    1 process, DDP   16Ψ student + 4Ψ teacher                 = 20Ψ
    ZeRO-2           4Ψ weights + (4 + 8)Ψ/N + 4Ψ teacher      = 14Ψ
    ZeRO-3           (4 + 4 + 4 + 8)Ψ/N student + 4Ψ/N teacher = 12Ψ

Under ZeRO-3, DeepSpeed 0.19 keeps a float32 master copy of each rank's weight partition
(``fp32_partitioned_groups_flat``) beside the partition itself even when the weights are float32
(ZeRO-2 does not): hence the second 4Ψ/N. With bf16 weights on GPUs it is the usual 16Ψ/N.

    OMP_NUM_THREADS=1 python bench/bench_ranks.py              # 27M-parameter random Llama
    OMP_NUM_THREADS=1 python bench/bench_ranks.py --naive-vs-fused --vocab 128256   # ZeRO-3, both losses

``--naive-vs-fused``: ZeRO-3 only, with ``loss_impl: naive`` and ``loss_impl: chunked`` (fused inside the
gathered head's forward) side by side in one run; the peak is where the [tokens, vocab] logits show.
FSDP2 is not measured: accelerate applies it to GPU processes only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from accelerate.utils.other import get_free_port
from bench_memory import build_random_llama, measure, training_config

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "yaml_examples" / "deepspeed"
MODES = {  # name -> (processes, engine keys, predicted state bytes per parameter on each rank)
    "1 process": (1, {}, 20.0),
    "DDP, 2 ranks": (2, {}, 20.0),
    "ZeRO-2, 2 ranks": (2, {"deepspeed": str(DEEPSPEED / "zero2.json")}, 4 + 12 / 2 + 4),
    "ZeRO-3, 2 ranks": (2, {"deepspeed": str(DEEPSPEED / "zero3.json")}, (4 + 4 + 4 + 8 + 4) / 2),
}
ZERO3_LOSSES = {  # --naive-vs-fused: the same ZeRO-3 run, the plain loss against the fused one
    f"ZeRO-3, 2 ranks, {loss}": (2, {"deepspeed": str(DEEPSPEED / "zero3.json"), "loss_impl": loss}, (4 + 4 + 4 + 8 + 4) / 2)
    for loss in ("naive", "chunked")
}
MFT = {"name": "mft", "tau": 0.25}


def measure_rank(config: dict[str, Any], out_dir: Path) -> None:
    """In each launched process: train, then write this rank's measurements to ``rank<R>.json``."""
    result = measure(config)
    Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))


def run_mode(processes: int, config: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """Launch ``processes`` ranks (torchrun) on ``config``; each rank's measurements."""
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(processes), "--master_port", str(get_free_port())]  # fmt: skip
    command = [*launcher, __file__, "--rank-of", json.dumps(config), str(out_dir)]
    child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if child.returncode:
        sys.exit(f"{command}: failed\n{child.stderr[-4000:]}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]


def parameter_count(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tokenizer's)")
    parser.add_argument("--naive-vs-fused", action="store_true", help="ZeRO-3 only, loss_impl naive and chunked")
    parser.add_argument("--rank-of", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        return measure_rank(json.loads(args.rank_of[0]), Path(args.rank_of[1]))
    with tempfile.TemporaryDirectory() as tmp:
        base_model = str(build_random_llama(Path(tmp) / "model", args.hidden, args.layers, args.vocab))
        psi = parameter_count(base_model)
        print(f"random Llama, {psi / 1e6:.1f}M parameters (Ψ); MiB = 2^20 bytes; per rank, the largest of the ranks\n")
        print("| mode | tensors held per rank, MiB | predicted states, MiB | held / predicted | peak per rank, MiB |")
        print("| --- | --- | --- | --- | --- |")
        for name, (processes, engine, bytes_per_parameter) in (ZERO3_LOSSES if args.naive_vs_fused else MODES).items():
            config = training_config(base_model, args, Path(tmp) / "out", objective=MFT, **engine)
            ranks = run_mode(processes, config, Path(tmp) / name.replace(" ", "_").replace(",", ""))
            held, peak = max(r["held"] for r in ranks), max(r["peak"] for r in ranks)
            predicted = bytes_per_parameter * psi
            print(f"| {name} | {held / 2**20:,.1f} | {predicted / 2**20:,.1f} ({bytes_per_parameter:g}Ψ) "
                  f"| {held / predicted:.2f} | {peak / 2**20:,.1f} |", flush=True)  # fmt: skip
    return None


if __name__ == "__main__":
    main()
