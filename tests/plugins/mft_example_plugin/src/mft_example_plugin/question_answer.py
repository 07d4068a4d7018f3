"""``question_answer``: a record ``{"question": ..., "answer": ...}`` becomes ``Q: <question>\\nA: `` (masked
unless ``train_on_inputs``) then the answer and EOS (the labels). ``prefix`` names the question key.

A data format turns one record into ``input_ids`` and ``labels``; records it cannot read raise
``RecordError`` with what is wrong, and mft-plugin adds the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class QuestionAnswerParams(StrategyParams):
    field_question: str = Field("question", description="column holding the question")
    question_prefix: str = Field("Q: ", description="text before the question")


class QuestionAnswerFormat(DataFormat):
    name = "question_answer"
    Params = QuestionAnswerParams
    column_keys = ("field_question",)
    fixed_columns = ("answer",)

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import tokenize_segments

        question, answer = record.get(self.params.field_question), record.get("answer")
        if not (isinstance(question, str) and isinstance(answer, str)):
            raise RecordError(f"question and answer must be strings, got {question!r:.40} and {answer!r:.40}")
        prompt = f"{tokenizer.bos_token or ''}{self.params.question_prefix}{question}\nA: "
        return tokenize_segments(tokenizer, [(prompt, False), (answer + (tokenizer.eos_token or ""), True)], train_on_inputs)
