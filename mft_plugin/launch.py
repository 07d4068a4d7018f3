"""Many processes on one machine: ``mft-run --num-processes N`` is ``accelerate launch`` of mft-run.

We add no launcher of our own. The parent validates the YAML once, then runs
``accelerate launch --multi_gpu --num_processes N -m mft_plugin.cli config.yml``; each child
is an ordinary ``mft-run``. Which engine the children use (DDP, FSDP2, DeepSpeed ZeRO) is read
from the YAML's Trainer keys (``fsdp``/``fsdp_config``/``deepspeed``) by :func:`engine_arguments`,
never from accelerate's own config file, so one YAML means the same run however it is launched.

On a machine without a GPU the Trainer only joins the processes into one gloo group when told
to use the CPU; :func:`engine_arguments` tells it, so ``torchrun``/``accelerate launch`` of 2
CPU processes trains one model with DDP instead of two independent copies. (``accelerate
launch --cpu`` starts a single process unless an MPI hostfile is given: use ``--multi_gpu`` or
torchrun on CPU too.) DeepSpeed runs on CPU processes as well, on its CPU accelerator over gloo,
which is how CI tests ZeRO-2/3; FSDP does not (accelerate applies it to GPU processes only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from mft_plugin.config import MFTConfigBase
from mft_plugin.engine_config import FSDPConfig


def accelerate_command(config_path: str, overrides: Sequence[str], num_processes: int) -> list[str]:
    """The ``accelerate launch`` command line that runs mft-run on ``num_processes`` processes."""
    # Port 0 makes accelerate pick a free one, so that two runs on one machine never collide.
    port = os.environ.get("MASTER_PORT", "0")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "mft_plugin.cli", config_path, *(f"--set={override}" for override in overrides),
    ]  # fmt: skip


class EngineUnavailableError(RuntimeError):
    """The YAML asks for an engine that this machine cannot run."""


def check_engine_available(config: MFTConfigBase) -> None:
    """FSDP needs GPUs: accelerate 1.15 applies it to GPU processes only.

    Without this check an FSDP run on CPU would silently train as plain DDP (accelerate drops
    the FSDP plugin for CPU processes).
    """
    if config.fsdp_enabled and not has_accelerator():
        raise EngineUnavailableError(
            "fsdp: FSDP needs GPUs (accelerate applies it only to GPU processes; on CPU the run would "
            "silently be plain DDP); remove fsdp/fsdp_config to train with DDP (or use deepspeed) on CPU"
        )


def launch(config: MFTConfigBase, config_path: str, overrides: Sequence[str], num_processes: int) -> int:
    """Run the training on ``num_processes`` local processes; the return code of the launch."""
    try:
        check_engine_available(config)
    except EngineUnavailableError as error:
        print(error, file=sys.stderr)
        return 2
    return subprocess.call(accelerate_command(config_path, overrides, num_processes))


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) to put each process on."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def engine_arguments(config: MFTConfigBase) -> dict[str, Any]:
    """``TrainingArguments`` keys for the engine the YAML asks for (DDP when it asks for none).

    ``use_cpu`` on a machine without an accelerator is what makes the Trainer join launched
    processes into one gloo group (otherwise each would train alone). DeepSpeed on such a machine
    is set up here (:func:`join_deepspeed_cpu_group`) and handed to the Trainer as a configured state.
    """
    check_engine_available(config)
    on_gpus = has_accelerator()
    arguments: dict[str, Any] = {"use_cpu": not on_gpus}
    if config.fsdp_enabled:
        arguments.update(fsdp=True, fsdp_config=(config.fsdp_config or FSDPConfig()).trainer_config())
    if config.deepspeed is not None:
        arguments.update(deepspeed=config.deepspeed, use_cpu=False)
        if not on_gpus:
            join_deepspeed_cpu_group()
            arguments["accelerator_config"] = {"use_configured_state": True}
    return arguments


def join_deepspeed_cpu_group() -> None:
    """Join this process to a DeepSpeed run on CPU processes (DeepSpeed's CPU accelerator, gloo).

    ``TrainingArguments`` starts DeepSpeed's process group with the accelerator's backend, and
    without a GPU it names none: every process would then count itself as the only one and fail
    DeepSpeed's batch-size check. Accelerate's state is therefore made here, with gloo, before the
    ``TrainingArguments``, which adopt it (``accelerator_config.use_configured_state``). A single
    process not started by a launcher is a group of one.
    """
    from accelerate import PartialState
    from accelerate.utils.other import get_free_port

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(get_free_port()))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState: join through deepspeed.comm
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def is_main_process() -> bool:
    """Rank 0 of a launched run (or the only process): the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0
