"""varkv-tuner: finds KV-cache allocation policies for next-scale visual autoregressive models.

Heavy dependencies (torch, optuna, ray, mlflow, triton) are imported inside the modules that use
them; importing ``tuner`` itself does no work.
"""
__version__ = "0.1.0"
