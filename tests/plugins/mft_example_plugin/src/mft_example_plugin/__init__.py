"""Example plugin: contributes the ``label_smoothed_ft`` objective through the ``mft_plugin`` hooks."""

from __future__ import annotations

from mft_example_plugin.label_smoothing import LabelSmoothedFinetuningObjective
from mft_plugin.hookspecs import hookimpl


@hookimpl
def mft_register_objectives() -> list[type]:
    return [LabelSmoothedFinetuningObjective]
