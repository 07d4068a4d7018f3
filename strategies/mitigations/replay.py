"""``replay``: general-domain (pre-training) rows mixed into every micro-batch.

Paper Sec. 3.1, "Baselines": each batch holds 50% general-domain and 50% specialized samples;
Sec. 3.3 and Table 7 vary the share of new data nu (``ratio``); nu = 1 is plain finetuning.

The proportion is exact in every micro-batch, not on average: with k = ratio * micro_batch_size
new rows per micro-batch (validated to be a whole number), the training set is laid out as
micro-batches of k specialized rows followed by micro_batch_size - k general rows, and the core
keeps whole micro-batches (``mft_plugin.data.batches``), also per rank and under gradient
accumulation. One epoch is one pass over the specialized data, in a new order each epoch (the last
micro-batch is topped up from the start of the shuffled specialized rows). The general rows are one
seeded stream of shuffles of the general data that every epoch continues (:meth:`epoch_order`), so
each epoch replays general rows the previous ones have not, until all have been seen; an epoch that
needs more rows than the general data has cycles them (with a log line).
Replay rows train on the plain FT loss by default (they are pre-training text, not corrections
of the teacher); ``replay_loss: objective`` gives them the objective's loss instead.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mft_plugin.config.schema import DatasetConfig
from mft_plugin.strategy import Mitigation, StrategyParams

if TYPE_CHECKING:
    from datasets import Dataset

    from mft_plugin.train.context import RunContext

logger = logging.getLogger(__name__)


class ReplayParams(StrategyParams):
    ratio: float = Field(0.5, gt=0.0, le=1.0, description="nu: share of new (specialized) rows in every micro-batch")
    datasets: list[DatasetConfig] = Field(min_length=1, description="general-domain sources, like `datasets:`")
    replay_loss: Literal["ft", "objective"] = Field(
        "ft", description="loss of the replay rows: plain FT (they are pre-training data) or the objective's"
    )


def new_rows_per_batch(ratio: float, micro_batch_size: int) -> int | None:
    """k = ratio * micro_batch_size if it is a whole number of at least 1, else None."""
    k = round(ratio * micro_batch_size)
    return k if k >= 1 and math.isclose(ratio * micro_batch_size, k, abs_tol=1e-9) else None


def shuffled_stream(size: int, start: int, count: int, seed: int) -> list[int]:
    """Items ``start .. start + count`` of an endless stream of seeded shuffles of ``range(size)``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < start + count:
        stream += torch.randperm(size, generator=generator).tolist()
    return stream[start : start + count]


def composed_order(num_new: int, num_general: int, k: int, micro_batch_size: int, seed: int, epoch: int = 0) -> list[int]:
    """Row order over ``new + general`` (general rows offset by ``num_new``) for one epoch: micro-batches
    of k new rows then ``micro_batch_size - k`` general ones, covering every new row once; the general
    rows continue the stream where the previous epoch stopped."""
    batches, replay = math.ceil(num_new / k), micro_batch_size - k
    new = shuffled_stream(num_new, 0, batches * k, seed + 2 * epoch)
    general = shuffled_stream(num_general, epoch * batches * replay, batches * replay, seed + 1)
    order: list[int] = []
    for b in range(batches):
        order += new[b * k : (b + 1) * k] + [num_new + i for i in general[b * replay : (b + 1) * replay]]
    return order


class ReplayMitigation(Mitigation):
    name = "replay"
    Params = ReplayParams
    composition: tuple[int, int, int, int, int] | None = None  # (new rows, general rows, k, micro-batch, seed)

    @classmethod
    def config_problems(cls, params: ReplayParams, config: Any) -> list[str]:
        problems = []
        if getattr(config, "group_by_length", False):  # the micro-batch sampler keeps each batch's composition
            problems.append("group_by_length: replay composes every micro-batch, so rows cannot be regrouped by length")
        if getattr(config, "curriculum_sampling", False):
            problems.append("curriculum_sampling: replay composes every micro-batch from a seeded draw, so rows cannot keep the data's order")
        if new_rows_per_batch(params.ratio, config.micro_batch_size) is None:
            problems.append(
                f"mitigations.replay.ratio: {params.ratio} x micro_batch_size {config.micro_batch_size} = "
                f"{params.ratio * config.micro_batch_size:g} new rows per micro-batch; it must be a whole number "
                "of at least 1 (e.g. ratio 0.5 with an even micro_batch_size)"
            )
        return problems

    def prepare_data(self, train_dataset: Dataset, context: RunContext) -> Dataset:
        """The specialized rows followed by every general row, flagged; :meth:`epoch_order` composes them."""
        from mft_plugin.data.batches import FT_LOSS_COLUMN, REPLAY_COLUMN
        from mft_plugin.data.packing import concatenate_rows

        config = context.config
        k = new_rows_per_batch(self.params.ratio, config.micro_batch_size)
        general = context.packed_blocks(self.params.datasets)  # raw text, every token a label
        new = train_dataset
        if len(new) == 0 or len(general) == 0:
            raise ValueError(f"replay: {'the training data' if len(new) == 0 else 'mitigations.replay.datasets'} is empty")
        self.composition = (len(new), len(general), k, config.micro_batch_size, config.seed)
        needed = len(self.epoch_order(0)) // config.micro_batch_size * (config.micro_batch_size - k)  # per epoch
        if needed > len(general):
            logger.warning(
                "replay: an epoch needs %d general rows but mitigations.replay.datasets has %d blocks of %d tokens; "
                "cycling them (each used up to %d times per epoch)",
                needed, len(general), config.sequence_len, math.ceil(needed / len(general)),
            )  # fmt: skip
        flag_ft = int(self.params.replay_loss == "ft")
        new = new.add_column(REPLAY_COLUMN, [0] * len(new)).add_column(FT_LOSS_COLUMN, [0] * len(new))
        general = general.add_column(REPLAY_COLUMN, [1] * len(general))
        general = general.add_column(FT_LOSS_COLUMN, [flag_ft] * len(general))
        return concatenate_rows(new, general)

    def epoch_order(self, epoch: int) -> list[int] | None:
        return composed_order(*self.composition, epoch=epoch) if self.composition is not None else None
