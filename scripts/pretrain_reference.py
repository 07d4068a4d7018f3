#!/usr/bin/env python3
"""Pretrain the small reference model models/mft-tiny-llama on the general corpus.

Minifinetuning only means something on a model that already knows a general
domain; no model hub is reachable, so this script makes one: a few-million-parameter
``LlamaForCausalLM`` pretrained from scratch on data/general/train.jsonl, on one CPU
thread, in well under an hour.

Data: every document is encoded as ``<s> text </s>`` with the tokenizer saved by
scripts/train_tokenizer.py (which must have been run first); documents are
concatenated into one stream and cut into ``--block-size`` token blocks. Each epoch
visits the blocks in a seeded random order, with the block boundaries shifted by an
epoch-dependent offset.

Evaluation (at the end, and on a subset during training): token-level perplexity on
the validation sets of the general, legal and code domains, with the validation
stream cut into non-overlapping blocks the same way; plus the perplexity of an
add-one-smoothed unigram model (token frequencies of the general training stream)
on exactly the same predicted tokens.

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
``pretraining_results.json`` and ``PRETRAINING.md`` into ``--out`` (next to the
tokenizer files), and logs progress to stdout.

Usage::

    python scripts/pretrain_reference.py --measure 5          # time 5 steps, save nothing
    python scripts/pretrain_reference.py --steps 1200         # the real run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("general", "legal", "code")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """``<s> doc1 </s> <s> doc2 </s> ...`` as one int64 tensor."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc in enc:
        ids.append(bos)
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def eval_blocks(stream: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Non-overlapping blocks covering the whole stream (the last one may be shorter)."""
    return [
        stream[i : i + block]
        for i in range(0, len(stream) - 1, block)
        if len(stream[i : i + block]) > 1
    ]


@torch.no_grad()
def evaluate(model, blocks: list[torch.Tensor], batch_size: int) -> tuple[float, int]:
    """Return (perplexity, number of predicted tokens)."""
    model.eval()
    total_nll, total_n = 0.0, 0
    full = [b for b in blocks if len(b) == len(blocks[0])]
    rest = [b for b in blocks if len(b) != len(blocks[0])]
    groups = [
        torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)
    ]
    groups += [b.unsqueeze(0) for b in rest]
    for x in groups:
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_n += x[:, 1:].numel()
    model.train()
    return math.exp(total_nll / total_n), total_n


def unigram_ppl(
    train_stream: torch.Tensor, blocks: list[torch.Tensor], vocab: int
) -> float:
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([b[1:] for b in blocks])
    return math.exp(-logp[targets].mean().item())


def lr_at(step: int, total: int, warmup: int, peak: float, final_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (
        final_frac
        + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--out", type=Path, default=REPO / "models/mft-tiny-llama")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument(
        "--measure", type=int, default=0, help="only time this many steps, save nothing"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument(
        "--eval-blocks",
        type=int,
        default=0,
        help="general-val blocks used for in-training evals (0 = all)",
    )
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="only rewrite <out>/PRETRAINING.md from <out>/pretraining_results.json",
    )
    args = ap.parse_args()
    if args.card_only:
        write_card(
            args.out / "PRETRAINING.md",
            json.loads((args.out / "pretraining_results.json").read_text()),
        )
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    import transformers
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(args.out)
    vocab = len(tok)
    log(
        f"tokenizer {type(tok).__name__} vocab={vocab} bos={tok.bos_token_id} eos={tok.eos_token_id} "
        f"pad={tok.pad_token_id}"
    )

    train_stream = token_stream(tok, read_texts(args.data / "general/train.jsonl"))
    val_streams = {
        d: token_stream(tok, read_texts(args.data / d / "validation.jsonl"))
        for d in DOMAINS
    }
    val_blocks = {d: eval_blocks(s, args.block_size) for d, s in val_streams.items()}
    log(
        f"general train stream: {len(train_stream):,} tokens; validation tokens: "
        + ", ".join(f"{d}={len(s):,}" for d, s in val_streams.items())
    )

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(
        f"LlamaForCausalLM: {n_params:,} parameters ({n_params - n_embed:,} without the tied embedding)"
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    B, T = args.batch_size, args.block_size
    gen = torch.Generator().manual_seed(args.seed)

    def epoch_batches(epoch: int):
        offset = (epoch * 97) % T
        n_blocks = (len(train_stream) - offset) // T
        blocks = train_stream[offset : offset + n_blocks * T].view(n_blocks, T)
        order = torch.randperm(n_blocks, generator=gen)
        for i in range(0, n_blocks - B + 1, B):
            yield blocks[order[i : i + B]]

    total_steps = args.measure or args.steps
    blocks_per_epoch = len(train_stream) // T
    log(
        f"training {total_steps} steps x {B} x {T} tokens = {total_steps * B * T:,} tokens "
        f"({total_steps * B / blocks_per_epoch:.2f} epochs of {blocks_per_epoch} blocks)"
    )
    model.train()
    step, epoch, history, best = 0, 0, [], None
    it = epoch_batches(epoch)
    t_train = time.time()
    loss_acc, n_acc = 0.0, 0
    while step < total_steps:
        try:
            x = next(it)
        except StopIteration:
            epoch += 1
            it = epoch_batches(epoch)
            continue
        lr = lr_at(step, total_steps, args.warmup, args.lr, args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_acc += out.loss.item()
        n_acc += 1
        if step % args.log_every == 0 or step == total_steps:
            el = time.time() - t_train
            log(
                f"step {step}/{total_steps} epoch {epoch} loss {loss_acc / n_acc:.4f} lr {lr:.2e} "
                f"gnorm {gnorm:.2f} {el / step:.2f}s/step {step * B * T / el:,.0f} tok/s "
                f"eta {el / step * (total_steps - step) / 60:.1f} min"
            )
            loss_acc, n_acc = 0.0, 0
        if (
            not args.measure
            and args.eval_every
            and (step % args.eval_every == 0 or step == total_steps)
        ):
            ppl, _ = evaluate(
                model, val_blocks["general"][: args.eval_blocks or None], B
            )
            history.append({"step": step, "general_val_ppl": ppl})
            log(f"eval step {step}: general-val perplexity {ppl:.2f}")
            if best is None or ppl < best[1]:
                best = (
                    step,
                    ppl,
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                )
    train_time = time.time() - t_train
    if best is not None and best[0] != step:
        log(
            f"restoring the checkpoint of step {best[0]} (least general-val perplexity {best[1]:.2f})"
        )
        model.load_state_dict(best[2])
    selected_step = best[0] if best is not None else step

    if args.measure:
        log(
            f"measured {train_time / total_steps:.2f} s/step with {args.threads} thread(s)"
        )
        return

    log("final evaluation")
    t_eval = time.time()
    results = {}
    for d in DOMAINS:
        ppl, n = evaluate(model, val_blocks[d], B)
        uni = unigram_ppl(train_stream, val_blocks[d], vocab)
        results[d] = {
            "model_ppl": ppl,
            "unigram_ppl": uni,
            "tokens": n,
            "bytes": sum(
                len(t.encode()) for t in read_texts(args.data / d / "validation.jsonl")
            ),
        }
        log(
            f"{d:8s} validation: model perplexity {ppl:8.2f}   unigram perplexity {uni:8.2f}   ({n:,} tokens)"
        )
    eval_time = time.time() - t_eval

    model.eval()
    prompts = [
        "It is a truth universally acknowledged, that",
        "The man who",
        "Mr. Darcy",
    ]
    samples = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out_ids = model.generate(
            ids,
            max_new_tokens=40,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=tok.pad_token_id,
        )
        samples.append(tok.decode(out_ids[0], skip_special_tokens=True))
        log(f"sample: {samples[-1]!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(args.out)
    total_time = time.time() - t_start
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]
    )
    info = {
        "command": cmd,
        "parameters": n_params,
        "parameters_without_embedding": n_params - n_embed,
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "tie_word_embeddings",
                "rms_norm_eps",
            )
        },
        "training": {
            "steps": total_steps,
            "batch_size": B,
            "block_size": T,
            "tokens_seen": total_steps * B * T,
            "train_stream_tokens": len(train_stream),
            "epochs": total_steps * B / blocks_per_epoch,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8)",
            "peak_lr": args.lr,
            "warmup_steps": args.warmup,
            "schedule": f"cosine to {args.final_lr_frac} x peak",
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "seed": args.seed,
            "torch_threads": args.threads,
            "selected_checkpoint_step": selected_step,
        },
        "wall_time_s": {
            "training": round(train_time, 1),
            "final_eval": round(eval_time, 1),
            "total": round(total_time, 1),
        },
        "eval_history": history,
        "validation": results,
        "samples": samples,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    (args.out / "pretraining_results.json").write_text(
        json.dumps(info, indent=2) + "\n"
    )
    write_card(args.out / "PRETRAINING.md", info)
    log(
        f"saved model to {args.out} (training {train_time / 60:.1f} min, total {total_time / 60:.1f} min)"
    )


def write_card(path: Path, info: dict) -> None:
    c, tr, v, w = (
        info["config"],
        info["training"],
        info["validation"],
        info["wall_time_s"],
    )

    def fmt(x):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return x
        return f"{x:,}" if isinstance(x, int) else f"{x:.3g}"

    rows = "\n".join(
        f"| {d} | {v[d]['model_ppl']:.2f} | {v[d]['unigram_ppl']:.2f} | {v[d]['tokens']:,} | {v[d]['bytes'] / 1e3:.1f} KB |"
        for d in DOMAINS
    )
    hist = "\n".join(
        f"| {h['step']} | {h['general_val_ppl']:.2f} |" for h in info["eval_history"]
    )
    samples = "\n".join(f"- `{s!r}`" for s in info["samples"])
    path.write_text(
        f"""# mft-tiny-llama: pretraining record

A {info["parameters"] / 1e6:.2f}M-parameter `LlamaForCausalLM` pretrained from scratch on the
general-domain corpus `data/general/train.jsonl` (Jane Austen's novels, *The Devil's Dictionary*,
English `fortunes`; see `data/DATA.md`). It is the reference ("unfinetuned") model for
minifinetuning experiments: it knows the general domain and is clearly worse on the legal and
code domains, which is what there is to specialize on. This file is written by
`scripts/pretrain_reference.py`; the numbers below are from the run that produced the weights
in this folder.

Load it offline:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("models/mft-tiny-llama")
model = AutoModelForCausalLM.from_pretrained("models/mft-tiny-llama")
```

## Tokenizer

Byte-level BPE, vocabulary {c["vocab_size"]}, trained with `tokenizers` on `data/general/train.jsonl`
only (`scripts/train_tokenizer.py`). Special tokens `<s>` (bos, id 0), `</s>` (eos, id 1),
`<pad>` (pad, id 2). `tokenizer(text)` prepends `<s>` and appends nothing. For pretraining
every document was encoded as `<s> text </s>`, the documents were concatenated and the stream
cut into {tr["block_size"]}-token blocks; the finetuning data should be prepared the same way.

## Model

| field | value |
| --- | --- |
"""
        + "\n".join(f"| {k} | {val} |" for k, val in c.items())
        + f"""
| parameters | {info["parameters"]:,} ({info["parameters_without_embedding"]:,} without the tied embedding) |
| dtype on disk | float32 (safetensors) |

## Training

Command (run from the repository root, after `python scripts/train_tokenizer.py`):

```
{info["command"]}
```

| field | value |
| --- | --- |
"""
        + "\n".join(f"| {k} | {fmt(val)} |" for k, val in tr.items())
        + f"""
| wall time, training (incl. the in-training evaluations) | {w["training"] / 60:.1f} min |
| wall time, final evaluation | {w["final_eval"] / 60:.1f} min |
| wall time, whole script | {w["total"] / 60:.1f} min |
| environment | {", ".join(f"{k} {val}" for k, val in info["environment"].items())} |

General-validation perplexity during training; the saved weights are those of the evaluated
step with the least general-validation perplexity (`selected_checkpoint_step`), as the paper does
for its reference checkpoints:

| step | perplexity |
| --- | --- |
{hist}

## Validation perplexities (final model)

Token-level perplexity over each domain's whole `validation.jsonl`, documents encoded as
`<s> text </s>`, concatenated, cut into non-overlapping {tr["block_size"]}-token blocks (the first token of
each block is context only). The unigram baseline uses the token frequencies of the general
training stream with add-one smoothing, scored on exactly the same predicted tokens.

| domain | model perplexity | unigram perplexity | predicted tokens | validation text |
| --- | --- | --- | --- | --- |
{rows}

## Greedy samples (repetition_penalty 1.3, 40 new tokens)

{samples}

## Rebuilding everything

```bash
python scripts/build_corpora.py --fetch     # data/ (see data/DATA.md; needs apt-get update first)
python scripts/train_tokenizer.py           # tokenizer.json, tokenizer_config.json (deterministic)
{info["command"]}   # ~30 min on one CPU thread
```

Training is seeded and single-threaded; two 12-step runs on the build machine gave bit-identical
weights. Other CPUs or library versions may differ in the last digits.
"""
    )


if __name__ == "__main__":
    main()
