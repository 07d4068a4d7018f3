"""The quickstart's two evaluations (spec and general perplexity of the shipped model, fused head),
timed: ``OMP_NUM_THREADS=1 python bench/bench_eval.py [--repeats 3]``.

Evaluation runs under ``torch.no_grad``; a full-finetuning model's head is trainable, so this is
where gradient work that ignores grad mode would show (README "Performance", issue 22). To compare
two versions, run this script with each on ``PYTHONPATH``, alternately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator

from mft_plugin.data.batches import PaddingCollator
from mft_plugin.eval.metrics import perplexity
from mft_plugin.models.heads import fusable_head
from mft_plugin.models.loading import load_model

from _harness import quickstart_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config, tokenizer, _, eval_sets = quickstart_datasets("/tmp/bench_eval")
    model = load_model(config)
    head = fusable_head(model)
    assert head.weight.requires_grad  # full finetuning: the head trains
    collate = PaddingCollator(tokenizer.pad_token_id)
    batch_size = config.eval_batch_size or config.micro_batch_size
    batches = {name: [collate(list(rows.select(range(i, min(i + batch_size, len(rows))))))
                      for i in range(0, len(rows), batch_size)] for name, rows in eval_sets.items()}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    times: list[float] = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        ppl = {name: perplexity(model, data, accelerator, head) for name, data in batches.items()}
        times.append(time.perf_counter() - start)
    sizes = {name: sum(b["input_ids"].numel() for b in data) for name, data in batches.items()}
    print(f"both evaluations ({sizes} tokens): median {statistics.median(times[1:]):.2f} s of {times[1:]}; ppl {ppl}")


if __name__ == "__main__":
    main()
