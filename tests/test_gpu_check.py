"""``bench/gpu_check.sh`` keeps working between GPU leases: its CPU parts run here, every check reports.

On a machine without CUDA the GPU-only part (bench_step's paper-size step times) is skipped after
its arguments are checked, and the others run at CPU sizes (float32, a 2-step training, V 128k loss
memory at 128 tokens); see ``bench/gpu_check.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import REPO


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU parts; on a GPU run bench/gpu_check.sh itself")
def test_gpu_check_runs_its_cpu_parts_and_writes_one_results_file(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    verdicts = {row[0].removeprefix("| "): row[1] for row in rows[1:]}
    assert verdicts == {
        "fused bf16 training": "pass",
        "QLoRA + MFT, shared teacher": "pass",
        "packing vs rows alone": "pass",
        "step-time ratios (--gpu-paper-size)": "skipped",
        "loss memory at V 128k": "pass",
    }
