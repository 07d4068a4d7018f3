"""Many processes on one machine: ``mft-run --num-processes N`` is ``accelerate launch`` of mft-run.

We add no launcher of our own. The parent validates the YAML once, then runs
``accelerate launch --multi_gpu --num_processes N -m mft_plugin.cli config.yml``; each child
is an ordinary ``mft-run`` whose engine (DDP, FSDP2, DeepSpeed ZeRO) comes from the YAML
(:class:`mft_plugin.train.engine.Engine`). (``accelerate launch --cpu`` starts a single process
unless an MPI hostfile is given: use ``--multi_gpu`` or torchrun on CPU too.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


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


def launch(config_path: str, overrides: Sequence[str], num_processes: int) -> int:
    """Run the training on ``num_processes`` local processes; the return code of the launch."""
    return subprocess.call(accelerate_command(config_path, overrides, num_processes))


def is_main_process() -> bool:
    """Rank 0 of a launched run (or the only process): the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def leave_process_group() -> None:
    """Leave the process group explicitly, after every rank has finished (a launched process's last act).

    Left to interpreter exit, gloo's threads were destroyed while a peer could still be talking to
    them (or the group already torn down under them), and a rank sometimes aborted with
    ``terminate called without an active exception`` on a loaded machine, failing a finished run.
    """
    import gc

    import torch.distributed as dist

    gc.collect()  # ZeRO-3's partitioned parameters and hooks go before the group they use
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
