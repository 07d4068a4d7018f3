"""``unfrozen_parameters`` entries as Axolotl parses them (its ``LayerNamePattern``): a name regex whose
``.`` is a literal dot, and an optional trailing ``[start:end]`` of rows. Here, in the config stage, so
that the schema checks the patterns before any model loads; :mod:`mft_plugin.models.freezing` applies them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ROWS = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")  # Axolotl's LayerNamePattern._parse_pattern


@dataclass(frozen=True)
class UnfrozenPattern:
    """One entry of ``unfrozen_parameters``: the name regex and the rows it trains (None: all)."""

    regex: re.Pattern[str]
    rows: tuple[int, int | None] | None

    @classmethod
    def parse(cls, pattern: str) -> UnfrozenPattern:
        """Raise ``ValueError`` for a pattern Axolotl would not compile either."""
        name, rows = pattern, None
        if found := _ROWS.match(pattern):
            name, start, end = found.groups()
            if end is None and start.isdecimal():
                rows = (int(start), int(start) + 1)
            else:
                rows = (int(start) if start else 0, int(end) if end else None)
                if rows[1] is not None and rows[0] >= rows[1]:
                    raise ValueError(f"rows [{start}:{end}]: the end must be greater than the start")
        try:
            return cls(re.compile(re.sub(r"\.(?!\+)", r"\\.", name)), rows)
        except re.error as error:
            raise ValueError(str(error)) from None
