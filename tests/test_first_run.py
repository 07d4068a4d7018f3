"""The first run tells the story (issue 17): the README's first command, shortened, prints FT against
MFT in words and in a table, with named progress bars and without the libraries' noise.

The quickstart sweep runs as a newcomer runs it, in a fresh process (the library messages come at
import) with a fresh datasets cache (datasets' split bars come on a file's first load), on the tiny
model and corpora instead of the shipped ones, and 2 steps.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from mft_plugin.config.errors import validate_config
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.documents import load_documents
from mft_plugin.models.forms import missing_untied_keys
from mft_plugin.report.plots import DG_VS_S
from mft_plugin.train.console import BNB_4BIT_KERNEL, DEEPSPEED_CPU, quiet_unused_libraries
from mft_plugin.train.outputs import METRICS_FILE
from tests.tiny import REPO

QUICKSTART = REPO / "yaml_examples" / "quickstart_ft_vs_mft.yml"
LIBRARY_NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed, imported by transformers though the run does not use it
    "gemm_4bit_forward",  # bitsandbytes, imported by peft though the run holds no 4-bit weights
    "There were missing keys in the checkpoint model loaded",  # transformers, on the tied lm_head
    "Generating train split",  # datasets, one bar per data file
)
PHASES = (
    "Tokenizing and packing into 64-token blocks", "Base model perplexity (spec)", "Base model perplexity (general)",
    "Training (steps)", "Evaluating perplexity (spec)", "Evaluating perplexity (general)",
)  # fmt: skip


@pytest.fixture(scope="module")
def quickstart(tiny_model: Path, corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The output folder and the whole console output (stdout, then stderr) of the shortened quickstart."""
    tmp = tmp_path_factory.mktemp("quickstart")
    overrides = {
        "base_model": tiny_model, "datasets.0.path": corpora["spec_train"], "test_datasets.0.path": corpora["spec_val"],
        "general_eval_datasets.0.path": corpora["general_val"], "sequence_len": 64, "micro_batch_size": 2,
        "max_steps": 2, "eval_steps": 2, "output_dir": tmp / "out",
    }  # fmt: skip
    command = [sys.executable, "-m", "mft_plugin.cli", "sweep", str(QUICKSTART)]
    command += [f"--set={key}={value}" for key, value in overrides.items()]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "datasets_cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return tmp / "out", result.stdout + result.stderr


def test_the_quickstart_ends_with_ft_and_mft_in_words_and_in_a_table(quickstart: tuple[Path, str]) -> None:
    folder, output = quickstart
    for name, objective in (("objective=ft", "ft"), ("objective=mft", "mft (tau 0.25)")):
        metrics = json.loads((folder / name / METRICS_FILE).read_text())
        summary = [
            f"Trained: objective {objective}; mitigations: none.",
            "Final model: the checkpoint of step 2, the least specialized validation perplexity among 1 evaluation.",
            f"  S    = {100 * metrics['eval_S']:5.1f} %   specialization: spec perplexity "
            f"{metrics['base_spec_ppl']:.2f} (base) -> {metrics['eval_spec_ppl']:.2f}",
            f"  DG   = {100 * metrics['eval_DG']:5.1f} %   degeneralization: general perplexity "
            f"{metrics['base_general_ppl']:.2f} (base) -> {metrics['eval_general_ppl']:.2f}",
            f"  DG/S = {metrics['eval_DG/S']:5.3f}     degeneralization per unit of specialization (lower is better)",
            f"Model: {folder / name}/   metrics: {folder / name / METRICS_FILE}   every evaluation: "
            f"{folder / name / 'trainer_state.json'}",
        ]
        assert "\n".join(summary) in output
    assert '"total_flos"' not in output  # no raw JSON dump
    rows = [line.split(" | ")[0] for line in output.splitlines() if line.startswith("| ")]
    assert rows == ["| method", "| ---", "| ft", "| mft (tau 0.25)"]
    assert (folder / DG_VS_S).read_bytes().startswith(b"\x89PNG")


def test_the_quickstart_names_each_phase_and_prints_none_of_the_library_noise(quickstart: tuple[Path, str]) -> None:
    _, output = quickstart
    assert [phase for phase in PHASES if phase not in output] == []
    assert [noise for noise in LIBRARY_NOISE if noise in output] == []


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_library_messages_are_dropped_only_for_runs_they_do_not_concern(base_config: dict[str, Any]) -> None:
    plain = validate_config(base_config)
    quantized_teacher = validate_config({**base_config, "teacher": {"load_in_4bit": True}})
    deepspeed_too = quantized_teacher.model_copy(update={"deepspeed": "zero2.json"})
    (bnb_logger, bnb_message), (ds_logger, ds_message) = BNB_4BIT_KERNEL, DEEPSPEED_CPU
    messages = [
        (bnb_logger, f"{bnb_message} from kernels-community: No module named 'kernels'"),
        (bnb_logger, "another bitsandbytes warning"),
        (ds_logger, f"{ds_message}. If you have GPU or other accelerator, we were unable to detect it."),
    ]
    collected = Collected()  # on the loggers themselves: DeepSpeed's does not propagate once imported

    def shown_after(configs: list[MFTConfigBase]) -> list[str]:
        quiet_unused_libraries(configs)
        collected.messages.clear()
        for name, message in messages:
            logging.getLogger(name).warning(message)
        return list(collected.messages)

    for name in (bnb_logger, ds_logger):
        logging.getLogger(name).addHandler(collected)
    try:
        assert shown_after([plain]) == [messages[1][1]]  # every other message of those libraries still shows
        assert shown_after([plain, quantized_teacher]) == [messages[0][1], messages[1][1]]
        assert shown_after([plain, deepspeed_too]) == [message for _, message in messages]
    finally:
        quiet_unused_libraries([deepspeed_too])  # drops nothing: as before the test
        for name in (bnb_logger, ds_logger):
            logging.getLogger(name).removeHandler(collected)


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_is_not_a_missing_key(tied: bool) -> None:
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config)
    saved = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as transformers saves it tied
    result = model.load_state_dict(saved, strict=False)
    assert result.missing_keys == ["lm_head.weight"]
    assert missing_untied_keys(model, result.missing_keys) == ([] if tied else ["lm_head.weight"])
    # a key missing for real stays missing, tied or not
    del saved["model.norm.weight"]
    result = model.load_state_dict(saved, strict=False)
    assert missing_untied_keys(model, result.missing_keys) == ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])


def test_loading_documents_leaves_datasets_bars_as_they_were(base_config: dict[str, Any]) -> None:
    from datasets import disable_progress_bars, enable_progress_bars
    from datasets.utils import are_progress_bars_disabled

    spec = validate_config(base_config).datasets[0]
    load_documents(spec)
    assert not are_progress_bars_disabled()  # on again for our own (tokenizing) bars
    disable_progress_bars()
    try:
        load_documents(spec)
        assert are_progress_bars_disabled()  # the user's choice is kept
    finally:
        enable_progress_bars()
