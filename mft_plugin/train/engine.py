"""The engine a run trains on (DDP, FSDP2 or DeepSpeed ZeRO), asked in one place.

The engines themselves are the Hugging Face Trainer's and accelerate's; what differs between them
for MFT is small, and every such difference is a question put to :class:`Engine`, built once from
the YAML's Trainer keys (``fsdp``/``fsdp_config``/``deepspeed``), never from accelerate's own config
file, so one YAML means the same run however it is launched:

- which ``TrainingArguments`` keys select it (:meth:`Engine.trainer_arguments`);
- whether parameters are sharded (the fused head and EWC then cannot see them whole);
- where the frozen teacher goes (:meth:`Engine.place_teacher`: sharded like the student);
- when the base is measured and the teacher cache built (:attr:`Engine.runs_weights_only_in_training`:
  ZeRO-3 runs partitioned weights only inside the engine that ``train()`` builds).

On a machine without a GPU the Trainer only joins launched processes into one gloo group when told
to use the CPU, so ``torchrun``/``accelerate launch`` of 2 CPU processes trains one model with DDP
instead of two independent copies. DeepSpeed and FSDP2 run on CPU processes as well, over gloo, from
an accelerate state configured here and adopted by the Trainer: that is how CI tests ZeRO-2/3 and FSDP2.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

from mft_plugin.config.engines import FSDPConfig
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.models.forms import is_quantized
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher, Teacher

EngineName = Literal["ddp", "fsdp", "deepspeed"]


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) to put each process on."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@dataclass(frozen=True)
class Engine:
    """What a run's engine means for MFT; ``ddp`` is also the single process."""

    name: EngineName = "ddp"
    fsdp_config: FSDPConfig | None = None
    deepspeed: str | None = None  # the DeepSpeed JSON config

    @classmethod
    def from_config(cls, config: MFTConfigBase) -> Engine:
        return cls(name=config.engine_name, fsdp_config=config.fsdp_config, deepspeed=config.deepspeed)

    @property
    def is_sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters (or their optimizer state) belong to a sharding engine."""
        return self.name != "ddp"

    @property
    def runs_weights_only_in_training(self) -> bool:
        """ZeRO-3: the student's weights are partitioned from ``from_pretrained`` on, and only the engine
        that ``train()`` builds can run them, so the base is measured, and the teacher cache built, when
        training begins."""
        return self.name == "deepspeed" and is_deepspeed_zero3_enabled()

    def trainer_arguments(self) -> dict[str, Any]:
        """``TrainingArguments`` keys for this engine.

        ``use_cpu`` on a machine without an accelerator is what makes the Trainer join launched
        processes into one gloo group (otherwise each would train alone). DeepSpeed on such a machine
        and FSDP2 are set up here (:func:`join_deepspeed_cpu_group`, :func:`join_fsdp_cpu_group`) and
        handed to the Trainer as a configured state.
        """
        on_gpus = has_accelerator()
        arguments: dict[str, Any] = {"use_cpu": not on_gpus}
        if self.name == "fsdp":
            arguments.update(fsdp=True, fsdp_config=(self.fsdp_config or FSDPConfig()).trainer_config())
            if not on_gpus:
                join_fsdp_cpu_group()
                arguments["accelerator_config"] = {"use_configured_state": True}
        if self.name == "deepspeed":
            arguments.update(deepspeed=self.deepspeed, use_cpu=False)
            if not on_gpus:
                join_deepspeed_cpu_group()
                arguments["accelerator_config"] = {"use_configured_state": True}
        return arguments

    def place_teacher(self, teacher: Teacher | None, accelerator: Accelerator) -> Teacher | None:
        """The teacher on the student's device; a frozen copy sharded like the student where it is.

        A shared base needs nothing: it is the student. A frozen copy under FSDP2 is ``fully_shard``-ed
        with the student's own wrap policy (accelerate's ``fsdp2_prepare_model``), so a rank holds
        1/N of it plus one gathered layer at a time. Under DeepSpeed it runs in an inference engine of
        the run's config (as TRL does for its reference model): ZeRO-3 partitions it (it was loaded
        partitioned already, since ``TrainingArguments`` exist before ``from_pretrained``); ZeRO-1/2
        keep parameters whole on every rank, the student's as well, so the teacher is whole there too.
        A quantized teacher (``teacher: {load_in_4bit: true}``) is small already and stays whole.
        Under either engine the fused loss reads the teacher's head weight after the teacher's forward,
        when the engine may have freed it: the teacher's view then keeps a copy of it (``copies_head``).
        """
        if teacher is None:
            return None
        if isinstance(teacher, (FrozenCopyTeacher, SharedBaseTeacher)):
            teacher.copies_head = self.is_sharded
        if isinstance(teacher, FrozenCopyTeacher) and not is_quantized(teacher.model):
            if self.name == "fsdp":
                from accelerate.utils import fsdp2_prepare_model

                teacher.model = fsdp2_prepare_model(accelerator, teacher.model).eval()
                return teacher
            if self.name == "deepspeed":
                teacher.model = deepspeed_inference_engine(teacher.model, accelerator)
                return teacher
        return teacher.to(accelerator.device)


def deepspeed_inference_engine(model: PreTrainedModel, accelerator: Accelerator) -> torch.nn.Module:
    """A DeepSpeed engine without optimizer that runs ``model``'s forward, ZeRO-3 partitioned or not."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    if config["zero_optimization"]["stage"] == 3:
        hidden = model.config.hidden_size  # the sizes TRL uses for a frozen reference model
        config["zero_optimization"].update(
            reduce_bucket_size=hidden * hidden,
            stage3_param_persistence_threshold=10 * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
        )
    else:
        config["zero_optimization"]["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
    return engine


def _launched_or_alone() -> None:
    """The launcher's rendezvous variables, or those of a group of one for a process started alone."""
    from accelerate.utils.other import get_free_port

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(get_free_port()))


def join_fsdp_cpu_group() -> None:
    """Join this process to an FSDP2 run on CPU processes (gloo).

    accelerate 1.15 takes its FSDP branch only for a multi-device state (``MULTI_GPU``, ``MULTI_XPU``,
    ...), never for ``MULTI_CPU``, although FSDP2's ``fully_shard`` and torch's distributed checkpoint
    work over gloo. So the gloo group is made here, before the ``TrainingArguments`` (which adopt it:
    ``accelerator_config.use_configured_state``), and labelled multi-device: the Accelerator that the
    Trainer then builds turns it into an FSDP state with the run's own plugin, on the CPU device.
    Without the label the run would silently train as plain DDP.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    _launched_or_alone()
    PartialState(cpu=True, backend="gloo")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def join_deepspeed_cpu_group() -> None:
    """Join this process to a DeepSpeed run on CPU processes (DeepSpeed's CPU accelerator, gloo).

    ``TrainingArguments`` starts DeepSpeed's process group with the accelerator's backend, and
    without a GPU it names none: every process would then count itself as the only one and fail
    DeepSpeed's batch-size check. Accelerate's state is therefore made here, with gloo, before the
    ``TrainingArguments``, which adopt it (``accelerator_config.use_configured_state``). A single
    process not started by a launcher is a group of one.
    """
    from accelerate import PartialState

    _launched_or_alone()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState: join through deepspeed.comm
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
