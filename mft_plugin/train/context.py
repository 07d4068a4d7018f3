"""What the core hands to a mitigation's stages (the :class:`mft_plugin.strategy.RunContext` they are typed with)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from mft_plugin.config.schema import DatasetConfig, DatasetSource, MFTConfigBase
from mft_plugin.data.packing import Records, format_lookup, raw_text_blocks, records_of
from mft_plugin.registry import Registry


@dataclass
class RecipeContext:
    """The validated config, the tokenizer and the output folder, and the data formats of the registry
    that validated the config (default: the installed plugins)."""

    config: MFTConfigBase
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path
    registry: Registry | None = None

    def records(self, specs: Sequence[DatasetSource]) -> Records:
        """The tokenized records of ``datasets:``-style entries, each through its data format."""
        return records_of(specs, format_lookup(self.registry), self.tokenizer, self.config.train_on_inputs, self.config.seed)

    def packed_blocks(self, specs: Sequence[DatasetConfig]) -> Dataset:
        """Raw general-domain text (replay, Fisher estimation, general validation): concatenated and
        cut into ``sequence_len`` blocks, every token a label, whatever the specialized data's format."""
        return raw_text_blocks(specs, self.tokenizer, self.config.sequence_len, self.registry, self.config.seed)
