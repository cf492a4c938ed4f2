"""Inference engines (VAR: transformer, multi-scale VQ-VAE; Infinity: text-conditioned transformer, BSQ-VAE
decoder), the KV cache they share, the generation loops and the model configs."""
