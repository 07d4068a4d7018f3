"""Builders for tiny models and corpora made inside the tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = REPO / "models" / "mft-tiny-llama"
DATA = REPO / "data"


def build_tiny_model(folder: Path, seed: int = 0, max_positions: int = 128) -> Path:
    """A randomly initialised 2-layer Llama with the shipped tokenizer, saved like a hub model."""
    import torch

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(path: Path, source: Path, documents: int, field: str = "text") -> Path:
    """The first ``documents`` documents of a shipped corpus, truncated to keep tests fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as src, path.open("w") as out:
        for i, line in enumerate(src):
            if i >= documents:
                break
            out.write(json.dumps({field: json.loads(line)["text"][:1500]}) + "\n")
    return path


def write_block_corpus(path: Path, source: Path, documents: int, sequence_len: int) -> Path:
    """Raw-text documents that tokenize to exactly ``sequence_len`` tokens each (BOS, text, EOS): windows of
    a shipped corpus's tokens, decoded, kept where the text tokenizes back to that length.

    For such documents mft-run's ``completion`` (the stream cut into ``sequence_len`` blocks) and Axolotl's
    (each document cut on its own) give the same rows, in the same order: the two pipelines can then be
    compared on identical data (README "Axolotl plugin", replay).
    """
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    width = sequence_len - 2  # + BOS, + EOS
    texts: list[str] = []
    with source.open() as src:
        for line in src:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - width + 1, width):
                text = tokenizer.decode(ids[start : start + width])
                tokens = tokenizer(text)["input_ids"]
                if len(tokens) == sequence_len - 1 and tokens[-1] != tokenizer.eos_token_id and text.strip():  # mft-run skips blank ones
                    texts.append(text)
            if len(texts) >= documents:
                break
    if len(texts) < documents:
        raise ValueError(f"{source}: only {len(texts)} windows of {width} tokens tokenize back to that length")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:documents]))
    return path


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def evaluation_rows(config_dict: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The evaluation sets a run of ``config_dict`` builds (what the base perplexities are measured on)."""
    from mft_plugin.config.errors import validate_config
    from mft_plugin.models.loading import load_tokenizer
    from mft_plugin.train.context import RecipeContext
    from mft_plugin.train.recipe import build_datasets

    config = validate_config(config_dict)
    return build_datasets(config, RecipeContext(config, load_tokenizer(config), folder))[1]
