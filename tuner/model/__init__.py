"""VAR inference engine (transformer, multi-scale VQ-VAE, KV cache, generation loop) and the model configs,
Infinity's included (planning only: no Infinity engine yet)."""
