#!/usr/bin/env bash
# The paper's experiment in miniature, on the shipped reference model and corpora, on CPU. Two parts:
#   short    (issue 3)  bench/miniature/*.yml: Table 2 on two domains, replay, LoRA, DoRA, Table 3 and the
#            tau sweep with one seed; 120 steps over the whole corpus (1.25-1.3 epochs). About an hour on 2 cores.
#   epochs8  (issue 18) bench/miniature/epochs8/*.yml: the paper's regime, 8.9 epochs over a 13-licence
#            subset, 8 evaluations per run, Table 3 and the tau sweep with 3 seeds (21 runs). About 30 CPU
#            minutes (measured: 28.8 + ~1), so an estimated 15-20 minutes on 2 free cores.
#   bash bench/reproduce.sh [short|epochs8]     (default: both)
#   bash bench/reproduce.sh epochs8-tables      (epochs8's tables from the runs finished so far, training nothing)
# Each part runs two streams of sweeps side by side (one per core); a sweep skips finished runs when
# started again and resumes an interrupted one, so an interrupted reproduction resumes. Run folders go
# to outputs/miniature/; tables and plots to docs/miniature/ (short) and docs/miniature_epochs8/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1

# Runs each argument (one stream: a bash command list) in the background, then waits for all of them
# and fails if any did.
streams() {
  local pids=() stream
  for stream in "$@"; do
    bash -euo pipefail -c "$stream" &
    pids+=($!)
  done
  local pid status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  return "$status"
}

short() {
  streams \
    'for part in legal ablation tau; do mft-run sweep "bench/miniature/$part.yml"; done' \
    'for part in code replay lora dora; do mft-run sweep "bench/miniature/$part.yml"; done'
  mft-run report outputs/miniature/legal outputs/miniature/ablation outputs/miniature/code outputs/miniature/tau \
    outputs/miniature/replay outputs/miniature/lora outputs/miniature/dora --out docs/miniature
}

EPOCHS8_RUNS=outputs/miniature/epochs8

epochs8() {
  local config=bench/miniature/epochs8
  # The 21 runs in two streams of about equal work (ft needs no teacher): Table 3 first, then tau.
  streams \
    "mft-run sweep $config/ablation.yml --grid 'objective=[ft, distill_ft]'
     mft-run sweep $config/tau.yml --grid 'objective.tau=[0.0, 0.75]'" \
    "mft-run sweep $config/ablation.yml --grid 'objective=[mft, singly_corrective]'
     mft-run sweep $config/tau.yml --grid 'objective.tau=[0.5]'"
  # Each sweep whole: its full table (sweep.json lists all its runs); a run still missing is trained here.
  mft-run sweep $config/ablation.yml
  mft-run sweep $config/tau.yml
  epochs8_tables
}

# The tables, plots and summary of docs/miniature_epochs8/ from the runs finished so far.
epochs8_tables() {
  local runs=$EPOCHS8_RUNS docs=docs/miniature_epochs8
  # Run folders named one by one (a sweep.json lists only what its last invocation planned), in the
  # tables' order: Table 3's rows; the tau sweep in tau order: 0, 0.25 (MFT), 0.5, 0.75, 1 (FT).
  local ablation_order=("$runs"/ablation/objective=ft,* "$runs"/ablation/objective=distill_ft,*
                        "$runs"/ablation/objective=singly_corrective,* "$runs"/ablation/objective=mft,*)
  local tau_order=("$runs"/tau/seed=*,objective.tau=0.0 "$runs"/ablation/objective=mft,* "$runs"/tau/seed=*,objective.tau=0.5
                   "$runs"/tau/seed=*,objective.tau=0.75 "$runs"/ablation/objective=ft,*)
  mft-run report "${ablation_order[@]}" --out $docs/ablation
  mft-run report "${tau_order[@]}" --out $docs/tau
  {
    python bench/miniature/epochs8/summary.py "${ablation_order[@]}" --title "Table 3: the incremental ablation"
    echo
    python bench/miniature/epochs8/summary.py "${tau_order[@]}" --title "Table 8: the target margin tau (1 = FT)"
  } > $docs/summary.md
}

case "${1:-all}" in
  short) short ;;
  epochs8) epochs8 ;;
  epochs8-tables) epochs8_tables ;;
  all) short; epochs8 ;;
  *) echo "usage: bash bench/reproduce.sh [short|epochs8|epochs8-tables]" >&2; exit 2 ;;
esac
