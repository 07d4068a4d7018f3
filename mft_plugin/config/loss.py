"""The keys that choose how the loss is computed: ``loss_impl`` and ``teacher_cache`` (README "Performance").

Kept beside :mod:`mft_plugin.config.schema` (which holds the fields) and free of torch, like it: a typo
here is reported before anything is loaded. The implementations are :mod:`mft_plugin.loss.chunked`
and :mod:`mft_plugin.teacher.cache`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LossImpl = Literal["auto", "naive", "chunked"]
CacheLayoutName = Literal["auto", "projected", "hidden_states"]


class TeacherCacheConfig(BaseModel):
    """``teacher_cache:``: the teacher computed once per training block and read from disk.

    By default (``teacher_cache: {}``, ``layout: auto``) an exact layout: in adapter runs (frozen head
    shared by teacher and student) u = W^T p^T, p^T_l, p^T_max per token (``projected``: the loss then
    costs plain finetuning); otherwise the teacher's final hidden states (``hidden_states``), from which
    p^T is recomputed with the frozen head inside the chunked loss. Both give the online teacher's loss.
    ``top_k: k`` stores instead p^T_l, p^T_max and the k largest probabilities per token
    (smaller on disk when hidden_size is large, no teacher head at training time), an approximation
    of the distillation target's tail (README "Performance" states its bias).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: CacheLayoutName = Field(
        "auto",
        description="what is stored: auto (projected in adapter runs, else hidden_states), projected, hidden_states",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="store the top_k teacher probabilities per token (an approximation) instead of the exact hidden states",
    )
    path: str | None = Field(
        None,
        description="folder of caches, one per base model and data (default: output_dir/teacher_cache); share it across a sweep",
    )


def loss_impl_problem(loss_impl: LossImpl, teacher_cache: TeacherCacheConfig | None) -> str | None:
    """Why these keys cannot go together, or None. Every engine serves both (DDP, FSDP2, ZeRO-2/3: the fused
    loss runs inside the LM head's forward where it is sharded, :func:`mft_plugin.models.heads.fused_forward`,
    and the cache is built where the engine can run the teacher, :mod:`mft_plugin.teacher.cache`)."""
    if teacher_cache is not None and teacher_cache.top_k is not None and teacher_cache.layout != "auto":
        return f"teacher_cache: top_k is a layout of its own; remove layout: {teacher_cache.layout} or top_k"
    if teacher_cache is not None and loss_impl == "naive":
        return "teacher_cache needs the chunked loss: set loss_impl: auto or chunked, or remove teacher_cache"
    return None
