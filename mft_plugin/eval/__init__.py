"""Stage 6, the measures: token-level perplexity and the paper's S, DG and DG/S (Sec. 3.1), which the
trainer takes at every evaluation and the final checkpoint is chosen by."""
