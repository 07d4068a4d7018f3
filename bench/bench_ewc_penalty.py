"""EWC's penalty per optimizer step: once with its analytic gradient, against autograd in every micro-batch.

    OMP_NUM_THREADS=1 python bench/bench_ewc_penalty.py [--size 1024] [--accumulation 4]

Full finetuning of ``layers`` square weights of side ``size`` (parameter-space terms). "per
micro-batch" is the penalty as it was computed before issue 22: lambda/2 sum F (theta - theta*)^2
built and differentiated by autograd in each of the step's micro-batches, 1/accumulation each;
"once per step" is ``ewc_terms.penalty``, on the first micro-batch only. Same gradient (checked).
"""

from __future__ import annotations

import argparse

import torch

from _harness import interleaved_medians, machine
from mft_plugin.strategies.mitigations import ewc_terms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.size, args.size)) for _ in range(args.layers)]
    terms = [ewc_terms.ParameterTerm((p,), torch.rand_like(p), p.detach() + 0.1 * torch.randn_like(p)) for p in params]

    def per_micro_batch() -> None:
        for _ in range(args.accumulation):
            total = sum((t.fisher * (t.params[0].float() - t.anchor) ** 2).sum() for t in terms)
            (0.5 * 3.0 * total / args.accumulation).backward()

    def once_per_step() -> None:
        ewc_terms.penalty(3.0, terms).backward()

    for p in params:
        p.grad = None
    per_micro_batch()
    naive = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    once_per_step()
    for p, expected in zip(params, naive, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    medians = interleaved_medians({"per micro-batch": per_micro_batch, "once per step": once_per_step}, args.repeats)
    count = args.layers * args.size**2
    print(f"{machine()}; {count / 1e6:.1f}M parameters, {args.accumulation} micro-batches per step")
    for name, seconds in medians.items():
        print(f"{name:>16}: {seconds * 1e3:8.1f} ms per optimizer step")


if __name__ == "__main__":
    main()
