"""Procedural class-conditional images: determinism, balance, class structure, long-range structure."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tuner.data import procedural
from tuner.data.procedural import (
    CLASS_NAMES,
    CLASSES,
    LAYOUTS,
    NUM_CLASSES,
    TEXTURES,
    describe,
    generate_images,
    make_dataset,
)
from tuner.data.shapes import SHAPES


def test_shape_dtype_range_and_determinism():
    labels = torch.arange(NUM_CLASSES).repeat(3)
    a = generate_images(labels, seed=5)
    assert a.shape == (30, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert torch.equal(a, generate_images(labels, seed=5))
    b = generate_images(labels, seed=6)
    assert (a - b).abs().mean() > 0.1  # another seed: other colours and positions


def test_chunked_rendering_matches_single_chunk(monkeypatch):
    labels = torch.arange(NUM_CLASSES).repeat(5)
    whole = generate_images(labels, seed=2)
    monkeypatch.setattr(procedural, "_CHUNK", 7)
    assert torch.equal(whole, generate_images(labels, seed=2))


def test_make_dataset_is_balanced_shuffled_and_consistent():
    images, labels = make_dataset(1003, seed=11)
    counts = Counter(labels.tolist())
    assert sorted(counts) == list(range(NUM_CLASSES))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert not torch.equal(labels, torch.sort(labels).values)
    assert torch.equal(images, generate_images(labels, seed=11))
    images2, labels2 = make_dataset(1003, seed=11)
    assert torch.equal(labels, labels2) and torch.equal(images, images2)


def test_no_single_attribute_identifies_a_class():
    assert NUM_CLASSES == 10 and len(set(CLASS_NAMES)) == NUM_CLASSES
    assert len(set(CLASSES)) == NUM_CLASSES
    for position, values in enumerate((LAYOUTS, SHAPES, TEXTURES)):
        counts = Counter(c[position] for c in CLASSES)
        assert set(counts) == set(values)
        assert min(counts.values()) >= 2, (values, counts)


def test_every_scale_carries_class_information():
    """Classes sharing a shape differ in both the coarse layout and the fine texture."""
    for shape in SHAPES:
        pair = [c for c in CLASSES if c[1] == shape]
        assert len(pair) == 2 and pair[0][0] != pair[1][0] and pair[0][2] != pair[1][2]


def test_companion_shares_the_object_colour_far_away():
    labels = torch.zeros(64, dtype=torch.long)  # horizontal-disc-solid: the object is one colour
    images = (generate_images(labels, seed=3) + 1) / 2
    p = procedural._draw_params(64, 3)
    cx, cy = procedural.object_centre(p)
    kx, ky = procedural.companion_centre(p)
    for i in range(64):
        obj = images[i, :, int(cy[i]), int(cx[i])]
        comp = images[i, :, int(ky[i]), int(kx[i])]
        assert torch.allclose(obj, p["fg0"][i], atol=1e-5)
        assert torch.allclose(comp, p["fg0"][i], atol=1e-5)
        dist = math.hypot(float(cx[i] - kx[i]), float(cy[i] - ky[i]))
        assert dist > 12.0  # distant objects (≥ 3 latent tokens apart at ×4)


def test_bad_labels_and_sizes():
    with pytest.raises(ValueError, match="labels must be in"):
        generate_images(torch.tensor([0, NUM_CLASSES]), seed=0)
    with pytest.raises(ValueError, match="positive"):
        make_dataset(0, seed=0)


def test_describe_lists_every_class():
    text = describe()
    for name in CLASS_NAMES:
        assert f"`{name}`" in text
    assert "companion" in text
