"""Packing's promise, measured on the loaded model: packed records never attend to each other.

With ``sample_packing`` a row holds several records back to back, ``position_ids`` restarting at 0
for each and no attention mask (:mod:`mft_plugin.data.packing`); transformers' masking turns the
restarts into a block-diagonal causal mask. A model that ignores ``position_ids`` for its mask (remote
code, another attention implementation, an older wrapper) lets every record attend to the ones before
it, and the losses and perplexities change without a word. :func:`check_packing` runs one packed pair
against the two records alone, as :func:`mft_plugin.models.heads.fusable_head` probes the head, and
refuses packing where they differ.
"""

from __future__ import annotations

import logging

import torch

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import POSITIONS, PaddingCollator, model_inputs
from mft_plugin.models.forms import eval_mode
from mft_plugin.models.heads import PROBE_RTOL

logger = logging.getLogger(__name__)
PROBE_RECORDS = (5, 4)  # tokens of the two probe records


class PackingLeakError(ValueError):
    """A packing key asks for packed rows, and the loaded model lets packed records attend to each other."""


def packing_keys(config: MFTConfigBase) -> list[str]:
    """The keys that ask for packed rows: ``sample_packing`` (training, and evaluation by default) and ``eval_sample_packing``."""
    keys = ["sample_packing"] if config.sample_packing else []
    return keys + (["eval_sample_packing"] if config.eval_sample_packing else [])


@torch.no_grad()
def packing_leak(model: torch.nn.Module, vocab_size: int) -> float:
    """Largest difference, relative to the largest logit, between the logits of two records packed in
    one row and those of each record run alone (0 where the packed mask keeps them apart)."""
    device = next(model.parameters()).device
    ids = [(torch.arange(n) * 7 + 3 + 11 * i) % vocab_size for i, n in enumerate(PROBE_RECORDS)]  # distinct tokens
    collate = PaddingCollator(pad_token_id=0)
    packed = collate([{"input_ids": torch.cat(ids).tolist(), POSITIONS: [p for n in PROBE_RECORDS for p in range(n)]}])
    with eval_mode(model):
        together = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(packed).items()}).logits[0]
        alone = torch.cat([
            model(**{k: v.to(device) for k, v in model_inputs(collate([{"input_ids": record.tolist()}])).items()}).logits[0]
            for record in ids
        ])  # fmt: skip
    return ((together.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6)).item()


def check_packing(config: MFTConfigBase, model: torch.nn.Module) -> None:
    """Refuse the packing keys of ``config`` (PackingLeakError, one line) where the loaded ``model``
    lets packed records attend to each other; nothing to check without packing. Run on the loaded
    model, in the process that trains, before the Trainer wraps it (as the head probe)."""
    keys = packing_keys(config)
    if not keys:
        return
    if config.engine_name == "deepspeed":  # ZeRO-3 partitions the weights as they load: no forward before the engine
        logger.warning("%s: the packed mask cannot be probed before DeepSpeed's engine runs the model; not checked", keys[0])
        return
    dtype = next(model.parameters()).dtype
    leak = packing_leak(model, model.get_input_embeddings().num_embeddings)
    if not leak <= PROBE_RTOL.get(dtype, 2e-2):
        raise PackingLeakError(
            f"{keys[0]}: true, but this model ({type(model).__name__}, attn_implementation "
            f"{getattr(model.config, '_attn_implementation', None)!r}) lets packed records attend to each other "
            f"(a packed pair's logits differ from the records run alone by {leak:.3g} of the largest): it ignores "
            f"the position_ids that separate them; set {' and '.join(f'{key}: false' for key in keys)} or use another attn_implementation"
        )
