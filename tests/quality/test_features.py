"""The tiny FID feature network: shipped weights, held-out accuracy, loading errors, torchmetrics use."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuner.data.procedural import NUM_CLASSES, generate_images, make_dataset
from tuner.errors import UserError
from tuner.quality.features import DEFAULT_WEIGHTS, FeatureNet, load_feature_net
from tuner.quality.metrics import fid_images


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


@pytest.fixture(scope="module")
def held_out():
    images, labels = make_dataset(600, seed=424242)  # a seed used neither for training nor in its report
    return (images + 1) / 2, labels


def test_shipped_weights_are_a_small_plain_state_dict():
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    state = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["head.weight"].shape == (NUM_CLASSES, 128)


def test_held_out_accuracy_on_fresh_seeds(net, held_out):
    x, labels = held_out
    with torch.no_grad():
        acc = (net.logits(x).argmax(1) == labels).float().mean().item()
        blurred = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear", align_corners=False)
        acc_blur = (net.logits(blurred).argmax(1) == labels).float().mean().item()
    assert acc >= 0.97
    assert acc_blur >= 0.9  # robust to the ×4 tokenizer's softness


def test_features_shape_and_determinism(net, held_out):
    x, _ = held_out
    with torch.no_grad():
        f = net(x[:5])
        assert f.shape == (5, net.num_features) and net.num_features == 128
        assert torch.equal(f, net(x[:5]))
        # Other sizes are resized: a 64×64 upsampled copy gives close features.
        up = F.interpolate(x[:5], scale_factor=2, mode="nearest")
        assert (net(up) - f).abs().max() < 0.05 * f.abs().max()


def test_fid_separates_classes_and_not_seeds(net):
    # Same class distribution, other seeds → small FID; a different class distribution → large FID.
    a, _ = make_dataset(200, seed=1)
    b, _ = make_dataset(200, seed=2)
    c = generate_images(torch.arange(200) % 5, seed=3)  # only half of the classes
    same = fid_images((a + 1) / 2, (b + 1) / 2, net)
    other = fid_images((a + 1) / 2, (c + 1) / 2, net)
    assert 0 <= same < other / 3


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_feature_net(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_feature_net(tmp_path / "junk.pt")
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a FeatureNet"):
        load_feature_net(tmp_path / "other.pt")
    state = FeatureNet().state_dict()
    state["body.0.0.weight"] = torch.zeros(7, 3, 3, 3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not match"):
        load_feature_net(tmp_path / "wrong.pt")


def test_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(num_classes=4, num_features=16).eval()
    torch.save(net.state_dict(), tmp_path / "n.pt")
    back = load_feature_net(tmp_path / "n.pt")
    x = torch.rand(3, 3, 32, 32)
    assert back.num_features == 16 and torch.equal(back(x), net(x))
    assert not any(p.requires_grad for p in back.parameters())


def test_shipped_tiny_model_weights_load_with_weights_only():
    # The built-in model's VAR and VQ-VAE files are plain tensor state dicts (no pickled code), and the
    # loader's strict load of them reproduces the exact tensors.
    from tuner.model.loading import ASSETS, load_model

    loaded = load_model("tiny")
    for name, module in (("var_tiny.pth", loaded.var), ("vae_tiny.pth", loaded.vae)):
        state = torch.load(ASSETS / "tiny" / name, map_location="cpu", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
        own = module.state_dict()
        for key, value in state.items():
            if key in own:
                assert torch.equal(own[key].cpu(), value), key
    assert loaded.checkpoint_sha256 and loaded.config.name == "tiny"
