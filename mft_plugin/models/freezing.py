"""Axolotl's ``unfrozen_parameters``: partial full finetuning, by parameter name.

Every parameter whose name matches none of the patterns is frozen (``requires_grad = False``), as
``axolotl.utils.freeze.freeze_layers_except`` does. A pattern is a regular expression matched at the
start of the name (``re.match``) in which a ``.`` not followed by ``+`` is a literal dot (the dots of
module paths); a trailing ``[start:end]`` (or ``[index]``) trains only those rows of the matched
parameters: the gradient of the other rows is zeroed, so weight decay still moves them (Axolotl's
documented behaviour), and, as in Axolotl, the rows of any matching pattern limit a parameter that
another pattern names whole. The teacher is unaffected: it is the frozen copy of the base (paper Sec. 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mft_plugin.config.errors import ConfigError
from mft_plugin.config.unfrozen import UnfrozenPattern

if TYPE_CHECKING:
    import torch


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter of ``model`` that no pattern names; the names left trainable.

    Raise :class:`ConfigError` when none is left (Axolotl only warns, then trains nothing), or when rows
    go past a parameter's."""
    parsed = [UnfrozenPattern.parse(pattern) for pattern in patterns]
    trained = []
    for name, param in model.named_parameters():
        matching = [pattern for pattern in parsed if pattern.regex.match(name)]
        param.requires_grad = bool(matching)
        if not matching:
            continue
        trained.append(name)
        if rows := [pattern.rows for pattern in matching if pattern.rows is not None]:
            _train_rows_only(param, rows)
    if not trained:
        raise ConfigError([f"unfrozen_parameters: no parameter of the model matches any of {patterns}, so nothing would train"])
    return trained


def _train_rows_only(param: torch.nn.Parameter, rows: list[tuple[int, int | None]]) -> None:
    """Zero the gradient of every row of ``param`` (shape [rows, ...]) outside ``rows``."""
    import torch

    size = len(param)
    kept = torch.zeros(size, dtype=torch.bool)
    for start, end in rows:
        if end is not None and end > size:
            raise ConfigError([f"unfrozen_parameters: rows [{start}:{end}] go past the {size} rows of a parameter"])
        kept[start : size if end is None else end] = True
    frozen = (~kept).nonzero().flatten()
    param.register_hook(lambda grad: grad.index_fill(0, frozen.to(grad.device), 0))
