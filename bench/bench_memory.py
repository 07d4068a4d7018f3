"""Peak training memory of MFT's teacher: LoRA+MFT against LoRA+FT, full MFT against full FT.

Paper Sec. 2, "Training cost": MFT adds a teacher. With an adapter the teacher is the student's
own base (adapters disabled), so LoRA+MFT should cost LoRA+FT plus activations; full MFT holds a
frozen copy, which ``teacher: {load_in_4bit: true}`` shrinks to ~1/8 of the linear weights.

Each configuration trains a few steps through ``mft_plugin.run`` in a process of its own (a fresh
high-water mark). Its peak is measured from the moment the model starts to load (after the data
is ready): ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak resident memory
(``VmHWM``, reset through ``/proc/self/clear_refs``; on a CPU it also counts the allocator's
retained scratch, e.g. of bitsandbytes' quantization at load time). Beside it, the bytes of all
live tensors during the second step: weights, gradients, optimizer states and the teacher. Then, on a trained model, what a cheap
teacher does to p^T: KL(p^T_float32 || p^T_cheap) per token and argmax agreement on held-out text.

    OMP_NUM_THREADS=1 python bench/bench_memory.py                      # 105M-parameter random Llama
    OMP_NUM_THREADS=1 python bench/bench_memory.py --base-model models/mft-tiny-llama
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = REPO / "models" / "mft-tiny-llama"
RUNS = {  # name -> (objective, mitigations, teacher)
    "full FT": ("ft", [], None),
    "full MFT, float32 teacher": ("mft", [], None),
    "full MFT, 4-bit teacher": ("mft", [], {"load_in_4bit": True}),
    "LoRA+FT": ("ft", ["lora"], None),
    "LoRA+MFT": ("mft", ["lora"], None),
}
COMPARISONS = [("LoRA+MFT", "LoRA+FT"), ("full MFT, 4-bit teacher", "full FT"), ("full MFT, float32 teacher", "full FT")]


def build_random_llama(folder: Path, hidden: int, layers: int, vocab: int | None = None) -> Path:
    """A randomly initialised Llama of the given width and depth with the shipped tokenizer; ``vocab``:
    a larger vocabulary than the tokenizer's (the head's size at scale; the extra ids are never input)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 43 // 16 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def training_config(base_model: str, args: argparse.Namespace, output_dir: Path, **keys: Any) -> dict[str, Any]:
    """A few steps on the legal corpus, sized by ``args``; ``keys`` name the strategies and engine."""
    return {
        "base_model": base_model,
        "datasets": [{"path": str(REPO / "data" / "legal" / "train.jsonl")}],
        "sequence_len": args.sequence_len, "micro_batch_size": args.micro_batch_size, "max_steps": args.steps,
        "save_steps": args.steps, "logging_steps": args.steps, "learning_rate": 1e-4, "output_dir": str(output_dir),
        "overwrite_output_dir": True, "seed": 0, **keys,
    }  # fmt: skip


def run_config(base_model: str, name: str, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    objective, mitigations, teacher = RUNS[name]
    config = training_config(base_model, args, output_dir, objective=objective, mitigations=mitigations)
    if teacher:
        config["teacher"] = teacher
    return config


def measure_child(config: dict[str, Any]) -> None:
    """In the child process: train, then print what :func:`measure` measured as one JSON line."""
    print(json.dumps(measure(config)))


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Train as ``config`` says, in this process; the peak memory since the model began to load, and
    the tensor bytes held during the second step (weights, gradients, optimizer states, the teacher)."""
    import torch

    from mft_plugin.train import recipe
    from mft_plugin.config.errors import validate_config

    measured: dict[str, int] = {}
    load_model = recipe.load_model

    def measured_load(*args: Any, **kwargs: Any) -> Any:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            measured["start"] = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            measured["start"] = _status_kib("VmRSS") * 1024
        return load_model(*args, **kwargs)

    class MeasuredTrainer(recipe.MFTTrainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            if self.state.global_step == 1:  # after the first optimizer step: its states exist
                measured["held"] = live_tensor_bytes()
            return loss

    recipe.load_model, recipe.MFTTrainer = measured_load, MeasuredTrainer
    recipe.run(validate_config(config))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kib("VmHWM") * 1024
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"peak": peak - measured["start"], "held": measured["held"], "device": device}


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage of the live torch tensors (quantization states included)."""
    import gc

    import torch

    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type != "meta"]
    tensors += [t.grad for t in tensors if isinstance(t, torch.nn.Parameter) and t.grad is not None]  # C++-held
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def teacher_fidelity(base_model: str, sequence_len: int) -> dict[str, tuple[float, float]]:
    """Per cheap teacher: mean KL(p^T_float32 || p^T_cheap) in nats/token and argmax agreement."""
    import torch

    from mft_plugin.config.errors import validate_config
    from mft_plugin.train.context import RecipeContext
    from mft_plugin.models.loading import load_frozen_teacher, load_model, load_tokenizer

    base = {"base_model": base_model, "datasets": [{"path": str(REPO / "data" / "legal" / "validation.jsonl")}]}
    config = validate_config({**base, "sequence_len": sequence_len})
    tokenizer = load_tokenizer(config)
    blocks = RecipeContext(config, tokenizer, Path(".")).packed_blocks(config.datasets).select(range(8))
    input_ids = torch.tensor([block for block in blocks["input_ids"] if len(block) == sequence_len][:4])
    with torch.no_grad():
        exact = load_model(config).eval()(input_ids=input_ids).logits.log_softmax(-1)
        results = {}
        for name, teacher in [("4-bit", {"load_in_4bit": True}), ("8-bit", {"load_in_8bit": True}), ("bfloat16", {"dtype": "bfloat16"})]:
            model = load_frozen_teacher(validate_config({**base, "teacher": teacher})).eval()
            cheap = model(input_ids=input_ids).logits.float().log_softmax(-1)
            kl = (exact.exp() * (exact - cheap)).sum(-1).mean().item()
            results[name] = (kl, (cheap.argmax(-1) == exact.argmax(-1)).float().mean().item())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", help="a model folder (default: a random Llama of --hidden x --layers)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        base_model = args.base_model or str(build_random_llama(Path(tmp) / "model", args.hidden, args.layers))
        results = {}
        for name in RUNS:
            config = run_config(base_model, name, args, Path(tmp) / "out")
            command = [sys.executable, __file__, "--child", json.dumps(config)]
            child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
            if child.returncode:
                sys.exit(f"{name}: failed\n{child.stderr[-3000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            results[name] = result
            print(f"{name:<26} peak {result['peak'] / 2**20:8.1f} MiB ({result['device']}),"
                  f" tensors held {result['held'] / 2**20:8.1f} MiB", flush=True)  # fmt: skip
        print()
        for name, baseline in COMPARISONS:
            ratios = [f"{key} {results[name][key] / results[baseline][key]:.3f}x "
                      f"({(results[name][key] - results[baseline][key]) / 2**20:+.1f} MiB)" for key in ("peak", "held")]  # fmt: skip
            print(f"{name} / {baseline}: " + ", ".join(ratios))
        trained = args.base_model or str(REFERENCE_MODEL)  # a random model's p^T is near-uniform: no test
        print(f"\np^T of a cheap teacher against the float32 one, {trained} on legal validation text:")
        for name, (kl, agree) in teacher_fidelity(trained, args.sequence_len).items():
            print(f"  {name:<9} KL {kl:.2e} nats/token, argmax agreement {agree:.1%}")
    return None


if __name__ == "__main__":
    main()
