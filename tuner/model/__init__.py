"""VAR inference engine: transformer, multi-scale VQ-VAE, KV cache and generation loop."""
