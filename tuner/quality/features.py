"""The ``tiny`` model's feature network: a small CNN classifier of the procedural classes.

Its penultimate activations play the role Inception-v3's pool features play for ImageNet FID: the
Fréchet distance is computed on them (torchmetrics ``FrechetInceptionDistance(feature=net)``).
Trained by ``experiments/train_feature_net.py``; weights ship as a plain state dict in
``tuner/assets/tiny/feature_net.pt`` and load with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tuner.errors import UserError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "tiny" / "feature_net.pt"


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FeatureNet(nn.Module):
    """CNN on 32×32 RGB: three conv stages (32, 64, 96 channels), a 4×4 spatial map flattened into
    ``num_features`` features (keeping *where* things are, which a global pool would discard), then
    a linear classifier.

    Parameters
    ----------
    num_classes : int
        Classifier outputs (the procedural set has 10).
    num_features : int
        Width of the penultimate layer, the FID feature dimension.
    """

    def __init__(self, num_classes: int = 10, num_features: int = 128) -> None:
        super().__init__()
        if num_classes <= 0 or num_features <= 0:
            raise ValueError("num_classes and num_features must be positive")
        self.num_features = num_features  # read by torchmetrics' FrechetInceptionDistance
        self.num_classes = num_classes
        self.body = nn.Sequential(
            _conv(3, 32), _conv(32, 32), nn.MaxPool2d(2),
            _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2),
            _conv(64, 96), _conv(96, 96), nn.AdaptiveAvgPool2d(4),
        )
        self.embed = nn.Linear(96 * 16, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Parameters
        ----------
        imgs : Tensor ``[N, 3, 32, 32]`` in ``[0, 1]`` (other sizes are resized bilinearly)

        Returns
        -------
        Tensor ``[N, num_features]`` float32
        """
        x = imgs.float()
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        x = self.body(x * 2 - 1)
        return F.relu(self.embed(x.flatten(1)))

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]`` for images ``[N, 3, 32, 32]`` in ``[0, 1]``."""
        return self.head(self.forward(imgs))


def load_feature_net(path: str | Path | None = None, map_location: str | torch.device = "cpu") -> FeatureNet:
    """Load a trained :class:`FeatureNet` (eval mode, no gradients) from a plain state dict.

    ``path`` defaults to the shipped ``tuner/assets/tiny/feature_net.pt``. Sizes are read from the
    weights, so a net trained with other ``num_features`` loads too.
    """
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not p.is_file():
        raise UserError(f"feature network weights not found at {p}; pass an existing file or retrain with "
                        "`python -m experiments.train_feature_net`")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    # Truncated file, not a torch file, pickled objects refused by weights_only: all mean "bad file".
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read feature network weights {p} ({type(exc).__name__}); the file is "
                        "corrupt or not a plain state dict: retrain with "
                        "`python -m experiments.train_feature_net`") from None
    if not isinstance(state, dict) or "embed.weight" not in state or "head.weight" not in state:
        raise UserError(f"{p} is not a FeatureNet state dict (missing embed/head weights); retrain with "
                        "`python -m experiments.train_feature_net`")
    num_features, num_classes = state["embed.weight"].shape[0], state["head.weight"].shape[0]
    net = FeatureNet(num_classes=num_classes, num_features=num_features)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{p} does not match the FeatureNet architecture ({first}); retrain with "
                        "`python -m experiments.train_feature_net`") from None
    net.eval().requires_grad_(False)
    return net.to(map_location)
