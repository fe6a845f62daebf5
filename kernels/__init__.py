"""sdpo.kernels: fused log-prob ops (lm_head -> log-softmax -> label gather -> per-sequence sum).

The lowest layer: torch and triton only, no model and no I/O."""
