#!/usr/bin/env bash
# The paper's experiment in miniature (issue 3), on the shipped reference model and corpora, on CPU.
# Two streams of sweeps run side by side (one per core); each sweep skips finished runs when
# started again, so an interrupted reproduction resumes. Tables and plots: outputs/miniature/*/results.md
# and the combined report at docs/miniature/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
(for part in legal ablation tau; do mft-run sweep "bench/miniature/$part.yml"; done) &
(for part in code replay lora dora; do mft-run sweep "bench/miniature/$part.yml"; done) &
wait
mft-run report outputs/miniature/legal outputs/miniature/ablation outputs/miniature/code outputs/miniature/tau \
  outputs/miniature/replay outputs/miniature/lora outputs/miniature/dora --out docs/miniature
