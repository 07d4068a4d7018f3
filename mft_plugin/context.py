"""What the core hands to a mitigation's stages: the validated config and the shared tools."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from mft_plugin.config import DatasetConfig, MFTConfigBase
from mft_plugin.data import load_all_documents, pack_documents


@dataclass
class RunContext:
    config: MFTConfigBase
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path

    def packed_blocks(self, specs: Sequence[DatasetConfig]) -> Dataset:
        """Extra data (replay, Fisher estimation) tokenized and packed exactly like the training data."""
        return pack_documents(load_all_documents(specs), self.tokenizer, self.config.sequence_len)
