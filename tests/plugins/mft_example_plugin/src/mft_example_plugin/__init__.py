"""Example plugin: contributes the ``label_smoothed_ft`` objective and the ``question_answer`` data
format through the ``mft_plugin`` hooks."""

from __future__ import annotations

from mft_example_plugin.label_smoothing import LabelSmoothedFinetuningObjective
from mft_example_plugin.question_answer import QuestionAnswerFormat
from mft_plugin.hookspecs import hookimpl


@hookimpl
def mft_register_objectives() -> list[type]:
    return [LabelSmoothedFinetuningObjective]


@hookimpl
def mft_register_data_formats() -> list[type]:
    return [QuestionAnswerFormat]
