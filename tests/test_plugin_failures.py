"""Broken third-party plugins, installed for real: each is reported by its distribution name, a run
fails only if it selects the broken strategy, and ``mft-run --list`` never crashes.

The plugins are real distributions (a ``.dist-info`` with ``entry_points.txt`` beside each package)
in a folder put on the path, so discovery goes through ``importlib.metadata`` exactly as after a
``pip install``. ``tests/test_registry.py`` covers the same failures with inline plugin objects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mft_plugin.config.errors import ConfigError, load_config
from mft_plugin.train.recipe import run
from mft_plugin.registry import (
    ENTRY_POINT_GROUP,
    Registry,
    collect_strategies,
    load_entry_point_plugins,
    make_plugin_manager,
)
from tests.tiny import write_yaml

REPO = Path(__file__).resolve().parents[1]
GOOD_OBJECTIVE = """
from mft_plugin.hookspecs import hookimpl
from mft_plugin.strategy import Objective

class Halfway(Objective):
    name = "halfway"
    def label_weight(self, stats):
        return stats.p_label.new_full(stats.p_label.shape, 0.5)
"""
PLUGINS = {
    "mft-good-plugin": GOOD_OBJECTIVE
    + """
@hookimpl
def mft_register_objectives():
    return [Halfway]
""",
    "mft-raising-plugin": """
raise ImportError("needs libfoo, which is not installed")
""",
    "mft-dup-plugin": GOOD_OBJECTIVE
    + """
class Mft(Halfway):
    name = "mft"

@hookimpl
def mft_register_objectives():
    return [Mft]
""",
    "mft-malformed-plugin": """
from mft_plugin.hookspecs import hookimpl
from mft_plugin.strategy import Objective, StrategyParams

class Shiny:  # not an Objective subclass
    name = "shiny"

class UndefinedParams(StrategyParams):
    size: "NoSuchType" = None  # noqa: F821

class Undefined(Objective):
    name = "undefined"
    Params = UndefinedParams

@hookimpl
def mft_register_objectives():
    return [Shiny, Undefined]
""",
    "mft-badhook-plugin": """
from mft_plugin.hookspecs import hookimpl

@hookimpl
def mft_register_objectives(config):  # the hook takes no argument
    return []
""",
}


def install(site: Path, distribution: str, source: str) -> None:
    """A package and its ``.dist-info`` in ``site``, as pip would leave them."""
    module = distribution.replace("-", "_")
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{module}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{module} = {module}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site-packages")
    for distribution, source in PLUGINS.items():
        install(folder, distribution, source)
    return folder


@pytest.fixture(scope="module")
def registry(site: Path) -> Registry:
    """The installed plugins (our built-ins) plus the ones in ``site``, loaded through their entry points."""
    sys.path.insert(0, str(site))
    try:
        manager = make_plugin_manager()  # every installed distribution's entry points, site's included
        return collect_strategies(manager, load_entry_point_plugins(manager))
    finally:
        sys.path.remove(str(site))  # the plugin modules stay imported; nothing else needs the folder


def test_list_reports_every_broken_plugin_by_distribution_and_does_not_crash(site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "mft_plugin.cli", "--list"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[1]: line.split()[2] for line in lines if line.startswith("objective")}
    assert rows == {"distill_ft": "mft-plugin", "ft": "mft-plugin", "halfway": "mft-good-plugin",
                    "singly_corrective": "mft-plugin"}  # fmt: skip
    assert sorted(line for line in lines if not line.startswith(("objective", "mitigation", "format"))) == [
        "BROKEN      plugin mft-badhook-plugin: invalid hook implementation: Plugin 'mft_badhook_plugin' for hook "
        "'mft_register_objectives'; hookimpl definition: mft_register_objectives(config); Argument(s) {'config'} "
        "are declared in the hookimpl but can not be found in the hookspec",
        "BROKEN      plugin mft-malformed-plugin: Undefined.Params cannot be used: PydanticUndefinedAnnotation: "
        "name 'NoSuchType' is not defined",
        "BROKEN      plugin mft-malformed-plugin: returned <class 'mft_malformed_plugin.Shiny'>, which is not a "
        "subclass of mft_plugin.strategy.Objective",
        "BROKEN      plugin mft-raising-plugin: failed to import: ImportError: needs libfoo, which is not installed",
        "CONFLICT    objective 'mft' is claimed by mft-plugin and mft-dup-plugin: unusable until one is removed",
    ]


def config_selecting(objective: str, base: dict[str, Any], tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "config.yml", {**base, "objective": objective})


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ("shiny", "objective 'shiny' is unusable: plugin mft-malformed-plugin: returned <class "),
        ("undefined", "objective 'undefined' is unusable: plugin mft-malformed-plugin: Undefined.Params cannot be "
                      "used: PydanticUndefinedAnnotation: name 'NoSuchType' is not defined"),
        ("mft", "objective 'mft' is provided by more than one plugin ({}); uninstall one of them"),
        ("from_raising", "(plugin mft-raising-plugin failed to load: failed to import: ImportError: needs libfoo"),
    ],
)  # fmt: skip
def test_selecting_a_broken_strategy_fails_naming_its_distribution(
    objective: str, message: str, registry: Registry, two_step_config: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_selecting(objective, two_step_config, tmp_path), registry=registry)
    (problem,) = caught.value.problems
    assert any(
        message.format(pair) in problem for pair in ("mft-plugin and mft-dup-plugin", "mft-dup-plugin and mft-plugin")
    )


def test_a_run_that_selects_a_working_strategy_is_not_affected(
    registry: Registry, two_step_config: dict[str, Any], tmp_path: Path
) -> None:
    config = load_config(config_selecting("halfway", two_step_config, tmp_path), registry=registry)
    metrics = run(config, registry)
    assert metrics["train_loss"] > 0
