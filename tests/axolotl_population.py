"""Axolotl's example YAMLs as a user moving to this machine would change them (issue 25).

The population is every supervised text finetuning YAML of Axolotl 0.18.0's ``examples/`` (no
``rl:``, no reward model, no vision ``processor_type``), copied into ``tests/axolotl_examples/population``
with its folder in its name (``llama-3__lora-1b.yml``; Apache-2.0, NOTICE.md there). Each is changed
only where a user must change it here (:func:`user_changes`), then validated in-process.

``python -m tests.axolotl_population [--preflight] [AXOLOTL_EXAMPLES]`` prints the count and, for each file
that does not validate, what stops it; ``--preflight`` adds the machine checks of ``mft-run --validate``;
with the folder of Axolotl's ``examples/`` it first refreshes the copies.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.tiny import REFERENCE_MODEL

POPULATION = Path(__file__).parent / "axolotl_examples" / "population"
MAX_SEQUENCE_LEN = 256  # the shipped model has 512 positions; short rows keep the tests fast
CUDA_KERNEL_PLUGINS = (
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
    "axolotl.integrations.liger.LigerPlugin",
    "axolotl.integrations.kernels.KernelsPlugin",
)
ENGINE_BLOCKS = ("deepspeed", "fsdp", "fsdp_config")  # one process here; the engines are README "Scaling out"
# the shipped model's own classes and tokenizer files load it; it has no mistral-common tokenizer (tekken.json)
MODEL_CLASS_KEYS = ("model_type", "tokenizer_type", "tokenizer_use_mistral_common")
MESSAGES = [
    {"role": "user", "content": "What does clause 4 say about renewal?"},
    {"role": "assistant", "content": "It renews the licence for one year unless either party objects."},
]


def is_supervised_text(config: Any) -> bool:
    """Whether an example YAML is supervised text finetuning: a config with datasets, no ``rl:``,
    no reward model, no vision processor (the issue's 198 of 252)."""
    if not isinstance(config, dict) or "base_model" not in config:
        return False
    trainers = ("rl", "reward_model", "process_reward_model", "processor_type")
    return not any(config.get(key) for key in trainers)


def copy_population(examples: Path) -> int:
    """Refresh the copies from Axolotl's ``examples/`` folder; the number copied."""
    shutil.rmtree(POPULATION, ignore_errors=True)
    POPULATION.mkdir(parents=True)
    count = 0
    for path in sorted([*examples.rglob("*.yml"), *examples.rglob("*.yaml")]):
        if is_supervised_text(yaml.safe_load(path.read_text(encoding="utf-8"))):
            shutil.copy(path, POPULATION / "__".join(path.relative_to(examples).parts))
            count += 1
    return count


def _record(entry: dict[str, Any]) -> dict[str, Any]:
    """One record with the columns a ``datasets`` entry of Axolotl reads, by its ``type``."""
    kind = entry.get("type")
    if "type" in entry and kind is None:  # Axolotl's pre-tokenized data: token ids of the shipped tokenizer
        ids = [1, 100, 200, 300, 2]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100, *ids[1:]]}
    if kind == "chat_template":
        mapping = entry.get("message_property_mappings") or {}
        role = mapping.get("role") or entry.get("message_field_role") or "role"
        content = mapping.get("content") or entry.get("message_field_content") or "content"
        messages = [{role: m["role"], content: m["content"]} for m in MESSAGES]
        if entry.get("field_thinking"):
            messages[1][entry["field_thinking"]] = "Clause 4 is the renewal clause."
        return {entry.get("field_messages") or "messages": messages}
    if kind in ("completion", None, "pretrain"):
        return {entry.get("field") or entry.get("text_column") or "text": "The licensee shall pay the fee monthly."}
    if kind == "jeopardy":
        return {"question": "It renews the licence for one year.", "category": "CLAUSES", "answer": "clause 4"}
    return {"instruction": "Summarise clause 4.", "input": "", "output": MESSAGES[1]["content"]}


def _local_entry(entry: Any, folder: Path, name: str) -> Any:
    """A ``datasets`` entry reading a local file of its format instead of a hub dataset."""
    if not isinstance(entry, dict):
        return entry
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(_record(entry)) for _ in range(8)) + "\n", encoding="utf-8")
    changed = {key: value for key, value in entry.items() if key not in ("data_files", "name", "ds_type")}
    return {**changed, "path": str(path)}


def user_changes(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``config`` changed only where a user moving to this machine must change it: the shipped model
    (its own model and tokenizer classes), local data files (written to ``folder``), ``sequence_len`` <= 256, no CUDA kernel plugins and no
    deepspeed/fsdp blocks, and ``objective: mft``."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = {key: value for key, value in config.items() if key not in (*MODEL_CLASS_KEYS, *ENGINE_BLOCKS)}
    changed["base_model"] = str(REFERENCE_MODEL)
    for group in ("datasets", "test_datasets"):
        if isinstance(changed.get(group), list):
            changed[group] = [_local_entry(e, folder, f"{group}-{i}") for i, e in enumerate(changed[group])]
    changed["sequence_len"] = min(int(changed.get("sequence_len") or 512), MAX_SEQUENCE_LEN)
    plugins = [plugin for plugin in changed.pop("plugins", None) or [] if plugin not in CUDA_KERNEL_PLUGINS]
    if plugins:
        changed["plugins"] = plugins
    changed["objective"] = "mft"
    return changed


def problems_of(path: Path, folder: Path, machine: bool = False) -> list[str]:
    """What stops the example at ``path`` from validating after :func:`user_changes` (empty: it validates).

    ``machine``: also the checks ``mft-run --validate`` makes against this machine and the model folder
    (preflight: libraries, attention, tokenizer, tokens); about a second a file."""
    from mft_plugin.config.errors import ConfigError, validate_config
    from mft_plugin.train.preflight import preflight

    try:
        config = validate_config(user_changes(yaml.safe_load(path.read_text(encoding="utf-8")), folder), source=path.name)
    except ConfigError as error:
        return error.problems
    try:
        if machine:
            preflight(config)  # no file:line: the changed config is not the file
    except ConfigError as error:
        return [f"{path.name}: {problem}" for problem in error.problems]
    return []


def main(argv: list[str]) -> int:
    import tempfile

    machine = "--preflight" in argv
    argv = [arg for arg in argv if arg != "--preflight"]
    if argv:
        print(f"copied {copy_population(Path(argv[0]))} examples into {POPULATION}")
    files = sorted(POPULATION.glob("*.y*ml"))
    stops: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        failing = 0
        for path in files:
            found = problems_of(path, Path(tmp) / path.stem, machine)
            failing += bool(found)
            for problem in found:
                print(problem)
                stops[problem.split(": ")[1] if ": " in problem else problem] += 1
    print(f"\n{len(files) - failing} of {len(files)} validate; what stops the rest, by key:")
    for key, count in stops.most_common():
        print(f"  {count:4d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
