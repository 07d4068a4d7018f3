#!/usr/bin/env bash
# The GPU check (issue 23, section 4): the first command a session runs when `device` lends a GPU.
# Under 8 minutes on one H200 (stopped at 7m50s regardless); every check's verdict and numbers go
# to one results file (bench/results/gpu_check-cuda.md, or --out FILE). What each check does:
# bench/gpu_check.py. Without a GPU it runs the CPU parts (tests/test_gpu_check.py does so in CI).
#   bash bench/gpu_check.sh                               # here, or on the device machine:
#   bash bench/gpu_check.sh --out "$OUT/gpu_check.md"     # the file comes back with the run
# The device machine's python lacks some of mft-plugin's packages (datasets, pydantic,
# bitsandbytes, ...): carry them as wheels (.library/device/README.md) and `pip install --no-deps -e .`
# first; a check whose package is missing is reported as failed, with the module's name.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
"$PYTHON" - <<'PY'
import importlib.util
missing = [m for m in ("mft_plugin", "datasets", "peft", "bitsandbytes", "flash_attn") if importlib.util.find_spec(m) is None]
print("[gpu_check] not installed:", ", ".join(missing) if missing else "nothing")
PY
exec timeout 470 "$PYTHON" bench/gpu_check.py "$@"
