"""The built-in mitigations, registered through the ``mft_plugin`` entry point like any plugin."""

from __future__ import annotations

from mft_plugin.hookspecs import hookimpl


@hookimpl
def mft_register_mitigations() -> list[type]:
    return []
