"""The plugin registry: discovery, name lookup, broken and conflicting plugins, third-party strategies.

Each test builds a fresh plugin manager and registers plugin objects inline (``pm.register``);
entry points are exercised through :func:`load_entry_point_plugins` with entry point objects, and
with the example third-party distribution in ``tests/plugins/mft_example_plugin``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest
from pydantic import BaseModel, Field

from mft_plugin.config.errors import ConfigError, load_config
from mft_plugin.hookspecs import hookimpl
from mft_plugin.registry import (
    ENTRY_POINT_GROUP,
    Registry,
    UnknownStrategyError,
    collect_strategies,
    default_registry,
    load_entry_point_plugins,
    make_plugin_manager,
    strategy_listing,
)
from mft_plugin.strategies import formats as builtin_formats
from mft_plugin.strategies import objectives as builtin_objectives
from mft_plugin.strategy import Mitigation, Objective, StrategyParams
from tests.tiny import write_yaml

EXAMPLE_PLUGIN = Path(__file__).parent / "plugins" / "mft_example_plugin"
BUILTIN_OBJECTIVES = ["distill_ft", "ft", "mft", "singly_corrective"]


# ---------------------------------------------------------------- inline plugins


class EchoObjective(Objective):
    name = "echo"
    needs_teacher = False

    def label_weight(self, stats: Any) -> Any:
        return stats.p_label.new_ones(stats.p_label.shape)


class ShadowMft(EchoObjective):
    name = "mft"  # claims a built-in's name


class NoisyParams(StrategyParams):
    ratio: float = Field(0.5, gt=0.0, le=1.0)


class NoisyMitigation(Mitigation):
    name = "noisy"
    Params = NoisyParams


class LeftAdapter(Mitigation):
    name = "left_adapter"
    exclusive_group = "adapter"


class RightAdapter(Mitigation):
    name = "right_adapter"
    exclusive_group = "adapter"


def plugin(objectives: list[Any] | None = None, mitigations: list[Any] | None = None) -> object:
    """A plugin object whose hooks return the given classes."""

    class Plugin:
        if objectives is not None:

            @hookimpl
            def mft_register_objectives(self) -> list[Any]:
                return objectives

        if mitigations is not None:

            @hookimpl
            def mft_register_mitigations(self) -> list[Any]:
                return mitigations

    return Plugin()


class RaisingPlugin:
    @hookimpl
    def mft_register_objectives(self) -> list[type]:
        raise RuntimeError("boom")


def write_config(folder: Path, corpora: dict[str, Path], tail: str) -> Path:
    """A config of base_model and datasets (lines 1-3) followed by ``tail``."""
    path = folder / "config.yml"
    path.write_text(f"base_model: /nonexistent\ndatasets:\n  - path: {corpora['spec_train']}\n{tail}")
    return path


def problems(path: Path, registry: Registry, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides, registry=registry)
    return caught.value.problems


def registry_with(**plugins: object) -> Registry:
    """A registry of the built-in objectives plus the given plugins, registered under their keyword."""
    manager = make_plugin_manager()
    manager.register(builtin_objectives, name="mft-plugin")
    manager.register(builtin_formats, name="mft-plugin-formats")  # datasets: entries need their formats
    for name, obj in plugins.items():
        manager.register(obj, name=name.replace("_", "-"))
    return collect_strategies(manager)


# ---------------------------------------------------------------- lookup


def test_default_registry_has_the_builtins_from_our_distribution() -> None:
    registry = default_registry()
    assert set(BUILTIN_OBJECTIVES) <= set(registry.names("objective"))
    assert {registry.get("objective", name).distribution for name in BUILTIN_OBJECTIVES} == {"mft-plugin"}
    assert isinstance(registry.plugin_manager, pluggy.PluginManager)


def test_inline_plugin_is_found_with_its_distribution() -> None:
    registry = registry_with(echo_dist=plugin([EchoObjective]))
    entry = registry.get("objective", "echo")
    assert (entry.cls, entry.distribution, entry.kind) == (EchoObjective, "echo-dist", "objective")
    assert registry.names("objective") == sorted([*BUILTIN_OBJECTIVES, "echo"])


def test_unknown_name_lists_the_available_ones() -> None:
    registry = registry_with()
    available = "available: distill_ft, ft, mft, singly_corrective"
    with pytest.raises(UnknownStrategyError, match=rf"unknown objective 'nope'; {available}"):
        registry.get("objective", "nope")
    with pytest.raises(UnknownStrategyError, match=r"unknown mitigation 'nope'; available: \(none\)"):
        registry.get("mitigation", "nope")


def test_two_plugins_claiming_one_name_fail_only_when_selected(tmp_path: Path, corpora: dict[str, Path]) -> None:
    registry = registry_with(shadow_dist=plugin([ShadowMft]))
    both = r"\(mft-plugin and shadow-dist\); uninstall one of them"
    with pytest.raises(UnknownStrategyError, match=rf"objective 'mft' is provided by more than one plugin {both}"):
        registry.get("objective", "mft")
    assert registry.get("objective", "ft").distribution == "mft-plugin"
    assert load_config(write_config(tmp_path, corpora, "objective: ft\n"), registry=registry).objective.name == "ft"
    (problem,) = problems(write_config(tmp_path, corpora, "objective: mft\n"), registry)
    conflict = "objective 'mft' is provided by more than one plugin (mft-plugin and shadow-dist); uninstall one of them"
    assert problem.endswith(f":4: objective: {conflict}")


def test_a_third_claimant_joins_the_conflict() -> None:
    registry = registry_with(shadow_a=plugin([ShadowMft]), shadow_b=plugin([ShadowMft]))
    assert registry.conflicts[("objective", "mft")] == ["mft-plugin", "shadow-a", "shadow-b"]


# ---------------------------------------------------------------- broken plugins


def test_a_plugin_that_raises_is_recorded_and_the_others_work() -> None:
    registry = registry_with(raising_dist=RaisingPlugin(), echo_dist=plugin([EchoObjective]))
    (problem,) = registry.problems
    assert problem.distribution == "raising-dist"
    assert problem.message == "mft_register_objectives raised RuntimeError: boom"
    assert registry.get("objective", "echo").cls is EchoObjective
    assert registry.get("objective", "mft").distribution == "mft-plugin"


class NamelessObjective(Objective):
    pass


class BadParamsObjective(EchoObjective):
    name = "bad_params"
    Params = dict  # type: ignore[assignment]


class NameParams(StrategyParams):
    name: str = "x"


class NameInParamsObjective(EchoObjective):
    name = "name_in_params"
    Params = NameParams


class NotAStrategy:
    name = "not_a_strategy"
    Params = BaseModel


@pytest.mark.parametrize(
    ("returned", "strategy_name", "message"),
    [
        ([NotAStrategy], "not_a_strategy", "which is not a subclass of mft_plugin.strategy.Objective"),
        ([NoisyMitigation], "noisy", "which is not a subclass of mft_plugin.strategy.Objective"),
        (["mft"], None, "returned 'mft'"),
        ([NamelessObjective], None, "NamelessObjective has no valid `name`"),
        ([BadParamsObjective], "bad_params", "BadParamsObjective.Params must be a pydantic model"),
        ([NameInParamsObjective], "name_in_params", "may not declare a `name` field"),
        (EchoObjective, None, "mft_register_objectives must return a list"),
    ],
)
def test_a_malformed_strategy_is_recorded(returned: Any, strategy_name: str | None, message: str) -> None:
    registry = registry_with(bad_dist=plugin(returned), echo_dist=plugin([EchoObjective]))
    (problem,) = registry.problems
    assert (problem.distribution, problem.strategy_name) == ("bad-dist", strategy_name)
    assert message in problem.message
    assert registry.get("objective", "echo").cls is EchoObjective
    if strategy_name is not None:
        with pytest.raises(UnknownStrategyError, match=rf"objective '{strategy_name}' is unusable: "):
            registry.get("objective", strategy_name)


def test_entry_point_that_fails_to_import_is_reported() -> None:
    manager = make_plugin_manager()
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", ENTRY_POINT_GROUP)
    builtin = importlib.metadata.EntryPoint("builtin", "mft_plugin.strategies.objectives", ENTRY_POINT_GROUP)
    problems = load_entry_point_plugins(manager, [broken, builtin])
    assert [(p.distribution, p.message) for p in problems] == [
        ("no_such_module_xyz", "failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'")
    ]
    registry = collect_strategies(manager, problems)
    assert registry.names("objective") == BUILTIN_OBJECTIVES
    with pytest.raises(UnknownStrategyError, match="plugin no_such_module_xyz failed to load: failed to import"):
        registry.get("objective", "label_smoothed_ft")


def test_entry_point_name_clash_is_reported_not_skipped() -> None:
    manager = make_plugin_manager()
    first = importlib.metadata.EntryPoint("same", "mft_plugin.strategies.objectives", ENTRY_POINT_GROUP)
    second = importlib.metadata.EntryPoint("same", "mft_plugin.strategies.mitigations", ENTRY_POINT_GROUP)
    problems = load_entry_point_plugins(manager, [first, second, first])  # loading twice is harmless
    assert [(p.distribution, p.message) for p in problems] == [
        ("mft_plugin.strategies.mitigations", "entry point name 'same' is taken by mft_plugin.strategies.objectives")
    ]


# ---------------------------------------------------------------- mitigations from a plugin


def test_third_party_mitigations_are_validated_like_builtins(tmp_path: Path, corpora: dict[str, Path]) -> None:
    registry = registry_with(noisy_dist=plugin(mitigations=[NoisyMitigation, LeftAdapter, RightAdapter]))
    mitigations = "mitigations:\n  - name: noisy\n    ratio: 2\n  - name: noisy\n    ratoi: 0.5\n"
    path = write_config(tmp_path, corpora, mitigations)
    assert problems(path, registry) == [
        f"{path}:6: mitigations.0.ratio: Input should be less than or equal to 1 (got 2)",
        f"{path}:8: mitigations.1.ratoi: unknown key; did you mean 'ratio'?",
    ]
    path.write_text(path.read_text().replace("ratio: 2", "ratio: 1").replace("ratoi: 0.5", "ratio: 0.5"))
    config = load_config(path, registry=registry)
    assert [(m.name, m.ratio) for m in config.mitigations] == [("noisy", 1.0), ("noisy", 0.5)]
    assert len(load_config(path, ["mitigations=[noisy, left_adapter]"], registry=registry).mitigations) == 2
    assert problems(path, registry, ["mitigations=[{ratio: 0.5}]"]) == [
        "--set: mitigations: a mitigation needs a `name`; available: left_adapter, noisy, right_adapter"
    ]
    assert problems(path, registry, ["mitigations=[left_adapter, noisy, right_adapter]"]) == [
        "--set: mitigations: mitigations 'left_adapter' and 'right_adapter' cannot be combined "
        "(both are adapter methods; pick one)"
    ]


# ---------------------------------------------------------------- the example third-party package


@pytest.fixture
def example_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> importlib.metadata.Distribution:
    """The example plugin as an editable install would leave it: its source on ``sys.path`` and a
    ``.dist-info`` whose entry points are read from the package's own ``pyproject.toml``."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((EXAMPLE_PLUGIN / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    metadata = f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    (dist_info / "METADATA").write_text(metadata)
    entry_points = project["entry-points"][ENTRY_POINT_GROUP]
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN / "src"))
    (distribution,) = importlib.metadata.distributions(path=[str(tmp_path)])
    return distribution


@pytest.fixture
def example_registry(example_distribution: importlib.metadata.Distribution) -> Registry:
    manager = make_plugin_manager()
    builtin = importlib.metadata.EntryPoint("builtin", "mft_plugin.strategies.objectives", ENTRY_POINT_GROUP)
    formats = importlib.metadata.EntryPoint("formats", "mft_plugin.strategies.formats", ENTRY_POINT_GROUP)
    problems = load_entry_point_plugins(manager, [builtin, formats, *example_distribution.entry_points])
    assert problems == []
    return collect_strategies(manager, problems)


def test_example_plugin_loads_through_its_entry_point(example_registry: Registry) -> None:
    entry = example_registry.get("objective", "label_smoothed_ft")
    assert entry.distribution == "mft-example-plugin"
    rows = {row["name"]: row for row in strategy_listing(example_registry)}
    assert rows["label_smoothed_ft"]["distribution"] == "mft-example-plugin"
    assert rows["label_smoothed_ft"]["params"] == {"epsilon": 0.1}


def test_example_objective_matches_its_formula(example_registry: Registry) -> None:
    import torch

    objective = example_registry.get("objective", "label_smoothed_ft").cls(epsilon=0.2)
    student = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, -100, 6], [0, 2, -100]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if labels[b, t] == -100:
                continue
            target = torch.full((7,), 0.2 / 7, dtype=torch.float64)
            target[labels[b, t]] += 0.8
            total += -(target * torch.log_softmax(student[b, t].double(), -1)).sum().item()
            count += 1
    assert objective.loss(student, None, labels).item() == pytest.approx(total / count, rel=1e-6)


def test_example_objective_is_selected_and_validated_from_yaml(
    example_registry: Registry, tmp_path: Path, corpora: dict[str, Path]
) -> None:
    objective = "objective:\n  name: label_smoothed_ft\n  epsilon: 1.0\n  tau: 0.1\n"
    path = write_config(tmp_path, corpora, objective)
    assert problems(path, example_registry) == [
        f"{path}:6: objective.epsilon: Input should be less than 1 (got 1.0)",
        f"{path}:7: objective.tau: unknown key; allowed here: epsilon, name",
    ]
    path.write_text(path.read_text().replace("  tau: 0.1\n", "").replace("1.0", "0.3"))
    assert load_config(path, registry=example_registry).objective.epsilon == 0.3
    with pytest.raises(ConfigError, match="unknown objective 'label_smoothed_ft'"):
        load_config(path, registry=registry_with())


QA_RECORDS = [{"question": "Which licence?", "answer": "MIT."}, {"question": "Who may copy it?", "answer": "Anyone."}]


def test_example_format_masks_the_question(example_registry: Registry) -> None:
    from transformers import AutoTokenizer

    from tests.tiny import REFERENCE_MODEL

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    entry = example_registry.get("format", "question_answer")
    assert entry.distribution == "mft-example-plugin"
    row = entry.cls().tokenize(QA_RECORDS[0], tokenizer, train_on_inputs=False)
    labelled = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(row["input_ids"]) == "<s>Q: Which licence?\nA: MIT.</s>"
    assert tokenizer.decode(labelled) == "MIT.</s>"
    assert entry.cls(question_prefix="Question: ").tokenize(QA_RECORDS[0], tokenizer, True)["labels"][1:3] != [-100, -100]


def test_example_format_is_selected_and_validated_from_yaml(
    example_registry: Registry, two_step_config: dict[str, Any], tmp_path: Path
) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(record) + "\n" for record in QA_RECORDS))
    two_step_config["datasets"] = [{"path": str(qa), "type": "question_answer", "field_question": "query"}]
    path = write_yaml(tmp_path / "config.yml", two_step_config)
    assert problems(path, example_registry) == [
        f"{path}:5: datasets.0.field_question: 'query' is not a field of {qa} (its records have: answer, question)"
    ]
    with pytest.raises(ConfigError, match="unknown format 'question_answer'"):
        load_config(path, registry=registry_with())


class RunRecorder:
    """Records the run's event hooks, to show they come from the registry given to ``run``."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def mft_run_start(self, config: Any, output_dir: str) -> None:
        self.events.append(f"start {config.objective.name}")

    @hookimpl
    def mft_run_end(self, config: Any, output_dir: str, metrics: dict[str, float]) -> None:
        self.events.append(f"end {config.objective.name}")


def test_example_objective_trains(example_registry: Registry, two_step_config: dict[str, Any], tmp_path: Path) -> None:
    from mft_plugin import run

    recorder = RunRecorder()
    example_registry.plugin_manager.register(recorder)
    two_step_config["objective"] = {"name": "label_smoothed_ft", "epsilon": 0.2}
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(record) + "\n" for record in QA_RECORDS * 4))
    two_step_config["datasets"] = [{"path": str(qa), "type": "question_answer"}]  # the plugin's format too
    config = load_config(write_yaml(tmp_path / "config.yml", two_step_config), registry=example_registry)
    metrics = run(config, registry=example_registry)
    assert metrics["train_loss"] > 0 and math.isfinite(metrics["train_loss"])
    assert recorder.events == ["start label_smoothed_ft", "end label_smoothed_ft"]
    saved = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    assert saved["train_loss"] == metrics["train_loss"]
    assert "mft_example_plugin" in sys.modules
