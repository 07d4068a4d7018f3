"""The built-in objectives, registered through the ``mft_plugin`` entry point like any plugin."""

from __future__ import annotations

from mft_plugin.hookspecs import hookimpl
from mft_plugin.strategies.objectives.distill_ft import DistillFinetuningObjective
from mft_plugin.strategies.objectives.ft import FinetuningObjective
from mft_plugin.strategies.objectives.mft import MinifinetuningObjective
from mft_plugin.strategies.objectives.singly_corrective import SinglyCorrectiveObjective


@hookimpl
def mft_register_objectives() -> list[type]:
    return [FinetuningObjective, DistillFinetuningObjective, SinglyCorrectiveObjective, MinifinetuningObjective]
