"""Device side: Flax NNX modules (towers, decoder, BEATs, WAVE heads, embedder paths, LoRA); never imports data/."""
