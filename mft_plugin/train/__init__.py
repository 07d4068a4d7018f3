"""Stage 7, the run: the recipe (one run top to bottom), the trainer, the engine, and what keeps a run
safe (preflight, output folder, checkpoints, signals, non-finite guard, degeneralization budget)."""
