"""Minifinetuning inside ``axolotl train``: add the plugin line and our keys to an Axolotl YAML.

    plugins:
      - mft_plugin.axolotl.MFTPlugin
    objective: {name: mft, tau: 0.25}
    mitigations: [{name: ewc, datasets: [{path: data/general/train.jsonl}]}]

Axolotl keeps what it owns (loading, its ``adapter: lora`` keys, datasets and packing, its trainer);
the plugin adds what mft-run adds to finetuning: the objective's loss against the teacher,
loss-stage mitigations, and the paper's evaluation (S, DG, DG/S on ``general_eval_datasets``, the
best checkpoint, ``metrics.json``), from mft-run's own code. ``mft-run axolotl CONFIG.yml``
(:mod:`mft_plugin.axolotl.command`) refuses to start where Axolotl would silently drop the plugin.
Axolotl is an optional extra (``pip install 'mft-plugin[axolotl]'``).

``MFTPlugin`` (an Axolotl ``BasePlugin``) and ``MFTArgs`` (the pydantic model Axolotl merges
into its schema) are resolved on first use (PEP 562): Axolotl is imported only then, so that
the Axolotl-free part (:mod:`mft_plugin.axolotl.bridge`) imports and is tested without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MFTArgs", "MFTPlugin"]


def __getattr__(name: str) -> Any:
    if name == "MFTPlugin":
        from mft_plugin.axolotl.plugin import MFTPlugin

        return MFTPlugin
    if name == "MFTArgs":
        from mft_plugin.axolotl.bridge import args_model
        from mft_plugin.registry import default_registry

        model = globals()["MFTArgs"] = args_model(default_registry())  # one class per process
        return model
    raise AttributeError(f"module 'mft_plugin.axolotl' has no attribute {name!r}")
