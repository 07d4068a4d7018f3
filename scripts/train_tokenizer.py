#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of the reference model models/mft-tiny-llama.

Trained with the `tokenizers` library on data/general/train.jsonl only, wrapped as
a transformers ``PreTrainedTokenizerFast`` and written with ``save_pretrained`` so
that ``AutoTokenizer.from_pretrained("models/mft-tiny-llama")`` works offline.

Conventions (also in models/mft-tiny-llama/PRETRAINING.md):

* special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, id 1), ``<pad>`` (pad, id 2);
* ``tokenizer(text)`` returns ``<s> text`` -- a bos is prepended, no eos is appended
  (``add_bos_token=True, add_eos_token=False``);
* the pretraining stream is ``<s> doc1 </s> <s> doc2 </s> ...``, i.e. every document is
  encoded with its bos and followed by an eos, documents are concatenated and cut into
  fixed-size blocks;
* byte-level: all 256 byte symbols are in the vocabulary, so any text (licences, code)
  is encodable without an unknown token; ``decode(encode(text))`` gives ``text`` back.

Usage::

    python scripts/train_tokenizer.py [--vocab-size 4096] [--out models/mft-tiny-llama]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
SPECIAL = ["<s>", "</s>", "<pad>"]


def iter_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def build_tokenizer(train_file: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(train_file), trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--train-file", type=Path, default=REPO / "data/general/train.jsonl"
    )
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-max-length", type=int, default=512)
    ap.add_argument("--out", type=Path, default=REPO / "models/mft-tiny-llama")
    args = ap.parse_args()

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = build_tokenizer(args.train_file, args.vocab_size)
    assert [raw.token_to_id(t) for t in SPECIAL] == [0, 1, 2], (
        "special tokens must be ids 0, 1, 2"
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=args.model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(args.out)

    # sanity checks on the saved files, as a user would load them
    t = AutoTokenizer.from_pretrained(args.out)
    sample = "It is a truth universally acknowledged,\n\tthat x = f(y) + 1 # café"
    ids = t(sample)["input_ids"]
    assert ids[0] == t.bos_token_id and ids[-1] != t.eos_token_id, ids
    assert t.decode(ids, skip_special_tokens=True) == sample, t.decode(
        ids, skip_special_tokens=True
    )
    assert len(t) == args.vocab_size, len(t)
    n_chars = n_tok = 0
    for i, text in enumerate(iter_texts(args.train_file)):
        if i >= 200:
            break
        n_chars += len(text)
        n_tok += len(t(text, add_special_tokens=False)["input_ids"])
    print(
        f"saved {type(t).__name__} with {len(t)} tokens to {args.out}; "
        f"bos={t.bos_token_id} eos={t.eos_token_id} pad={t.pad_token_id}; "
        f"{n_chars / n_tok:.2f} chars/token on the first 200 training documents"
    )
    print("example:", t.convert_ids_to_tokens(ids)[:16])


if __name__ == "__main__":
    main()
