"""Loss memory and time: the chunked MFT loss against the naive one and against a fused plain CE.

Every implementation starts from the same inputs, the student's final hidden states h [N, H] and
head W [V, H] (both trained) and the teacher's final hidden states and head (frozen), and runs the
loss forward and backward (dloss/dh, dloss/dW):

- naive CE:    logits = h W^T, then ``ft``'s token losses, autograd backward;
- fused CE:    ``chunked_token_losses`` with ``ft`` (no teacher): Liger-style fused linear CE;
- naive MFT:   student and teacher logits [N, V], then ``mft``'s token losses (mft_plugin.loss.corrected);
- chunked MFT: ``chunked_token_losses`` with ``mft`` and the teacher's hidden states and head.

Goals (issue 6): chunked MFT peak extra memory <= 1.2 x fused CE's and <= 25 % of naive MFT's, and
time no more than naive MFT's, at vocabularies of 32k and 128k.

    OMP_NUM_THREADS=1 python bench/bench_loss.py            # CPU: N = 1024 tokens, H = 256, float32
    python bench/bench_loss.py --tokens 16384 --hidden 2048 --dtype bfloat16   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _harness import device, interleaved_medians, markdown_table, mib, peak_extra_bytes, write_results

from mft_plugin import get_objective
from mft_plugin.loss.chunked import chunked_token_losses
from mft_plugin.models.heads import default_chunk_size
from mft_plugin.teacher.views import TeacherHead
from mft_plugin.loss.corrected import masked_mean

IMPLEMENTATIONS = ["naive CE", "fused CE", "naive MFT", "chunked MFT"]


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(shape, generator=generator) / shape[-1] ** 0.5).to(device(), dtype)  # noqa: E731
    return {
        "hidden": make(tokens, hidden).mul_(8).requires_grad_(),
        "weight": make(vocab, hidden).requires_grad_(),
        "teacher_hidden": make(tokens, hidden).mul_(8),
        "teacher_weight": make(vocab, hidden),
        "labels": torch.randint(0, vocab, (tokens,), generator=generator).to(device()),
    }


def clear_gradients(x: dict[str, torch.Tensor]) -> None:
    x["hidden"].grad = x["weight"].grad = None


def loss_steps(x: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    """Each implementation's forward and backward (into cleared gradients)."""
    ft, mft, labels = get_objective("ft"), get_objective("mft", tau=0.25), x["labels"]

    def step(token_losses: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: masked_mean(token_losses(), labels).backward()

    def naive_mft() -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
        return mft.token_losses((x["hidden"] @ x["weight"].T)[None], teacher_logits[None], labels[None])

    teacher = TeacherHead(x["teacher_hidden"], x["teacher_weight"])
    return {
        "naive CE": step(lambda: ft.token_losses((x["hidden"] @ x["weight"].T)[None], None, labels[None])),
        "fused CE": step(lambda: chunked_token_losses(x["hidden"], x["weight"], labels, ft, None)),
        "naive MFT": step(naive_mft),
        "chunked MFT": step(lambda: chunked_token_losses(x["hidden"], x["weight"], labels, mft, teacher)),
    }


def measure(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, repeats: int) -> dict[str, dict[str, float]]:
    x = inputs(tokens, hidden, vocab, dtype)
    steps, memory = loss_steps(x), {}
    for name, step in steps.items():
        clear_gradients(x)  # outside the measurement: the previous run's gradients are not this run's
        memory[name] = peak_extra_bytes(step)
    timed = {name: (lambda step=step: (clear_gradients(x), step())) for name, step in steps.items()}
    times = interleaved_medians(timed, repeats)
    return {name: {"bytes": memory[name], "seconds": times[name]} for name in IMPLEMENTATIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=16384 if gpu else 1024)
    parser.add_argument("--hidden", type=int, default=2048 if gpu else 256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if gpu else "float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    rows, ratios = [], []
    for vocab in args.vocabs:
        result = measure(args.tokens, args.hidden, vocab, dtype, args.repeats)
        rows += [[f"{vocab:,}", name, mib(r["bytes"]), f"{r['seconds'] * 1e3:,.0f}"] for name, r in result.items()]
        chunked, naive, fused = result["chunked MFT"], result["naive MFT"], result["fused CE"]
        ratios.append([
            f"{vocab:,}", f"{default_chunk_size(args.tokens, vocab, True)}",
            f"{chunked['bytes'] / fused['bytes']:.2f} (<= 1.2)", f"{chunked['bytes'] / naive['bytes']:.3f} (<= 0.25)",
            f"{chunked['seconds'] / naive['seconds']:.2f} (<= 1)", f"{fused['seconds'] / result['naive CE']['seconds']:.2f}",
        ])  # fmt: skip
    sizes = (
        f"N = {args.tokens:,} tokens, H = {args.hidden}, {args.dtype}; medians of {args.repeats} runs (after a warm-up). "
        "Peak extra memory: allocated above the live inputs during forward + backward, the gradients of h and W "
        "included (bench/_harness.py says how it is measured)."
    )
    sections = [
        sizes,
        "## Ratios\n\n" + markdown_table(
            ["vocab", "MFT chunk (tokens)", "chunked MFT / fused CE memory", "chunked MFT / naive MFT memory",
             "chunked MFT / naive MFT time", "fused CE / naive CE time"], ratios),
        "## Absolute\n\n" + markdown_table(["vocab", "loss", "peak extra MiB", "forward+backward ms"], rows),
    ]  # fmt: skip
    write_results("loss", "Loss memory and time (bench/bench_loss.py)", sections)


if __name__ == "__main__":
    main()
