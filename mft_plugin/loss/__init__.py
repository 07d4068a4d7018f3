"""Stage 5, the loss: CE(p^C, p^S) with p^C = (1 - w) p^T + w 1_l (paper Sec. 2), written once
(:mod:`.corrected`), on full logits (:mod:`.plain`) or fused with the LM head chunk by chunk (:mod:`.chunked`)."""
