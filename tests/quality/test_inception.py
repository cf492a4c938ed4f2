"""FID Inception-v3: state-dict layout of the standard weights file, forward shape, loading errors.

Layout facts from pytorch-fid's ``inception.py`` (``fid_inception_v3``: torchvision's ``Inception3``
with ``num_classes=1008, aux_logits=False``, FIDInceptionA/C/E blocks) and torchvision's module
definitions: 94 conv+BN units (stem 5, three A blocks × 7, B 4, four C blocks × 10, D 6, two E × 9),
each with ``conv.weight`` and four BN tensors, plus ``fc.weight``/``fc.bias`` → 472 keys, and one
``num_batches_tracked`` per BN in a current torch state dict (566).
"""
from __future__ import annotations

import pytest
import torch

from tuner.errors import UserError
from tuner.quality import inception
from tuner.quality.inception import WEIGHTS_ENV, FIDInceptionV3, load_fid_inception

EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch1x1.bn.bias": (320,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_state_dict_layout(model):
    state = model.state_dict()
    core = [k for k in state if not k.endswith("num_batches_tracked")]
    assert len(core) == 472 and len(state) == 566
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    blocks = list(dict.fromkeys(k.split(".")[0] for k in core))
    assert blocks == ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                      "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                      "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]
    assert all(not k.endswith("conv.bias") for k in core)  # convs have no bias in the TF graph
    assert model.Conv2d_1a_3x3.bn.eps == pytest.approx(1e-3)


def test_fid_specific_pooling(model):
    # TF average pooling ignores padding: a constant map stays constant up to the border.
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(inception._tf_avg_pool(ones), ones)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_forward_gives_2048_features(model):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = model(x)
    assert f.shape == (2, 2048) and model.num_features == 2048
    assert torch.isfinite(f).all()


def test_missing_weights_name_flag_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match=f"--inception-weights.*{WEIGHTS_ENV}"):
        load_fid_inception()
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match=f"not found .*{WEIGHTS_ENV}"):
        load_fid_inception()
    with pytest.raises(UserError, match="not found .*--inception-weights"):
        load_fid_inception(tmp_path / "also-nope.pth")


def test_bad_weight_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt"):
        load_fid_inception(tmp_path / "junk.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="missing: Conv2d_1a_3x3.bn.weight"):
        load_fid_inception(tmp_path / "partial.pth")


def test_round_trip_without_num_batches_tracked(model, tmp_path):
    # Older converted files carry no num_batches_tracked entries; both forms load. A wrong shape is refused.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    back = load_fid_inception(tmp_path / "w.pth")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="wrong shape: fc.weight"):
        load_fid_inception(tmp_path / "bad.pth")
