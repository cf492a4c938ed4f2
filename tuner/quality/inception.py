"""The FID Inception-v3 network in plain torch (no torchvision), for ImageNet-size models.

Architecture- and state-dict-compatible with the standard FID weights: TensorFlow's 2015-12-05
Inception as converted for pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity
ships the same layout). Module names follow torchvision's ``Inception3`` so the file loads directly.
What makes it the *FID* Inception rather than torchvision's: the A, C and first E blocks average-pool
without counting the zero padding (TensorFlow's behaviour), the last E block max-pools, and the
classifier has 1008 outputs. Features are the 2048-d global average pool after ``Mixed_7c``.

The weights cannot be downloaded here: pass a local file (``--inception-weights``) or set
``TUNER_INCEPTION_WEIGHTS``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tuner.errors import UserError

WEIGHTS_ENV = "TUNER_INCEPTION_WEIGHTS"
WEIGHTS_FLAG = "--inception-weights"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as in the TF graph) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3×3 'SAME' average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pooled branches (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Reduction 35→17: strided 3×3, strided double 3×3 and a max pool (384 + 96 + cin channels)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorized 7×7 convolutions (4 × 192 channels)."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Reduction 17→8: 3×3 and 7×7×3 strided branches and a max pool (320 + 192 + cin channels)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches (320 + 768 + 768 + 192 = 2048 channels).

    ``max_pool=True`` is the FID graph's last block (``Mixed_7c``), which max-pools in its pooled
    branch where the first one (``Mixed_7b``) averages without padding.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 returning the 2048-d pool features used by FID.

    ``forward(imgs [N, 3, H, W] in [0, 1]) -> [N, 2048]``: bilinear resize to 299×299
    (``align_corners=False``), scale to [-1, 1], then the network, as pytorch-fid does.
    ``fc`` (2048 → 1008) exists only so the standard file loads; :meth:`logits` uses it.
    """

    num_features = 2048  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pool features ``[N, 2048]`` of images ``[N, 3, H, W]`` in ``[0, 1]``."""
        if imgs.dim() != 4 or imgs.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(imgs.shape)}")
        x = F.interpolate(imgs.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        blocks = (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        for block in blocks:
            x = block(x)
        return x.mean(dim=(2, 3))

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``[N, 1008]`` (the TF graph's classes)."""
        return self.fc(self.forward(imgs))


def resolve_weights_path(path: str | Path | None = None) -> Path:
    """The weights file from ``path`` or ``$TUNER_INCEPTION_WEIGHTS``; a clear error if neither exists."""
    given = path if path is not None else os.environ.get(WEIGHTS_ENV)
    if not given:
        raise UserError(f"FID Inception weights are needed for this model and cannot be downloaded here: "
                        f"pass {WEIGHTS_FLAG} PATH or set {WEIGHTS_ENV} to a local copy of {WEIGHTS_FILE}")
    p = Path(given).expanduser()
    if not p.is_file():
        source = WEIGHTS_FLAG if path is not None else WEIGHTS_ENV
        raise UserError(f"FID Inception weights not found at {p} (from {source}); point it to a local copy "
                        f"of {WEIGHTS_FILE}")
    return p


def load_fid_inception(path: str | Path | None = None,
                       map_location: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` with the standard weights (eval mode, no gradients).

    Accepts the file with or without BatchNorm ``num_batches_tracked`` entries (older torch versions
    did not save them; they play no role in eval mode). Any other missing or extra key, or a shape
    mismatch, is a :class:`~tuner.errors.UserError`.
    """
    p = resolve_weights_path(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any load failure means a bad file)
        raise UserError(f"cannot read FID Inception weights {p} ({type(exc).__name__}); the file is corrupt "
                        f"or not a plain state dict: use {WEIGHTS_FILE}") from None
    if not isinstance(state, dict):
        raise UserError(f"{p} is not a state dict; use {WEIGHTS_FILE}")
    net = FIDInceptionV3()
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        problems = (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                           for what, keys in problems if keys)
        raise UserError(f"{p} is not the FID Inception-v3 state dict ({detail}); use {WEIGHTS_FILE}")
    net.load_state_dict(state, strict=False)
    net.eval().requires_grad_(False)
    return net.to(map_location)
