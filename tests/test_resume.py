"""Nothing is lost: killed runs resume to the same result, signals save first, caches are never stale.

The end-to-end tests train the tiny random Llama for 10 steps (a checkpoint every 2) and compare
with one uninterrupted run of the same config and seed: the last checkpoint's weights, the final
(best) model, the per-step training losses and the evaluation metrics must all match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mft_plugin.train.checkpoints import CheckpointError, is_complete, MANIFEST, resume_target
from mft_plugin.cli import main
from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.train.signals import StopOnSignal, TrainingInterrupted
from mft_plugin.files import atomic_path, atomic_write_text
from mft_plugin.train.outputs import load_base_perplexities, save_base_perplexities
from mft_plugin.train.preflight import preflight
from mft_plugin.train.recipe import run
from mft_plugin.train.trainer import MFTTrainer
from tests.tiny import evaluation_rows, write_yaml

STEPS, SAVE_EVERY = 10, 2
# Describe the steps run by the last (re)start only, as the Trainer defines them (README "Errors and recovery").
PER_CALL_METRICS = {"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
REPO = Path(__file__).resolve().parents[1]

# A run whose steps take a while, so that a signal from outside lands in the middle of training.
SLOW_RUN = """
import sys, time
from mft_plugin.train.trainer import MFTTrainer
step = MFTTrainer.training_step
def slow_step(self, *args, **kwargs):
    time.sleep(0.4)
    return step(self, *args, **kwargs)
MFTTrainer.training_step = slow_step
from mft_plugin.cli import main
sys.exit(main([sys.argv[1]]))
"""

# A run that SIGKILLs itself while writing checkpoint-<argv[2]>: weights and optimizer are on disk,
# the RNG states and trainer_state.json are not.
KILLED_WHILE_SAVING = """
import os, signal, sys
from transformers import Trainer
save_rng_state = Trainer._save_rng_state
def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)
Trainer._save_rng_state = save_rng_state_or_die
from mft_plugin.cli import main
sys.exit(main([sys.argv[1]]))
"""


def resume_config(base_config: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    return {**base_config, "max_steps": STEPS, "save_steps": SAVE_EVERY, "eval_steps": SAVE_EVERY,
            "output_dir": str(output_dir)}  # fmt: skip


_REFERENCE: dict[str, Path] = {}  # one uninterrupted run per session (base_config is function-scoped)


@pytest.fixture
def reference(base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one uninterrupted run."""
    if "run" not in _REFERENCE:
        folder = tmp_path_factory.mktemp("reference")
        config = resume_config(base_config, folder / "out")
        assert main([str(write_yaml(folder / "config.yml", config))]) == 0
        _REFERENCE["run"] = folder / "out"
    return _REFERENCE["run"]


@pytest.fixture
def config(base_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return resume_config(base_config, tmp_path / "out")


def resume(config: dict[str, Any], tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "resume.yml", {**config, "resume_from_checkpoint": True})
    assert main([str(path)]) == 0


def step_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def assert_same_run(output_dir: Path, reference: Path) -> None:
    """Same last-checkpoint and final weights, per-step losses and metrics as the uninterrupted run."""
    for weights in (Path(f"checkpoint-{STEPS}") / "model.safetensors", Path("model.safetensors")):
        ours, theirs = load_file(output_dir / weights), load_file(reference / weights)
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{weights}: {name}")
    assert step_losses(output_dir) == pytest.approx(step_losses(reference), rel=1e-5)
    assert len(step_losses(output_dir)) == STEPS
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (output_dir, reference))
    assert metrics.keys() == expected.keys()
    for key in expected.keys() - PER_CALL_METRICS:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before the test could act:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def completed_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if is_complete(p))


# ---------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(
    config: dict[str, Any], reference: Path, tmp_path: Path
) -> None:
    output_dir = Path(config["output_dir"])
    process = start(SLOW_RUN, str(write_yaml(tmp_path / "config.yml", config)))
    wait_for(lambda: (output_dir / "checkpoint-4" / MANIFEST).exists(), process)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (output_dir / "metrics.json").exists()
    assert max(completed_steps(output_dir)) < STEPS  # killed in the middle, not after the end

    resume(config, tmp_path)
    assert_same_run(output_dir, reference)


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_checkpoint_that_looks_complete(
    config: dict[str, Any], reference: Path, tmp_path: Path
) -> None:
    output_dir = Path(config["output_dir"])
    process = start(KILLED_WHILE_SAVING, str(write_yaml(tmp_path / "config.yml", config)), "6")
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    half_written = output_dir / "checkpoint-6"
    assert (half_written / "model.safetensors").exists() and not is_complete(half_written)
    assert completed_steps(output_dir) == [2, 4]

    resume(config, tmp_path)  # from checkpoint-4; the half-written one is moved aside, not used
    assert (output_dir / "incomplete-checkpoint-6" / "model.safetensors").exists()
    assert_same_run(output_dir, reference)


def test_a_kill_before_the_manifest_leaves_the_previous_checkpoint_despite_rotation(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_total_limit: 1``: the Trainer alone would delete checkpoint-2 before checkpoint-4 is marked."""
    from mft_plugin.train import checkpoints

    def die_at_step_4(path: Path, text: str) -> None:
        if json.loads(text).get("step") == 4:  # the manifest of checkpoint-4 (not the run config)
            raise KeyboardInterrupt("killed")  # stands for a kill between the files and the manifest
        atomic_write_text(path, text)

    monkeypatch.setattr(checkpoints, "atomic_write_text", die_at_step_4)
    config = {**config, "max_steps": 6, "save_total_limit": 1, "test_datasets": None, "general_eval_datasets": None}
    with pytest.raises(KeyboardInterrupt):
        main([str(write_yaml(tmp_path / "config.yml", config))])
    output_dir = Path(config["output_dir"])
    assert completed_steps(output_dir) == [2]
    assert resume_target(True, output_dir) == str(output_dir / "checkpoint-2")


# ---------------------------------------------------------------- SIGINT / SIGTERM


def test_sigterm_saves_after_the_current_step_and_resume_matches(
    config: dict[str, Any], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    training_step = MFTTrainer.training_step

    def sigterm_during_step_3(self: MFTTrainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.state.global_step == 2:  # steps are 1-based: global_step counts the finished ones
            signal.raise_signal(signal.SIGTERM)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(MFTTrainer, "training_step", sigterm_during_step_3)
    previous_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        run(validate_config(config))
    assert signal.getsignal(signal.SIGTERM) is previous_handler
    output_dir = Path(config["output_dir"])
    assert (stopped.value.step, stopped.value.exit_code) == (3, 128 + signal.SIGTERM)
    assert stopped.value.checkpoint == str(output_dir / "checkpoint-3")
    assert "resume_from_checkpoint: true" in str(stopped.value)
    assert completed_steps(output_dir) == [2, 3]  # step 3 is no save step: saved because of the signal
    assert not (output_dir / "metrics.json").exists()

    monkeypatch.setattr(MFTTrainer, "training_step", training_step)
    resume(config, tmp_path)
    assert_same_run(output_dir, reference)


@pytest.mark.slow
def test_sigint_from_outside_stops_cleanly_with_a_checkpoint(config: dict[str, Any], tmp_path: Path) -> None:
    output_dir = Path(config["output_dir"])
    process = start(SLOW_RUN, str(write_yaml(tmp_path / "config.yml", config)))
    wait_for(lambda: (output_dir / "checkpoint-2" / MANIFEST).exists(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    step = max(completed_steps(output_dir))
    assert 2 < step < STEPS
    assert f"stopped by SIGINT after step {step}; checkpoint saved in {output_dir / f'checkpoint-{step}'}" in stderr
    assert "Traceback" not in stderr
    assert not (output_dir / "metrics.json").exists()


def test_a_second_signal_stops_at_once_and_handlers_are_restored() -> None:
    previous = signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    with stop.installed():
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT  # the first only asks for a stop after the step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_an_ignored_signal_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job of a shell script
    try:
        stop = StopOnSignal()
        with stop.installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
        assert stop.received is None
    finally:
        signal.signal(signal.SIGINT, previous)


TWO_PROCESSES = """
import signal, sys, torch.distributed as dist
from transformers import TrainerControl
from mft_plugin.train.signals import StopOnSignal
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
stop = StopOnSignal()
if rank == 0:
    stop.received = signal.SIGTERM  # only rank 0 got the signal
control = stop.on_step_end(None, None, TrainerControl())
print(stop.stopped, control.should_save, control.should_training_stop)
dist.destroy_process_group()
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    """Processes of a launched run must stop together, or the others hang in their next collective."""
    processes = [start(TWO_PROCESSES, str(rank), str(tmp_path / "store")) for rank in (0, 1)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["True", "True", "True"]] * 2


# ---------------------------------------------------------------- which checkpoint resumes


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    from mft_plugin.train.checkpoints import finish_checkpoint

    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        finish_checkpoint(output_dir, step, save_total_limit=None, best=None)
    return folder


def test_resume_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for step in (2, 4, 10):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 12, complete=False)
    truncated = fake_checkpoint(tmp_path, 14)
    (truncated / "model.safetensors").write_bytes(b"w" * 10)  # cut short after the manifest was written
    assert not is_complete(truncated)
    assert resume_target(True, tmp_path) == str(tmp_path / "checkpoint-10")  # numeric order, not text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10", "checkpoint-2", "checkpoint-4", "incomplete-checkpoint-12", "incomplete-checkpoint-14",
    ]  # fmt: skip


def test_resume_with_no_complete_checkpoint_starts_over(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2, complete=False)
    assert resume_target(True, tmp_path) is None
    assert resume_target(None, tmp_path) is None


def test_a_named_incomplete_checkpoint_is_refused_before_loading(tmp_path: Path, base_config: dict[str, Any]) -> None:
    truncated = fake_checkpoint(tmp_path, 4)
    (truncated / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete"):
        resume_target(str(truncated), tmp_path)
    missing = tmp_path / "checkpoint-99"
    config = validate_config({**base_config, "resume_from_checkpoint": str(missing)})
    with pytest.raises(ConfigError) as caught:
        preflight(config)
    assert caught.value.problems == [f"resume_from_checkpoint: {missing} is not a folder"]


# ---------------------------------------------------------------- caches


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary left behind


MEASURED = {"spec": 12.5, "general": 20.0}


def test_base_perplexity_cache_is_rebuilt_when_stale_or_truncated(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    def saved(config_dict: dict[str, Any]) -> None:
        save_base_perplexities(tmp_path, validate_config(config_dict), evaluation_rows(config_dict, tmp_path), MEASURED)

    def loaded(config_dict: dict[str, Any]) -> dict[str, float] | None:
        return load_base_perplexities(tmp_path, validate_config(config_dict), evaluation_rows(config_dict, tmp_path))

    saved(base_config)
    assert loaded(base_config) == MEASURED
    cache = tmp_path / "base_perplexity.json"
    text = cache.read_text()
    cache.write_text(text[: len(text) // 2])  # truncated
    assert loaded(base_config) is None
    cache.write_text("null")
    assert loaded(base_config) is None

    saved(base_config)
    assert loaded({**base_config, "sequence_len": 32}) is None  # other blocks
    # with test_datasets the seed and the training data do not touch the evaluation sets: shared
    assert loaded({**base_config, "seed": 1, "datasets": [{"path": str(corpora["general_val"])}]}) == MEASURED
    split = {key: value for key, value in base_config.items() if key != "test_datasets"}
    saved({**split, "val_set_size": 0.1})
    assert loaded({**split, "val_set_size": 0.1, "seed": 1}) is None  # other split
    copied = tmp_path / "val.jsonl"
    copied.write_text(Path(corpora["spec_val"]).read_text())
    moved = {**base_config, "test_datasets": [{"path": str(copied)}]}
    saved(moved)
    with copied.open("a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")  # the same file, changed in place
    assert loaded(moved) is None


def test_base_perplexity_cache_is_stale_when_the_model_changes_in_place(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    from tests.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", seed=0)
    config_dict = {**base_config, "base_model": str(model)}
    config, rows = validate_config(config_dict), evaluation_rows(config_dict, tmp_path)
    save_base_perplexities(tmp_path, config, rows, MEASURED)
    assert load_base_perplexities(tmp_path, config, rows) == MEASURED
    build_tiny_model(model, seed=1)  # other weights under the same folder name
    assert load_base_perplexities(tmp_path, config, rows) is None
