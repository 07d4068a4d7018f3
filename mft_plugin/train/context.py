"""What the core hands to a mitigation's stages (the :class:`mft_plugin.strategy.RunContext` they are typed with)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from mft_plugin.config.schema import DatasetConfig, MFTConfigBase
from mft_plugin.data.documents import load_all_documents, pack_documents


@dataclass
class RecipeContext:
    """The validated config, the tokenizer and the output folder, and packing as the recipe packs."""

    config: MFTConfigBase
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path

    def packed_blocks(self, specs: Sequence[DatasetConfig]) -> Dataset:
        """Extra data (replay, Fisher estimation) tokenized and packed exactly like the training data."""
        return pack_documents(load_all_documents(specs), self.tokenizer, self.config.sequence_len)
