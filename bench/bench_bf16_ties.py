"""bf16 chunk logits and the teacher's argmax (issue 22): how often rounding the head's output to
bfloat16 makes ties that flip a token between "teacher right" and "teacher wrong" (the correction
weight w of MFT depends on it), against float32 output of the same bfloat16 products, and what the
float32 output costs here. ``OMP_NUM_THREADS=1 python bench/bench_bf16_ties.py [--blocks 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.labels import shift_for_causal_lm, valid_mask
from mft_plugin.models.heads import forward_hidden, output_head
from mft_plugin.models.loading import load_model

from _harness import quickstart_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=64)
    args = parser.parse_args()
    config, tokenizer, train, _ = quickstart_datasets("/tmp/bench_ties")
    model, batch = load_model(config).eval(), PaddingCollator(tokenizer.pad_token_id)(list(train.select(range(args.blocks))))
    head = output_head(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        captured = forward_hidden(model, head, batch)
    h = captured.hidden.flatten(0, -2).to(torch.bfloat16)
    w = head.weight.detach().to(torch.bfloat16)
    labels = shift_for_causal_lm(batch["labels"]).flatten()
    keep = valid_mask(labels)
    start = time.perf_counter()
    rounded = (h @ w.T).float()
    bf16_seconds = time.perf_counter() - start
    start = time.perf_counter()
    exact = h.float() @ w.float().T
    fp32_seconds = time.perf_counter() - start
    right_rounded = rounded.argmax(1) == labels
    right_exact = exact.argmax(1) == labels
    ties = (rounded == rounded.amax(1, keepdim=True)).sum(1) > 1
    flips = (right_rounded != right_exact) & keep
    tokens = int(keep.sum())
    print(f"tokens {tokens}: ties in bf16 output {int((ties & keep).sum())} ({100 * float((ties & keep).sum()) / tokens:.2f} %), "
          f"'teacher right' flipped {int(flips.sum())} ({100 * float(flips.sum()) / tokens:.2f} %); "
          f"ties in float32 output {int(((exact == exact.amax(1, keepdim=True)).sum(1) > 1)[keep].sum())}; "
          f"head product bf16 {bf16_seconds * 1e3:.0f} ms, float32 output {fp32_seconds * 1e3:.0f} ms (CPU)")


if __name__ == "__main__":
    main()
