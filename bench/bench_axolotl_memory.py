"""Peak memory of MFT inside ``axolotl train``: the plugin's plain loss against its chunked (fused) loss.

The plain path makes the student's and the teacher's ``[tokens, vocab]`` logits (and their softmax and
gradient); the chunked one never holds more than a chunk of them (README "Performance"). At a Llama 3
vocabulary (128,256) they dominate a small model's memory. Each run is ``axolotl train`` in a process of
its own, started from a fresh Python whose ``RUSAGE_CHILDREN`` high-water mark is then the training
process's peak resident memory (CPU; weights, optimizer states, data and the libraries included). The
two runs train the same packed rows, so their losses are printed beside the peaks.

Run it in Axolotl's environment (README "Axolotl plugin"):

    OMP_NUM_THREADS=1 python bench/bench_axolotl_memory.py                 # vocabulary 128,256
    OMP_NUM_THREADS=1 python bench/bench_axolotl_memory.py --vocab 32000
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, RESULTS, machine  # noqa: E402
from bench_memory import build_random_llama  # noqa: E402

PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def axolotl_config(base_model: Path, output_dir: Path, loss_impl: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "base_model": str(base_model),
        "datasets": [{"path": str(REPO / "data/legal/train.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(output_dir.parent / "prepared"),
        "val_set_size": 0, "sequence_len": args.sequence_len, "sample_packing": True, "attn_implementation": "sdpa",
        "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "learning_rate": 1e-3,
        "optimizer": "adamw_torch", "lr_scheduler": "constant", "logging_steps": 1, "save_strategy": "no",
        "flash_attention": False, "bf16": False, "fp16": False, "tf32": False, "seed": 0,
        "output_dir": str(output_dir), "plugins": ["mft_plugin.axolotl.MFTPlugin"],
        "objective": {"name": "mft", "tau": 0.25}, "loss_impl": loss_impl,
    }  # fmt: skip


def peak_of_axolotl_train(config: Path) -> tuple[int, list[float], str]:
    """Peak resident bytes of ``axolotl train CONFIG``, its logged losses and the plugin's startup line."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "AXOLOTL_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK, str(bin_dir / "axolotl"), "train", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"axolotl train {config} failed:\n{result.stderr[-4000:]}")
    log = result.stdout + result.stderr
    losses = [float(ast.literal_eval(entry)["loss"]) for entry in re.findall(r"\{'loss': [^}]*\}", log)]
    startup = next((line for line in log.splitlines() if "MFTPlugin active" in line), "")
    return int(result.stdout.split()[-1]) * 1024, losses, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = build_random_llama(work / "model", args.hidden, args.layers, args.vocab)
        measured = {}
        for loss_impl in ("naive", "chunked"):  # naive: the plugin's plain loss, full [tokens, vocab] logits
            config = work / f"{loss_impl}.yml"
            config.write_text(yaml.safe_dump(axolotl_config(model, work / loss_impl, loss_impl, args)), encoding="utf-8")
            measured[loss_impl] = peak_of_axolotl_train(config)
    tokens = args.micro_batch_size * args.sequence_len
    lines = [
        f"# Peak memory of `axolotl train` with the MFT plugin, plain vs chunked loss ({machine()})",
        "",
        f"Random Llama, vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers; full MFT (tau 0.25, frozen "
        f"float32 teacher); packed rows, {args.micro_batch_size} x {args.sequence_len} = {tokens:,} tokens a step, {args.steps} steps.",
        "",
        "| loss_impl | peak resident memory | losses |",
        "|---|---|---|",
    ]
    for loss_impl, (peak, losses, _) in measured.items():
        lines.append(f"| {loss_impl} | {peak / 2**20:,.1f} MiB | {', '.join(f'{loss:.4f}' for loss in losses)} |")
    naive, chunked = measured["naive"][0], measured["chunked"][0]
    lines += ["", f"chunked / naive: {chunked / naive:.3f} (saved {(naive - chunked) / 2**20:,.1f} MiB)", ""]
    lines += [f"startup line ({name}): `{startup}`" for name, (_, _, startup) in measured.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "axolotl-memory-cpu.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
