"""The teacher caches against the online teacher on the quickstart: per-step losses and final metrics.

The hidden-state cache (``teacher_cache: {}``) recomputes p^T from the teacher's stored final hidden
states and its frozen head: it must train exactly as the online teacher does (per-step training
losses and final S, DG within a relative 1e-5 in float32). The top-k cache keeps p^T_l, p^T_max and
the top k probabilities exactly and gives the rest of the mass to the other tokens in the student's
own proportions: its cost shows in DG. This runs the quickstart (the shipped reference model
minifinetuned on the legal corpus, evaluated on the legal and general validation sets; paper Sec. 3.1
metrics), logging every step, with the online teacher and each cache.

    OMP_NUM_THREADS=1 python bench/bench_cache_quality.py                  # float32: online, hidden, top-64
    OMP_NUM_THREADS=1 python bench/bench_cache_quality.py --bf16           # the same in bf16 autocast
    OMP_NUM_THREADS=1 python bench/bench_cache_quality.py --top-k 16 256   # other top-k caches (none: --top-k)
    OMP_NUM_THREADS=1 python bench/bench_cache_quality.py --example lora_mft.yml --top-k   # LoRA+MFT: + projected

With an adapter example the projected cache (issue 24: u = W^T p^T, p^T_l, p^T_max per token) joins the
comparison; results then go to ``cache_quality-<example>[-bf16]-*.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from _harness import REPO, markdown_table, mib, write_results

from mft_plugin import run
from mft_plugin.config.errors import read_yaml, validate_config

QUICKSTART = REPO / "yaml_examples" / "quickstart.yml"
ADAPTERS = ("lora", "dora", "ia3")  # the examples' adapter mitigations: the teacher is the shared base
METRICS = ("eval_spec_ppl", "eval_general_ppl", "eval_S", "eval_DG", "eval_DG/S")


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def step_losses(output_dir: Path) -> list[float]:
    """The training loss logged at every step (``logging_steps: 1``), from ``trainer_state.json``."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def run_variant(data: dict[str, Any], cache: dict[str, Any] | None, work: Path, bf16: bool, steps: int) -> dict[str, Any]:
    """The example's final metrics and per-step losses, online (``cache`` None) or with ``teacher_cache: cache``."""
    name = "online" if cache is None else "cache-" + "-".join(f"{k}-{v}" for k, v in cache.items())
    data = {key: value for key, value in data.items() if key != "teacher_cache"}
    config = {**data, "base_model": str(REPO / data["base_model"]), "output_dir": str(work / name), "logging_steps": 1, "bf16": bf16}
    if steps != data["max_steps"]:
        config.update(max_steps=steps, eval_steps=steps, save_steps=steps, warmup_steps=min(data["warmup_steps"], steps // 2))
    for key in ("datasets", "test_datasets", "general_eval_datasets"):
        config[key] = [{**spec, "path": str(REPO / spec["path"])} for spec in data[key]]
    if cache is not None:
        config["teacher_cache"] = {**cache, "path": str(work / name / "teacher_cache")}
    metrics = run(validate_config(config))
    cache_bytes = folder_bytes(work / name / "teacher_cache") if cache is not None else 0
    return {**metrics, "losses": step_losses(work / name), "cache_bytes": cache_bytes}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, nargs="*", default=[64], help="top-k caches to compare too")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (results in cache_quality-bf16-*.md)")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten the example (default: as it is)")
    parser.add_argument("--example", default=QUICKSTART.name, help="a yaml_examples/ file (default: the quickstart)")
    args = parser.parse_args()
    example = QUICKSTART.parent / args.example
    data, _ = read_yaml(example)
    steps = args.max_steps or data["max_steps"]
    variants = [("online", None), ("hidden-state cache (exact)", {"layout": "hidden_states"})]
    if data.get("mitigations") and any(m.get("name") in ADAPTERS for m in data["mitigations"] if isinstance(m, dict)):
        variants.append(("projected cache (exact)", {"layout": "projected"}))
    variants += [(f"top-{k} cache", {"top_k": k}) for k in args.top_k]
    with tempfile.TemporaryDirectory(prefix="mft-bench-cache-") as folder:
        results = {label: run_variant(data, cache, Path(folder), args.bf16, steps) for label, cache in variants}
    online = results["online"]
    rows = []
    for label, r in results.items():
        loss_gap = max(relative(a, b) for a, b in zip(r["losses"], online["losses"], strict=True))
        metric_gap = max(relative(r[m], online[m]) for m in METRICS)
        rows.append([
            label, f"{r['eval_S']:.6f}", f"{r['eval_DG']:.6f}", f"{r['eval_DG/S']:.4f}", f"{loss_gap:.1e}",
            f"{metric_gap:.1e}", f"{r['train_runtime']:.0f}", mib(r["cache_bytes"]) if r["cache_bytes"] else "-",
        ])  # fmt: skip
    precision = "bf16 autocast" if args.bf16 else "float32"
    sections = [
        (f"yaml_examples/{example.name} ({steps} steps, seq {data['sequence_len']}, batch "
        f"{data['micro_batch_size']}, tau {data['objective']['tau']}, logging every step) on the shipped reference "
        f"model, {precision}; S, DG, DG/S of the best checkpoint (by specialized perplexity), as `mft-run` reports "
        "them. Per-step loss: the largest relative difference of a step's logged training loss from the online "
        f"teacher's ({len(online['losses'])} steps); final metrics: the largest relative difference over "
        f"{', '.join(METRICS)}. Train time includes building the cache."),
        markdown_table(["teacher", "S", "DG", "DG/S", "per-step loss vs online", "final metrics vs online", "train s",
                        "cache MiB"], rows),  # fmt: skip
    ]
    name = "cache_quality" + ("" if example == QUICKSTART else f"-{example.stem}") + ("-bf16" if args.bf16 else "")
    write_results(name, "Teacher caches against the online teacher (bench/bench_cache_quality.py)", sections)


if __name__ == "__main__":
    main()
