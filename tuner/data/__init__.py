"""Training and evaluation data generated on the fly (no downloads): see :mod:`tuner.data.procedural`."""
