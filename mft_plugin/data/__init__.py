"""Stage 2, the data: documents loaded and packed into blocks, labels, batches, and the declared
per-row routing columns a data-stage mitigation may add (:mod:`mft_plugin.data.batches`)."""
