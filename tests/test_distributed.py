"""Scaling out: engine keys, the launch wrapper, and 2-process runs on CPU (gloo).

The 2-process tests launch real processes (``mft-run --num-processes 2``, i.e. ``accelerate
launch`` -> torchrun -> gloo) and compare with a single-process run of the same global batch:
2 ranks x micro batch 2 against 1 process x micro batch 2 x gradient accumulation 2. Both see
the same blocks at every step (accelerate's shard of the seeded sampler gives rank r batch
2k + r; accumulation takes batches 2k, 2k + 1), and DDP's gradient average of the two per-rank
means is the accumulated mean of the two micro-batch means, so the weights must agree to
float32 round-off.

Run as ``python -m torch.distributed.run --nproc_per_node 2 -m tests.test_distributed CHECK
MODEL_DIR OUT_DIR`` this module is also the per-rank worker of the teacher-sharding checks.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.commands.launch import launch_command_parser
from accelerate.utils.other import get_free_port

from mft_plugin.config.errors import ConfigError, load_config, validate_config
from mft_plugin.config.engines import FSDPConfig
from mft_plugin.train.engine import Engine
from mft_plugin.train.launch import accelerate_command, leave_process_group
from tests.tiny import REPO, write_yaml

TOLERANCE = 1e-5  # float32 round-off of a different reduction order; training moves weights ~1e-3


# --- engine keys -----------------------------------------------------------------------------


def test_fsdp_config_maps_axolotl_keys_to_the_trainers() -> None:
    config = FSDPConfig(offload_params=True, transformer_layer_cls_to_wrap="LlamaDecoderLayer", reshard_after_forward=False)
    assert config.trainer_config() == {
        "version": 2,
        "cpu_offload": True,
        "activation_checkpointing": False,
        "cpu_ram_efficient_loading": False,
        "reshard_after_forward": False,
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    }
    assert FSDPConfig.model_validate({"version": 2, "cpu_offload": True}).offload_params  # the Trainer's names


def test_an_axolotl_fsdp1_block_is_read_as_axolotl_reads_it(base_config: dict[str, Any]) -> None:
    """Axolotl's older spellings: ``fsdp: [full_shard, auto_wrap]``, ``fsdp_``-prefixed keys, ``sharding_strategy``;
    the FSDP1 switches FSDP2 has no use for are accepted and said at the start, the trainer never sees them."""
    fsdp1 = {
        "fsdp_offload_params": True, "fsdp_sync_module_states": True, "fsdp_use_orig_params": False,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_sharding_strategy": "SHARD_GRAD_OP",
    }  # fmt: skip
    config = validate_config({**base_config, "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": fsdp1})
    assert config.engine_name == "fsdp"
    assert config.fsdp_config.trainer_config() == FSDPConfig(
        offload_params=True, transformer_layer_cls_to_wrap="LlamaDecoderLayer", reshard_after_forward=False
    ).trainer_config()  # fsdp_config's own sharding_strategy wins over the fsdp list's full_shard, as in transformers
    notes = [note for note in config.start_notes if note.startswith("fsdp_config")]
    assert notes == [
        "fsdp_config.use_orig_params: False has no effect: an FSDP1 switch; FSDP2 always trains the original parameters",
        "fsdp_config.sync_module_states: True has no effect: an FSDP1 switch; FSDP2 broadcasts rank 0's weights only with cpu_ram_efficient_loading",
        "fsdp_config without fsdp_version: Axolotl 0.19 would run FSDP1 (deprecated); mft-run runs FSDP2 (fully_shard), which computes the same",
    ]
    listed = validate_config({**base_config, "fsdp": "full_shard offload", "fsdp_version": 2})
    assert listed.fsdp_config.reshard_after_forward and listed.fsdp_config.offload_params
    assert not [note for note in listed.start_notes if note.startswith("fsdp_config")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"fsdp_config": {"fsdp_version": 1}}, "fsdp_config.fsdp_version: only FSDP2 is supported"),
        ({"fsdp_config": {"offload_param": True}}, "fsdp_config.offload_param: unknown key; did you mean 'offload_params'?"),
        ({"deepspeed": "missing/zero3.json"}, "deepspeed: file or folder not found: missing/zero3.json"),
        ({"fsdp": True, "deepspeed": str(REPO / "yaml_examples/deepspeed/zero3.json")}, "choose one engine"),
        ({"fsdp": ["hybrid_shard", "auto_wrap"]}, "fsdp: hybrid_shard is not offered"),
        ({"fsdp_config": {"sharding_strategy": "HYBRID_SHARD"}}, "fsdp_config: 'HYBRID_SHARD' is not offered"),
        ({"fsdp_config": {"mixed_precision_policy": "bf16"}}, "mixed_precision_policy: 'bf16' is not offered"),
        ({"fsdp_config": {"final_state_dict_type": "SHARDED_STATE_DICT"}}, "fsdp_config.final_state_dict_type: Input should be 'FULL_STATE_DICT'"),
    ],
)
def test_engine_keys_are_validated(base_config: dict[str, Any], extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({**base_config, **extra})


def test_deepspeed_config_must_be_json(base_config: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "zero3.json"
    broken.write_text("zero_optimization: {stage: 3}")
    with pytest.raises(ConfigError, match="deepspeed: not a JSON file"):
        validate_config({**base_config, "deepspeed": str(broken)})


@pytest.fixture
def with_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mft_plugin.train.engine.has_accelerator", lambda: True)


@pytest.fixture
def without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mft_plugin.train.engine.has_accelerator", lambda: False)


def trainer_arguments(config: dict[str, Any]) -> dict[str, Any]:
    return Engine.from_config(validate_config(config)).trainer_arguments()


def test_engine_arguments_on_gpus(base_config: dict[str, Any], with_gpu: None) -> None:
    assert trainer_arguments(base_config) == {"use_cpu": False}  # DDP: the Trainer's default
    fsdp = trainer_arguments({**base_config, "fsdp_config": {"offload_params": True}})
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["cpu_offload"] is True
    assert trainer_arguments({**base_config, "fsdp": True})["fsdp_config"] == FSDPConfig().trainer_config()
    assert "fsdp" not in trainer_arguments({**base_config, "fsdp": False, "fsdp_config": {}})
    zero3 = str(REPO / "yaml_examples/deepspeed/zero3.json")
    assert trainer_arguments({**base_config, "deepspeed": zero3})["deepspeed"] == zero3


def test_cpu_processes_join_one_gloo_group(base_config: dict[str, Any], without_gpu: None) -> None:
    assert trainer_arguments(base_config) == {"use_cpu": True}


@pytest.mark.parametrize(
    ("engine", "join", "expected"),
    [
        ({"deepspeed": str(REPO / "yaml_examples/deepspeed/zero2.json")}, "join_deepspeed_cpu_group",
         {"use_cpu": False, "deepspeed": str(REPO / "yaml_examples/deepspeed/zero2.json")}),
        ({"fsdp": True}, "join_fsdp_cpu_group", {"use_cpu": True, "fsdp": True, "fsdp_config": FSDPConfig().trainer_config()}),
    ],
)  # fmt: skip
def test_sharding_engines_on_cpu_processes_are_handed_to_the_trainer_as_a_configured_state(
    base_config: dict[str, Any], without_gpu: None, monkeypatch: pytest.MonkeyPatch,
    engine: dict[str, Any], join: str, expected: dict[str, Any],
) -> None:  # fmt: skip
    joined: list[bool] = []  # the real join starts a process group: run in the 2-process tests below
    monkeypatch.setattr(f"mft_plugin.train.engine.{join}", lambda: joined.append(True))
    arguments = trainer_arguments({**base_config, **engine})
    assert arguments == {**expected, "accelerator_config": {"use_configured_state": True}}
    assert joined == [True]


# --- the launch wrapper ----------------------------------------------------------------------


def test_launch_command_is_accelerate_launch_of_mft_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    command = accelerate_command("run.yml", ["seed=3"], 2)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    parsed = launch_command_parser().parse_args(command[3:])  # accelerate's own parser reads it
    assert (parsed.num_processes, parsed.multi_gpu, parsed.module) == (2, True, True)
    assert parsed.main_process_port == 0  # a free port, so concurrent runs never collide
    assert (parsed.training_script, parsed.training_script_args) == ("mft_plugin.cli", ["run.yml", "--set=seed=3"])


def test_num_processes_must_be_positive(base_config: dict[str, Any], tmp_path: Path) -> None:
    from mft_plugin.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(write_yaml(tmp_path / "run.yml", base_config)), "--num-processes", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("rank", "deletes"), [("0", True), ("1", False)])
def test_only_rank_0_deletes_old_checkpoints(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str, deletes: bool
) -> None:
    """Every rank prepares output_dir; two deleting one checkpoint at once trip over each other."""
    from mft_plugin.train.outputs import prepare_output_dir

    checkpoint = tmp_path / "out" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    monkeypatch.setenv("RANK", rank)
    prepare_output_dir(validate_config({**base_config, "output_dir": str(tmp_path / "out"), "overwrite_output_dir": True}))
    assert checkpoint.exists() != deletes


# --- 2 processes against 1 -------------------------------------------------------------------


def _run_two_processes(config: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    path = write_yaml(folder / "two_processes.yml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on 2 CPU cores
    result = subprocess.run(
        [sys.executable, "-m", "mft_plugin.cli", str(path), "--num-processes", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _run_one_process(config: dict[str, Any], folder: Path) -> dict[str, float]:
    from mft_plugin import run

    return run(load_config(write_yaml(folder / "one_process.yml", config)))


def _weights(output_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(output_dir).glob("*.safetensors"))
    assert files, f"no weights saved in {output_dir}"
    weights = {name: tensor for file in files for name, tensor in load_file(file).items()}
    # DeepSpeed's and FSDP2's full state dicts keep the tied head (the tiny model ties it): the same tensor
    tied_head = weights.pop("lm_head.weight", None)
    if tied_head is not None:
        assert torch.equal(tied_head, weights["model.embed_tokens.weight"])
    return weights


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


THREE_STEPS = {"max_steps": 3, "eval_steps": 3}


def _compare_runs(
    base_config: dict[str, Any], tmp_path: Path, extra: dict[str, Any], engine: dict[str, Any] | None = None,
    steps: dict[str, int] = THREE_STEPS,
) -> dict[str, Any]:  # fmt: skip
    """2 ranks x micro batch 2 == 1 process x micro batch 2 x accumulation 2; != accumulation 1.

    ``engine``: keys of the 2-process run alone (``deepspeed``, ``fsdp``); the 1-process runs are plain.
    Returns the 2-process run's config.
    """
    common = {**base_config, **extra, "micro_batch_size": 2, **steps}
    two = {**common, **(engine or {}), "output_dir": str(tmp_path / "two")}
    one = {**common, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "one")}
    half = {**common, "output_dir": str(tmp_path / "half")}  # what each rank alone would do

    _run_two_processes(two, tmp_path)
    one_metrics = _run_one_process(one, tmp_path)
    _run_one_process(half, tmp_path)
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())

    trained, same_batch, rank_alone = _weights(two["output_dir"]), _weights(one["output_dir"]), _weights(half["output_dir"])
    assert _max_difference(trained, same_batch) < TOLERANCE
    assert _max_difference(trained, rank_alone) > 100 * TOLERANCE  # the check can tell the runs apart
    for key in ("train_loss", "base_spec_ppl", "base_general_ppl", "eval_spec_ppl", "eval_general_ppl"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=TOLERANCE), key
    for key in ("eval_S", "eval_DG"):  # small differences of perplexities: compared absolutely
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=TOLERANCE), key
    return two


def _assert_resumes_like_the_whole_run(whole: dict[str, Any], tmp_path: Path) -> None:
    """The 2-process run ``whole`` (4 steps, a checkpoint every 2), killed after its step-2 checkpoint
    and resumed, ends with the uninterrupted run's weights and metrics."""
    import shutil

    from mft_plugin.train.outputs import BASE_PPL_FILE

    whole_dir = Path(whole["output_dir"])
    killed = tmp_path / "killed"  # what a kill during step 3 leaves: the step-2 checkpoint and the base cache
    shutil.copytree(whole_dir / "checkpoint-2", killed / "checkpoint-2")
    shutil.copy(whole_dir / BASE_PPL_FILE, killed / BASE_PPL_FILE)
    _run_two_processes({**whole, "output_dir": str(killed), "resume_from_checkpoint": True}, tmp_path)

    assert _max_difference(_weights(str(killed)), _weights(str(whole_dir))) < TOLERANCE
    resumed, uninterrupted = (json.loads((run / "metrics.json").read_text()) for run in (killed, whole_dir))
    assert resumed["eval_spec_ppl"] == pytest.approx(uninterrupted["eval_spec_ppl"], rel=TOLERANCE)
    assert resumed["eval_general_ppl"] == pytest.approx(uninterrupted["eval_general_ppl"], rel=TOLERANCE)
    assert resumed["base_spec_ppl"] == uninterrupted["base_spec_ppl"]


@pytest.mark.slow
def test_two_processes_full_finetuning_equal_one_process_with_the_same_global_batch(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    # The general eval set packs into 35 blocks: an odd count, so accelerate pads the last eval
    # batch with a duplicate that gather_for_metrics must drop for the perplexities to agree.
    _compare_runs(base_config, tmp_path, {})


@pytest.mark.slow
def test_two_processes_with_the_teacher_cache_equal_one_process(base_config: dict[str, Any], tmp_path: Path) -> None:
    # The main process builds the cache of every block; each rank reads the rows of its own blocks.
    _compare_runs(base_config, tmp_path, {"teacher_cache": {}})  # the exact (hidden-state) cache


@pytest.mark.slow
def test_two_processes_lora_with_the_projected_cache_equal_one_process(base_config: dict[str, Any], tmp_path: Path) -> None:
    # teacher_cache: {} picks the projected layout for LoRA: each rank reads u, p^T_l, p^T_max of its blocks.
    _compare_runs(base_config, tmp_path, {"mitigations": [{"name": "lora", "r": 4}], "teacher_cache": {}})


@pytest.mark.slow
def test_two_processes_lora_equal_one_process(base_config: dict[str, Any], tmp_path: Path) -> None:
    # The teacher is the shared base under disable_adapter(), called through the DDP-wrapped student.
    _compare_runs(base_config, tmp_path, {"mitigations": [{"name": "lora", "r": 4}]})


@pytest.mark.slow
def test_two_processes_replay_and_ewc_equal_one_process(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    # Replay: every rank must compose the same mixed set and take whole composed micro-batches of
    # it; EWC: every rank must hold the same Fisher and anchors, so that its penalty is the same.
    general = [{"path": str(corpora["general_train"]), "type": "completion"}]
    mitigations = [
        {"name": "replay", "ratio": 0.5, "datasets": general},
        {"name": "ewc", "ewc_lambda": 100.0, "datasets": general, "fisher_samples": 4},
    ]
    _compare_runs(base_config, tmp_path, {"mitigations": mitigations})


# DeepSpeed on 2 CPU processes (its CPU accelerator over gloo): ZeRO-2 partitions gradients and
# Adam states, ZeRO-3 the weights too, the frozen teacher's included; the base perplexities are
# measured once the ZeRO-3 engine exists. Same global batch, same weights as one plain process.


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_full_finetuning_equals_one_process(base_config: dict[str, Any], tmp_path: Path, stage: int) -> None:
    engine = {"deepspeed": str(REPO / f"yaml_examples/deepspeed/zero{stage}.json")}
    _compare_runs(base_config, tmp_path, {}, engine)


@pytest.mark.slow
def test_deepspeed_zero3_lora_equals_one_process(base_config: dict[str, Any], tmp_path: Path) -> None:
    # The partitioned base is the teacher under disable_adapter(), run by the training engine's hooks.
    engine = {"deepspeed": str(REPO / "yaml_examples/deepspeed/zero3.json")}
    _compare_runs(base_config, tmp_path, {"mitigations": [{"name": "lora", "r": 4}]}, engine)


def test_under_zero3_the_base_is_measured_at_train_begin_and_a_resume_without_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from mft_plugin.train.trainer import MFTTrainer

    monkeypatch.setattr("mft_plugin.train.engine.is_deepspeed_zero3_enabled", lambda: True)
    callbacks: list[Any] = []
    trainer = SimpleNamespace(
        base_perplexities={}, model=torch.nn.Linear(2, 2), add_callback=callbacks.append, engine=Engine("deepspeed"),
        perplexities=lambda base: {"spec": 9.0} if base else pytest.fail("the current model measured as base"),
    )  # fmt: skip
    saved: list[dict[str, float]] = []
    MFTTrainer.set_base_perplexities(trainer, None, saved.append)  # type: ignore[arg-type]
    assert trainer.base_perplexities == {} and saved == []  # no engine yet: nothing can run the weights
    (at_train_begin,) = callbacks
    args = SimpleNamespace(output_dir="out")
    with pytest.raises(RuntimeError, match="resume_from_checkpoint: under DeepSpeed ZeRO-3 .* step 2"):
        at_train_begin.on_train_begin(args, SimpleNamespace(global_step=2), None)  # finetuned weights already
    at_train_begin.on_train_begin(args, SimpleNamespace(global_step=0), None)
    assert trainer.base_perplexities == {"spec": 9.0} and saved == [{"spec": 9.0}]


@pytest.mark.slow
def test_deepspeed_zero3_run_resumes_from_its_checkpoint(base_config: dict[str, Any], tmp_path: Path) -> None:
    """A ZeRO-3 run killed after its step-2 checkpoint ends where the uninterrupted run does."""
    zero3 = str(REPO / "yaml_examples/deepspeed/zero3.json")
    common = {**base_config, "deepspeed": zero3, "micro_batch_size": 2, "max_steps": 4, "save_steps": 2, "eval_steps": 2}
    whole = {**common, "output_dir": str(tmp_path / "whole")}
    _run_two_processes(whole, tmp_path)
    _assert_resumes_like_the_whole_run(whole, tmp_path)


# FSDP2 on 2 CPU processes (gloo; accelerate's state configured by mft-run, see Engine): fully_shard
# of the student, its gradients and Adam states, and of the frozen teacher; checkpoints and the final
# folder hold the full state dict gathered by torch's distributed checkpoint API (accelerate's get_state_dict).


@pytest.mark.slow
def test_fsdp2_full_finetuning_equals_one_process_resumes_and_exports(base_config: dict[str, Any], tmp_path: Path) -> None:
    """One 4-step FSDP2 run (checkpoints at steps 2 and 4) serves three checks, to keep CI short:
    it equals one process; killed after its step-2 checkpoint and resumed, it ends where it did;
    its output folder loads with ``from_pretrained`` (the tied head included)."""
    from transformers import AutoModelForCausalLM

    steps = {"max_steps": 4, "save_steps": 2, "eval_steps": 2}
    whole = _compare_runs(base_config, tmp_path, {}, {"fsdp": True}, steps)
    assert list((tmp_path / "two" / "checkpoint-2").glob("pytorch_model_fsdp*")), "not an FSDP checkpoint"
    _assert_resumes_like_the_whole_run(whole, tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(whole["output_dir"], dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    state = {name: tensor for name, tensor in loaded.state_dict().items() if name != "lm_head.weight"}
    assert _max_difference(state, _weights(whole["output_dir"])) == 0.0


@pytest.mark.slow
def test_fsdp2_lora_equals_one_process(base_config: dict[str, Any], tmp_path: Path) -> None:
    # The sharded base is the teacher under disable_adapter(); the adapter is saved alone, in peft's format.
    _compare_runs(base_config, tmp_path, {"mitigations": [{"name": "lora", "r": 4}]}, {"fsdp": True})


# The fused loss where the engine gathers the LM head (FSDP2, ZeRO-3): computed inside the head's forward
# (mft_plugin.models.heads.fused_forward), against one process (which fuses it after the forward).

# With teacher_cache: {} as well (both runs build their own): the hidden-state layout for full MFT (built
# before fully_shard under FSDP2; under ZeRO-3 at train begin, every rank running the partitioned frozen copy in
# lockstep), the projected layout for LoRA (under ZeRO-3 from the partitioned base inside the training engine).
ZERO3 = {"deepspeed": str(REPO / "yaml_examples/deepspeed/zero3.json")}
LORA = [{"name": "lora", "r": 4}]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "mitigations", "cache"),
    [
        ({"fsdp": True}, [], None),
        (ZERO3, [], None),
        (ZERO3, LORA, None),
        ({"fsdp": True}, [], "hidden_states"),
        (ZERO3, [], "hidden_states"),
        (ZERO3, LORA, "projected"),
    ],
    ids=["fsdp2_full", "zero3_full", "zero3_lora", "fsdp2_full_cache", "zero3_full_cache", "zero3_lora_cache"],
)
def test_the_chunked_loss_inside_a_gathered_head_equals_one_process(
    base_config: dict[str, Any], tmp_path: Path, engine: dict[str, Any], mitigations: list[dict[str, Any]], cache: str | None
) -> None:
    # loss_impl: chunked, not auto: a run that could not fuse would stop at startup rather than train plain
    extra = {"loss_impl": "chunked", "mitigations": mitigations, **({"teacher_cache": {}} if cache else {})}
    _compare_runs(base_config, tmp_path, extra, engine)
    if cache is not None:  # the 2-process run trained from a complete cache of that layout, not an online teacher
        (meta,) = (tmp_path / "two" / "teacher_cache").glob("*/meta.json")
        assert json.loads(meta.read_text())["kind"] == cache


# --- the frozen teacher sharded like the student ---------------------------------------------


def _run_worker(check: str, tiny_model: Path, out: Path, python: str = sys.executable) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(get_free_port())]
    result = subprocess.run(
        [*command, "-m", "tests.test_distributed", check, str(tiny_model), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _assert_sharded_in_half(results: list[dict[str, Any]]) -> None:
    for result in results:
        assert result["local_parameters"] * 2 == result["parameters"]  # 1/N of the teacher per rank
        assert result["max_logit_difference"] == 0.0  # same p^T as the whole teacher


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_teacher_with_the_students_wrap_policy(tiny_model: Path, tmp_path: Path) -> None:
    _assert_sharded_in_half(_run_worker("fsdp_teacher", tiny_model, tmp_path))


@pytest.mark.slow
def test_zero3_partitions_the_frozen_teacher(tiny_model: Path, tmp_path: Path) -> None:
    _assert_sharded_in_half(_run_worker("zero3_teacher", tiny_model, tmp_path))


def _stand_in_accelerator(state: Any, distributed_type: Any) -> Any:
    """What ``Engine.place_teacher`` reads of an Accelerator; accelerate 1.15 sets FSDP/DeepSpeed up only on GPUs."""
    from types import SimpleNamespace

    return SimpleNamespace(
        distributed_type=distributed_type, state=state, device=torch.device("cpu"),
        torch_device_mesh=None, mixed_precision="no", is_main_process=int(os.environ["RANK"]) == 0,
    )  # fmt: skip


def _teacher_check(check: str, model_dir: str) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from mft_plugin.teacher.sources import FrozenCopyTeacher
    from mft_plugin.train.engine import Engine

    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    parameters = sum(p.numel() for p in whole.parameters())
    input_ids = torch.randint(0, whole.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = FrozenCopyTeacher(copy.deepcopy(whole)).logits({"input_ids": input_ids})
    if check == "fsdp_teacher":
        dist.init_process_group("gloo")
        state = SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        teacher = Engine("fsdp").place_teacher(FrozenCopyTeacher(whole), _stand_in_accelerator(state, DistributedType.FSDP))
        local = sum(p.to_local().numel() for p in teacher.model.parameters())
    else:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo")
        config = json.loads((REPO / "yaml_examples/deepspeed/zero3.json").read_text())
        config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=2)
        config.update(gradient_clipping=1.0, bf16={"enabled": False}, fp16={"enabled": False})
        config["zero_optimization"].update(
            reduce_bucket_size=1000, stage3_prefetch_bucket_size=1000, stage3_param_persistence_threshold=10
        )
        zero3 = HfDeepSpeedConfig(config)  # noqa: F841  (alive: from_pretrained loads partitioned)
        partitioned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))
        accelerator = _stand_in_accelerator(state, DistributedType.DEEPSPEED)
        teacher = Engine("deepspeed").place_teacher(FrozenCopyTeacher(partitioned), accelerator)
        local = sum(p.ds_tensor.numel() for p in partitioned.parameters())
    difference = (teacher.logits({"input_ids": input_ids}) - expected).abs().max().item()
    return {"parameters": parameters, "local_parameters": local, "max_logit_difference": difference}


if __name__ == "__main__":
    check_name, model_folder, out_folder = sys.argv[1:4]
    report = _teacher_check(check_name, model_folder)
    Path(out_folder, f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))
    leave_process_group()
