"""The built-in mitigations, registered through the ``mft_plugin`` entry point like any plugin."""

from __future__ import annotations

from mft_plugin.hookspecs import hookimpl
from mft_plugin.strategies.mitigations.ewc import EWCMitigation
from mft_plugin.strategies.mitigations.peft_adapters import DoraAdapter, IA3Adapter, LoraAdapter
from mft_plugin.strategies.mitigations.replay import ReplayMitigation


@hookimpl
def mft_register_mitigations() -> list[type]:
    return [ReplayMitigation, LoraAdapter, DoraAdapter, IA3Adapter, EWCMitigation]
