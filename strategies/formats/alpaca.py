"""``alpaca``: ``instruction``, optional ``input``, ``output`` (Axolotl's ``alpaca``, the Stanford
Alpaca prompt). The prompt (BOS, system line, instruction and input) is masked unless
``train_on_inputs``; the response and its EOS are the labels. As in Axolotl, prompt and response are
tokenized separately, so the response starts on a token boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mft_plugin.strategies.formats.completion import record_text
from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
TURN_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class AlpacaParams(StrategyParams):
    pass


def alpaca_prompt(instruction: str, input: str) -> str:
    """Axolotl's ``AlpacaPrompter`` text before the response (the input block only if ``input`` is non-empty)."""
    if input:
        return SYSTEM_WITH_INPUT + TURN_WITH_INPUT.format(instruction=instruction, input=input)
    return SYSTEM_NO_INPUT + TURN_NO_INPUT.format(instruction=instruction)


class AlpacaFormat(DataFormat):
    name = "alpaca"
    Params = AlpacaParams
    fixed_columns = ("instruction", "output")

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import tokenize_segments

        instruction, output = record_text(record, "instruction"), record_text(record, "output")
        input = record.get("input") or ""
        if not isinstance(input, str):
            raise RecordError(f"field 'input' must be a string, got {type(input).__name__}")
        prompt = (tokenizer.bos_token or "") + alpaca_prompt(instruction, input)
        return tokenize_segments(tokenizer, [(prompt, False), (output + (tokenizer.eos_token or ""), True)], train_on_inputs)
