"""Stage 8, after the runs: finished runs read back, tables (``results.md``/``.csv``) and the paper's plots."""
