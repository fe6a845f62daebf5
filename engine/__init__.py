"""sdpo.engine: the Llama-family model, attention backends, padding-free packing, Hugging Face
checkpoint I/O and the training loop. Depends on ``sdpo.kernels`` only."""
