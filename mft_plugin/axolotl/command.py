"""``mft-run axolotl CONFIG.yml [ARGS...]``: ``axolotl train`` that cannot silently train without MFT.

Axolotl 0.19 loads each ``plugins:`` entry inside a ``try``: when one cannot be imported (a typo,
mft-plugin not installed in Axolotl's environment, a missing dependency) it logs the error,
drops our keys as unknown, trains plain finetuning and exits 0. This command loads every plugin
of the YAML first, exactly as Axolotl will (its own ``load_plugin``), and refuses to start unless
they all load and ``mft_plugin.axolotl.MFTPlugin`` is among them; then it runs ``axolotl train``
with the same arguments (after asking the plugin what it refuses in the config, so that a refusal is
one message and exit 2), and fails if the run ends without the ``metrics.json`` the plugin writes
when training ends (proof that the plugin ran).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mft_plugin.axolotl.bridge import PLUGIN_KEYS
from mft_plugin.train.outputs import METRICS_FILE

PLUGIN = "mft_plugin.axolotl.MFTPlugin"
AXOLOTL_DEFAULT_OUTPUT_DIR = "./model-out"  # Axolotl's default output_dir
USAGE = "usage: mft-run axolotl CONFIG.yml [axolotl train options...]"


class PluginNotLoadable(RuntimeError):
    """The YAML's plugins cannot all be loaded: ``axolotl train`` would silently skip one."""


def misspelled_keys(config_path: str, cfg: dict[str, Any]) -> list[str]:
    """Top-level keys that look like the plugin's but are not: Axolotl's schema would drop them silently."""
    problems = []
    for key in cfg.keys() - set(PLUGIN_KEYS):
        close = difflib.get_close_matches(str(key), PLUGIN_KEYS, n=1, cutoff=0.8)
        if close:
            problems.append(f"{config_path}: {key}: unknown key; did you mean {close[0]!r}? (Axolotl would ignore it)")
    return problems


def plugin_problems(config_path: str, cfg: dict[str, Any]) -> list[str]:
    """Why ``axolotl train`` would not run MFT with this config, one message per cause (none: it will)."""
    names = cfg.get("plugins") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return [f"{config_path}: plugins: must be a list of 'module.Class' names (got {names!r})"]
    if importlib.util.find_spec("axolotl") is None:
        return [f"Axolotl is not installed in this environment ({sys.executable}): pip install 'mft-plugin[axolotl]'"]
    from axolotl.integrations.base import load_plugin

    problems = []
    if PLUGIN not in names:
        close = difflib.get_close_matches(PLUGIN, names, n=1, cutoff=0.6)
        hint = f"; did you mean {PLUGIN!r} instead of {close[0]!r}?" if close else f"; add {PLUGIN!r}"
        problems.append(
            f"{config_path}: plugins: {names} does not list {PLUGIN}{hint} "
            "(without it Axolotl ignores objective:/mitigations: and trains plain finetuning)"
        )
    for name in names:
        try:
            load_plugin(name)  # what Axolotl's PluginManager.register does, without swallowing the error
        except Exception as error:  # noqa: BLE001 - every reason a plugin fails to load is reported
            problems.append(f"{config_path}: plugins: {name!r} cannot be loaded: {type(error).__name__}: {error}")
    return problems


def config_problems(config_path: str, cfg: dict[str, Any]) -> list[str]:
    """What the plugin refuses in this config, as its ``register`` hook will inside ``axolotl train``
    (the same call, on the YAML as Axolotl hands it over), asked here so that the refusal is said in
    one line per problem and exit 2, not below the two tracebacks of Axolotl's process and of
    ``accelerate launch``. Options given to ``axolotl train`` on the command line are checked there."""
    from axolotl.utils.dict import DictDefault

    from mft_plugin.axolotl.plugin import MFTPlugin
    from mft_plugin.config.errors import ConfigError

    try:
        MFTPlugin().register(DictDefault({**cfg, "axolotl_config_path": config_path}))
    except ConfigError as error:
        return error.problems
    return []


def axolotl_train(config_path: str, extra: Sequence[str]) -> int:
    """``axolotl train CONFIG [extra]`` from this environment (it runs ``accelerate launch`` from PATH)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([os.path.join(bin_dir, "axolotl"), "train", config_path, *extra], env=env, check=False).returncode


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    config_path, extra = argv[0], list(argv[1:])
    try:
        cfg = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        print(f"{config_path}: cannot be read: {error}", file=sys.stderr)
        return 2
    problems = misspelled_keys(config_path, cfg) or plugin_problems(config_path, cfg)
    if problems:
        print("mft-run axolotl: not starting, Axolotl would not run MFT:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if problems := config_problems(config_path, cfg):
        print("mft-run axolotl: not starting, invalid config:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    metrics = Path(cfg.get("output_dir") or AXOLOTL_DEFAULT_OUTPUT_DIR) / METRICS_FILE
    started = time.time()
    code = axolotl_train(config_path, extra)
    if code == 0 and not (metrics.is_file() and metrics.stat().st_mtime >= started):
        print(f"mft-run axolotl: axolotl train ended without writing {metrics}: the MFT plugin did not run", file=sys.stderr)
        return 1
    return code
