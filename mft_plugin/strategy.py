"""The three kinds of strategy a plugin can contribute: objectives, mitigations and data formats.

A strategy is a class with a ``name``, a pydantic ``Params`` model (validated against the
YAML block that selects it, for third-party strategies too) and the methods the training run
calls. Hooks only *discover* these classes (see ``hookspecs``); behaviour lives in methods,
because pluggy calls every implementation of a hook, while a run uses the one strategy the
YAML picked.

This module (and every strategy module) imports no torch at import time: the registry imports the
strategies to validate a YAML, and ``mft-run`` must report a typo before torch is loaded. The loss
code (:mod:`mft_plugin.loss.corrected`) is imported when a loss is first computed. What a
mitigation's stages receive is declared here too (:class:`RunContext`), so that this contract
depends on no stage of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class RunContext(Protocol):
    """What the core hands to a mitigation's stages (``mft_plugin.train.context.RecipeContext``).

    ``config`` is the validated config (``mft_plugin.config.schema.MFTConfigBase``); the rows a
    stage adds may carry the routing columns declared in ``mft_plugin.data.batches.ROUTING_COLUMNS``.
    """

    config: Any
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path

    def packed_blocks(self, specs: Sequence[Any]) -> Dataset:
        """Raw general-domain text (``datasets:``-style ``completion`` entries, e.g. replay's) in
        ``sequence_len`` blocks, every token a label, whatever the training data's format."""


@dataclass(frozen=True)
class TeacherStats:
    """What a correction weight may depend on, per token (all ``[batch, seq]``, float32).

    ``p_label`` is p^T_l, ``p_max`` is max_v p^T_v. ``teacher_right`` is True where the label is
    *a* maximizer of p^T (``p_label >= p_max``): on a tie the teacher counts as right, so the
    rule does not depend on which tied index ``torch.argmax`` happens to return, and a label that
    already shares the top spot is reinforced by beta rather than "corrected" by alpha.
    """

    p_label: torch.Tensor
    p_max: torch.Tensor

    @property
    def teacher_right(self) -> torch.Tensor:
        return self.p_label >= self.p_max

    def where_right(self, if_right: torch.Tensor | float, if_wrong: torch.Tensor | float) -> torch.Tensor:
        """Per-token weight ``[batch, seq]``: ``if_right`` where the teacher is right, else ``if_wrong``.

        The one place the paper's right/wrong dichotomy (Sections 2 and 4) picks between weights.
        """
        import torch  # the contract imports no torch until a loss is computed

        like = {"dtype": self.p_label.dtype, "device": self.p_label.device}
        return torch.where(self.teacher_right, torch.as_tensor(if_right, **like), torch.as_tensor(if_wrong, **like))


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy:
    """Common shape: a registered ``name`` and a ``Params`` model."""

    name: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a Params instance or keyword parameters, not both")
        if params is None:
            params = self.Params(**kwargs)
        elif not isinstance(params, self.Params):
            params = self.Params(**params.model_dump(exclude={"name"}))
        self.params = params

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(exclude={"name"}).items())
        return f"{type(self).__name__}({fields})"


class Objective(Strategy):
    """A training objective of the family CE(p^C, p^S), p^C = (1 - w) p^T + w 1_l (paper Sec. 2).

    Subclasses state their label weight ``w`` in :meth:`label_weight`; the expansion of the
    cross-entropy lives once in :mod:`mft_plugin.loss.corrected`. An objective outside this family may
    override :meth:`token_losses` instead.
    """

    needs_teacher: ClassVar[bool] = True

    def label_weight(self, stats: TeacherStats) -> torch.Tensor:
        """Per-token weight w in [0, 1] of the one-hot label in the target, ``[batch, seq]``."""
        raise NotImplementedError

    def token_losses(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Per-token loss ``[batch, seq]`` float32, 0 at ignored labels.

        ``student_logits``/``teacher_logits``: ``[batch, seq, vocab]``; ``labels``: ``[batch, seq]``,
        already aligned with the logits (the caller does the causal shift).
        """
        from mft_plugin.loss import corrected as losses

        if teacher_logits is None:
            if self.needs_teacher:
                raise ValueError(f"objective {self.name!r} needs teacher logits")
            return losses.nll_token_losses(student_logits, labels)
        p_label, p_max = losses.label_and_max_probabilities(teacher_logits, labels)
        weight = self.label_weight(TeacherStats(p_label=p_label, p_max=p_max))
        return losses.corrected_token_losses(student_logits, teacher_logits, labels, weight)

    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean per-token loss over the labels that are not -100 (0 if there are none)."""
        from mft_plugin.loss import corrected as losses

        return losses.masked_mean(self.token_losses(student_logits, teacher_logits, labels), labels)


class Mitigation(Strategy):
    """A forgetting mitigation that acts on the data, the model, or the loss.

    The core calls the stages in a fixed order (data, then model, then loss; see
    ``mft_plugin.train.recipe``); a mitigation overrides only the stages it acts on.
    ``exclusive_group`` names a family of which one run may select at most one member
    (e.g. ``"adapter"`` for lora/dora/ia3).
    """

    exclusive_group: ClassVar[str | None] = None

    @classmethod
    def config_problems(cls, params: StrategyParams, config: Any) -> list[str]:
        """Validation stage: what in the rest of the validated config (``MFTConfigBase``) these
        parameters cannot work with, each problem naming its keys, e.g. a ratio that must divide
        ``micro_batch_size``. Checked with the schema, before anything loads."""
        return []

    def prepare_data(self, train_dataset: Dataset, context: RunContext) -> Dataset:
        """Data stage: return the training set this mitigation wants (e.g. replay mixing)."""
        return train_dataset

    def epoch_order(self, epoch: int) -> list[int] | None:
        """Data stage: the row order of ``epoch`` over the training set :meth:`prepare_data` returned,
        in whole micro-batches (e.g. replay's fresh general rows each epoch), or None to let the core
        shuffle as usual. Must be a function of the epoch alone (resumed and multi-process runs)."""
        return None

    def prepare_model(self, model: PreTrainedModel, context: RunContext) -> PreTrainedModel:
        """Model stage: wrap or modify the student (e.g. attach peft adapters)."""
        return model

    def on_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        """Called once before the first step (e.g. to estimate a Fisher information)."""

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """Loss stage: a regularizer added to each optimizer step's loss, or None.

        Called once per optimizer step (on its first micro-batch, whose loss it joins in full), so
        that its value and gradient are computed once whatever the gradient accumulation."""
        return None


class RecordError(ValueError):
    """A record a data format cannot read; the data stage adds the file and the record's number."""


class DataFormat(Strategy):
    """How one record of a ``datasets:`` entry becomes ``input_ids`` and ``labels`` (Axolotl's ``type``).

    ``Params`` are the keys the format adds to a ``datasets:`` entry beside the common ones
    (``path``, ``split``, ...); the selected entry itself is ``self.params``. Labels are the input
    ids with ``-100`` where a token is not trained on (the prompt, unless ``train_on_inputs``):
    the teacher sees every input token, while the loss, the corrections and the specialized
    perplexity count the labelled ones only (``mft_plugin.data.labels``).
    """

    concatenates: ClassVar[bool] = False  # raw text: records are one stream cut into sequence_len blocks
    # the record columns a format reads, checked against a local file's first record at validation:
    column_keys: ClassVar[tuple[str, ...]] = ()  # Params keys whose value names a column (e.g. ``field``)
    fixed_columns: ClassVar[tuple[str, ...]] = ()  # columns every record must have, whatever the keys

    def __init__(self, params: BaseModel | None = None, **kwargs: Any) -> None:
        if params is not None and not isinstance(params, self.Params):  # an entry of another model: its format keys
            params = self.Params(**params.model_dump(include=set(self.Params.model_fields)))
        super().__init__(params, **kwargs)

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        """``{"input_ids": [...], "labels": [...]}`` of one record, equal lengths, untruncated;
        raise :class:`RecordError` for a record this format cannot read."""
        raise NotImplementedError
