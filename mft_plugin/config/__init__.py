"""Stage 1, the YAML: its schema (Axolotl's keys plus ``objective``/``mitigations``), the key groups
(adapters and quantization, engines, loss), and errors reported as ``file:line: key: message``.

Nothing here imports torch or transformers: a typo is reported before anything heavy loads.
"""
