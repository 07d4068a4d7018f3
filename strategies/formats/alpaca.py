"""``alpaca``: ``instruction``, optional ``input``, ``output`` (Axolotl's ``alpaca``, the Stanford
Alpaca prompt, or with ``type: alpaca:chat`` / ``alpaca:chatml`` / ``alpaca:phi`` Axolotl's other prompt
styles); ``jeopardy``: Axolotl's Jeopardy records in that same prompt. The prompt (BOS, system line, instruction and input) is masked unless
``train_on_inputs``; the response and its EOS are the labels. As in Axolotl, prompt and response are
tokenized separately, so the response starts on a token boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mft_plugin.strategies.formats.completion import record_text
from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# Axolotl's ``AlpacaPrompter`` styles (``type: alpaca:<style>``): system line, turn with input, turn without
STYLES: dict[str, tuple[str, str, str]] = {
    "instruct": (
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "chat": ("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi": (
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
    ),
}


class AlpacaParams(StrategyParams):
    prompt_style: Literal["instruct", "chat", "chatml", "phi"] = Field(
        "instruct", description="Axolotl's prompt style, also written as the type's suffix: type: alpaca:chat"
    )


def alpaca_prompt(instruction: str, input: str, style: str = "instruct") -> str:
    """Axolotl's ``AlpacaPrompter`` text before the response (the input block only if ``input`` is non-empty)."""
    system_format, turn, turn_no_input = STYLES[style]
    if input:
        return system_format.format(system=SYSTEM_WITH_INPUT) + turn.format(instruction=instruction, input=input)
    return system_format.format(system=SYSTEM_NO_INPUT) + turn_no_input.format(instruction=instruction)


class AlpacaFormat(DataFormat):
    name = "alpaca"
    Params = AlpacaParams
    fixed_columns = ("instruction", "output")

    def fields(self, record: Mapping[str, Any]) -> tuple[str, str, str]:
        """The record's instruction, input ("" for none) and output."""
        input = record.get("input") or ""
        if not isinstance(input, str):
            raise RecordError(f"field 'input' must be a string, got {type(input).__name__}")
        return record_text(record, "instruction"), input, record_text(record, "output")

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import tokenize_segments

        instruction, input, output = self.fields(record)
        prompt = (tokenizer.bos_token or "") + alpaca_prompt(instruction, input, self.params.prompt_style)
        return tokenize_segments(tokenizer, [(prompt, False), (output + (tokenizer.eos_token or ""), True)], train_on_inputs)


class JeopardyFormat(AlpacaFormat):
    """Axolotl's ``jeopardy``: the clue is the instruction, its category the input, and the response
    "what is <answer>" (``JeopardyPromptTokenizingStrategy``; its prompter's own template is unused there,
    so the prompt is Alpaca's)."""

    name = "jeopardy"
    fixed_columns = ("question", "category", "answer")

    def fields(self, record: Mapping[str, Any]) -> tuple[str, str, str]:
        return record_text(record, "question"), record_text(record, "category"), "what is " + record_text(record, "answer")
