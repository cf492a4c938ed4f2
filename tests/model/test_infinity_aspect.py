"""Infinity at the official non-square aspect ratios (issue 19): the (h, w) schedules and their cache
geometry (token counts from the official ``dynamic_resolution_h_w`` table), RoPE normalised to the
ratio's 1M map with torch's half-to-even ties, and the engine generating non-square images that equal
the independent reading of the official inference (tests/model/infinity_official_reading.py)."""
from __future__ import annotations

import pytest
import torch

from tests.model.infinity_official_reading import VAE_PATCHIFY, official_infer, write_official_checkpoints
from tuner.errors import UserError
from tuner.geometry import CacheGeometry
from tuner.model.config import at_schedule, model_config
from tuner.model.infinity_generate import generate_infinity, random_text
from tuner.model.infinity_loading import load_infinity
from tuner.model.infinity_rope import rope_positions
from tuner.model.infinity_schedules import (ASPECT_NAMES, aspect_name, aspect_of_maps, aspect_ratio,
                                            infinity_schedule)

# dynamic_resolution_h_w[2.0]['1M']['scales'] of the official code (time axis dropped)
TWO_BY_ONE = ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
              (60, 30), (74, 37), (90, 45))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_checkpoints(tmp_path_factory.mktemp("infinity_aspect"))


def test_geometry_of_the_2_1_and_1_2_schedules():
    cfg = at_schedule(model_config("infinity-2b"), aspect="2:1")
    g = cfg.geometry
    assert g.shapes == TWO_BY_ONE and g.patch_nums == tuple(h for h, _ in TWO_BY_ONE)
    assert g.scale_lengths == (1, 4, 8, 18, 50, 128, 242, 450, 722, 1058, 1800, 2738, 4050)
    assert g.seq_len == 11_269 and g.tokens_through(g.num_scales - 2) == 7_219
    assert cfg.image_hw == (1440, 720) and cfg.resolution == 1440
    tall = at_schedule(model_config("infinity-2b"), aspect="1:2").geometry
    assert tall.shapes == tuple((w, h) for h, w in TWO_BY_ONE) and tall.seq_len == 11_269
    assert tall.patch_nums[:5] == (1, 2, 2, 3, 5) and tall.scale_starts[:5] == (0, 1, 5, 13, 31)
    # the first 5 scales of 2:1 (a 160 × 80 image) and the official 0.25M prefix (10 scales)
    five = at_schedule(model_config("infinity-2b"), aspect="2:1", scales=5)
    assert five.schedule == TWO_BY_ONE[:5] and five.geometry.seq_len == 81 and five.image_hw == (160, 80)
    assert at_schedule(model_config("infinity-2b"), aspect="2:1", scales=10).geometry.seq_len == 2_681
    assert infinity_schedule(2.0, "0.25M") == TWO_BY_ONE[:10]


def test_square_geometries_are_the_plain_patch_nums_geometry():
    g = CacheGeometry.from_shapes(2, 4, 32, ((1, 1), (2, 2), (4, 4)))
    assert g == CacheGeometry(2, 4, 32, (1, 2, 4)) and g.scale_shapes is None and g.is_square
    assert g.to_dict() == {"num_layers": 2, "num_heads": 4, "head_dim": 32, "patch_nums": [1, 2, 4]}
    flat = CacheGeometry.from_shapes(2, 4, 32, TWO_BY_ONE[:4])
    assert flat != CacheGeometry(2, 4, 32, (1, 2, 4, 6)) and flat.seq_len == 31
    assert CacheGeometry.from_dict(flat.to_dict()) == flat and flat.to_dict()["scale_shapes"][2] == [4, 2]
    assert flat.describe_scales() == "scales 1x1 2x2 4x2 6x3"
    with pytest.raises(ValueError, match="h = patch_nums"):
        CacheGeometry(2, 4, 32, (1, 2, 4), ((1, 1), (2, 2), (2, 4)))


def test_aspect_names_and_the_model_config():
    assert aspect_ratio("2:1") == 2.0 and aspect_ratio("8:6") == 1.333 and aspect_ratio("2:3") == 0.666
    assert aspect_name(0.5) == "1:2"
    test = model_config("infinity-test")
    at43 = at_schedule(test, aspect="4:3")  # keeps its 4 scales
    assert at43.schedule == ((1, 1), (2, 2), (4, 3), (8, 6)) and at43.aspect == "4:3"
    assert at43.sides == (1, 2, 4, 8)  # the heights
    assert at_schedule(test, scales=3).schedule == ((1, 1), (2, 2), (4, 4))
    assert at_schedule(test, sides=(1, 2, 4, 6, 8)).geometry == at_schedule(test, scales=5).geometry
    with pytest.raises(UserError, match="no official Infinity schedule; use one of the official ratios 1:3"):
        at_schedule(test, aspect="5:3")
    with pytest.raises(UserError, match="at --aspect 2:1 pass --scales N"):
        at_schedule(test, aspect="2:1", sides=(1, 2))
    with pytest.raises(UserError, match="applies to Infinity models only, not --model d16"):
        at_schedule(model_config("d16"), aspect="2:1")


def test_a_files_token_maps_name_their_aspect_ratio():
    """What `tuner policy check` re-evaluates an Infinity file at: its maps' ratio (4+ maps are unique)."""
    for name, ratio in ASPECT_NAMES.items():
        assert aspect_of_maps(infinity_schedule(ratio)[:4]) == name
        assert aspect_of_maps(infinity_schedule(ratio)) == name
    assert aspect_of_maps([(1, 1), (2, 2)]) == "1:1"  # shared by every ratio: 1:1 preferred
    with pytest.raises(ValueError, match="not the start of any official"):
        aspect_of_maps([(1, 1), (2, 2), (5, 5)])


def test_rope_positions_spread_over_the_ratio_1m_map_with_half_to_even_ties():
    pos = rope_positions(4, 2, (90, 45))  # the 4x2 map of 2:1: rows 0, 22.5, 45, 67.5 → 0, 22, 45, 68
    assert pos[:, 0].unique().tolist() == [0, 22, 45, 68] and pos[:, 1].unique().tolist() == [0, 22]
    assert pos[:3].tolist() == [[0, 0], [0, 22], [22, 0]]


def _compare(files, shapes, h_div_w, lens=(9, 5), patchify=False, **sampling):
    model_path, vae_path, sd, vae_sd = files
    loaded = load_infinity(model_path, vae_path, h_div_w=h_div_w, scales=len(shapes))
    assert loaded.engine.schedule == shapes
    text, lens = random_text(len(lens), 256, max(lens), seed=5, lens=lens)
    s = {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97, "cfg_insertion_layer": 0, **sampling}
    ours = generate_infinity(loaded.model, loaded.vae, text, lens, seed=11, **s)
    bits, images = official_infer(sd, vae_sd, shapes, text, list(lens), 11, s["cfg"], s["tau"], s["top_k"],
                                  s["top_p"], s["cfg_insertion_layer"], patchify, h_div_w=h_div_w)
    for si, (a, b) in enumerate(zip(ours.tokens, bits)):
        assert a.shape == b.shape and torch.equal(a, b), f"scale {si}: bits differ"
    assert ours.images.shape == images.shape and (ours.images - images).abs().max().item() < 1e-5
    return loaded, ours


@pytest.mark.parametrize("h_div_w,shapes,layer", [
    (2.0, TWO_BY_ONE[:5], 0),                        # 2:1, its first 5 scales: a 160 × 80 image
    (0.5, tuple((w, h) for h, w in TWO_BY_ONE[:5]), -1),  # 1:2, guidance on the last block's output
    (1.333, ((1, 1), (2, 2), (4, 3), (8, 6)), 0),     # 4:3
])
def test_non_square_generation_matches_the_official_reading(files, h_div_w, shapes, layer):
    loaded, ours = _compare(files, shapes, h_div_w, cfg_insertion_layer=layer)
    h, w = shapes[-1]
    assert ours.images.shape == (2, 3, 16 * h, 16 * w)
    g = loaded.engine.geometry
    assert g.shapes == shapes and [t.shape[1] for t in ours.tokens] == list(g.scale_lengths)
    # the official layout: every layer holds all L tokens of K and V, 4 rows (2 prompts × CFG), fp32
    assert ours.kv_bytes_allocated == g.seq_len * g.num_layers * 2 * 4 * g.num_heads * g.head_dim * 4
    ones = sum(int(t.sum()) for t in ours.tokens) / sum(t.numel() for t in ours.tokens)
    assert 0.05 < ones < 0.95  # both bit values are sampled: the comparison is not vacuous


def test_spatial_patchify_at_2_1_matches_the_official_reading(tmp_path):
    files = write_official_checkpoints(tmp_path, vae=VAE_PATCHIFY, seed=3)
    _, ours = _compare(files, TWO_BY_ONE[:4], 2.0, lens=(6, 4), patchify=True)
    assert ours.images.shape == (2, 3, 96, 48)  # 6x3 tokens → 12x6 latent cells → ×8 pixels


def test_the_runner_generates_non_square_images():
    from tuner.model.loading import load_model

    loaded = load_model("infinity-test", random_weights=True, aspect="2:1")
    assert loaded.config.schedule == TWO_BY_ONE[:4] and loaded.config.geometry.seq_len == 31
    res = loaded.generate_chunk([0, 3], seed=0, cfg=1.5, top_k=900, top_p=0.96)
    assert res.images.shape == (2, 3, 96, 48) and bool(torch.isfinite(res.images).all())
    with pytest.raises(UserError, match="--scales 14: the 2:1 schedule of infinity-test has 13 scales"):
        load_model("infinity-test", random_weights=True, aspect="2:1", scales=14)


def test_calibration_and_proxy_record_a_non_square_schedule(tmp_path):
    """What the search and the presets read: calibration statistics (AMS-KV's key similarity
    upsamples each ``h × w`` map to the next), per-head statistics and the proxy record, saved and
    read back with their maps; a scalekv policy plans from them and scores on the record."""
    from tuner.calibration import Calibration, CalibrationSpec, calibrate
    from tuner.model.loading import load_model
    from tuner.policies.base import PolicySpec
    from tuner.policies.registry import make_policy
    from tuner.quality.proxy import ProxyRecord, ProxySpec, proxy_score, record_proxy

    loaded = load_model("infinity-test", random_weights=True, aspect="4:3", scales=4)
    g = loaded.config.geometry
    cal = calibrate(loaded, spec=CalibrationSpec(samples=2, batch_size=2))
    assert cal.scale_shapes == g.shapes == ((1, 1), (2, 2), (4, 3), (8, 6)) and cal.heads is not None
    assert all(v is not None and v == v for row in cal.key_similarity for v in row[1:])
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal and again.check_geometry(g) is None
    with pytest.raises(ValueError, match="scales 1x1 2x2 4x3 8x6, the model has 2 layers with patch_nums"):
        cal.check_geometry(model_config("infinity-test").geometry)
    record = record_proxy(loaded, spec=ProxySpec(samples=2, batch_size=2))
    assert ProxyRecord.load(record.save(tmp_path / "r.pt")).equal(record) and record.geometry == g
    score = proxy_score(record, make_policy("scalekv", {"budget_fraction": 0.3}), PolicySpec(g, "t", cal))
    assert 0 < score.score < 1
