"""Calibration statistics: observer vs a naive computation, serialisation, disk cache, reports."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.policies.helpers import SMALL, synthetic_calibration
from tuner import calibration as C
from tuner import calibration_report as R
from tuner.errors import UserError


def feed(obs, g, rows=2, seed=0, chunk=None):
    """Call the observer like the engine with the full policy; returns the tensors used."""
    gen = torch.Generator().manual_seed(seed)
    h, d = g.num_heads, 8
    k = torch.nn.functional.normalize(torch.randn(g.num_layers, rows, h, g.seq_len, d, generator=gen), dim=-1)
    q = torch.randn(g.num_layers, rows, h, g.seq_len, d, generator=gen)
    for s in range(g.num_scales):
        n = g.tokens_through(s)
        pos = torch.arange(n).expand(rows, h, n)
        for layer in range(g.num_layers):
            obs(layer, s, q[layer, :, :, g.scale_starts[s]:n], k[layer, :, :, :n], k[layer, :, :, :n], pos)
    return q, k


def naive(q, k, g, layer, s, htk_fraction, scale=1.0):
    start, n = g.scale_starts[s], g.tokens_through(s)
    attn = torch.softmax(q[layer, :, :, start:n] @ k[layer, :, :, :n].transpose(-1, -2) * scale, dim=-1)
    car = attn[..., start:].sum(-1).mean(-1).mean()
    top = max(1, math.ceil(htk_fraction * start))
    htk = attn[..., :start].topk(top, dim=-1).values.sum(-1).mean(-1).mean() if start else None
    dens = [float(attn[..., g.scale_starts[i]:g.tokens_through(i)].sum((-1, -2)).mean() / g.scale_lengths[i])
            for i in range(s + 1)]
    return float(car), (None if htk is None else float(htk)), dens


@pytest.mark.parametrize("chunk", [C.QUERY_CHUNK_ELEMENTS, 7])
def test_observer_matches_naive_statistics(chunk):
    g = SMALL
    obs = C.CalibrationObserver(g, model_name="small", spec=C.CalibrationSpec(htk_fraction=0.3),
                                softmax_scale=2.0, chunk_elements=chunk)
    q, k = feed(obs, g)
    cal = obs.finalize()
    for layer in range(g.num_layers):
        for s in range(g.num_scales):
            car, htk, dens = naive(q, k, g, layer, s, 0.3, scale=2.0)
            if s:
                assert cal.car[layer][s] == pytest.approx(car, rel=1e-5)
                assert cal.htk[layer][s] == pytest.approx(htk, rel=1e-5)
                assert cal.asi[layer][s] == pytest.approx(car * htk, rel=1e-5)
            else:
                assert cal.car[layer][0] is None and cal.htk[layer][0] is None
            assert list(cal.density[layer][s][:s + 1]) == pytest.approx(dens, rel=1e-5)
            # all the attention of scale s's queries lands somewhere: sum_i d[s][i] T_i = T_s
            total = sum(cal.density[layer][s][i] * g.scale_lengths[i] for i in range(g.num_scales))
            assert total == pytest.approx(g.scale_lengths[s], rel=1e-5)


def test_key_similarity_is_negative_l2_to_upsampled_previous_keys():
    g = SMALL  # patch_nums 1 2 3 4
    obs = C.CalibrationObserver(g)
    _, k = feed(obs, g)
    cal = obs.finalize()
    layer, s = 1, 3
    prev = k[layer, :, :, g.scale_starts[2]:g.tokens_through(2)]  # [R, H, 9, d]
    grid = prev.reshape(-1, 3, 3, 8).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    up = up.permute(0, 2, 3, 1).reshape(2, g.num_heads, 16, 8)
    want = -(up - k[layer, :, :, g.scale_starts[3]:]).norm(dim=-1).mean()
    assert cal.key_similarity[layer][s] == pytest.approx(float(want), rel=1e-5)
    assert cal.key_similarity[layer][0] is None
    # identical keys across scales (constant maps) are maximally similar: 0
    obs2 = C.CalibrationObserver(g)
    const = torch.ones(1, 1, g.seq_len, 4) / 2
    for s2 in range(g.num_scales):
        n = g.tokens_through(s2)
        obs2(0, s2, const[:, :, :g.scale_lengths[s2]].expand(1, 2, -1, -1),
             const[:, :, :n].expand(1, 2, -1, -1), None, torch.arange(n).expand(1, 2, n))
        obs2(1, s2, const[:, :, :g.scale_lengths[s2]].expand(1, 2, -1, -1),
             const[:, :, :n].expand(1, 2, -1, -1), None, torch.arange(n).expand(1, 2, n))
    assert obs2.finalize().key_similarity[0][3] == pytest.approx(0.0, abs=1e-6)


def test_finalize_refuses_missing_observations():
    obs = C.CalibrationObserver(SMALL)
    with pytest.raises(ValueError, match="full policy"):
        obs.finalize()


def test_round_trip_and_z_scores(tmp_path):
    cal = synthetic_calibration(SMALL, seed=2)
    again = C.Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    path = cal.save(tmp_path / "c.json")
    assert C.Calibration.load(path) == cal
    z = cal.asi_z()
    for s in range(1, SMALL.num_scales):
        col = [z[layer][s] for layer in range(SMALL.num_layers)]
        assert sum(col) == pytest.approx(0.0, abs=1e-9)
        assert sum(v * v for v in col) / len(col) == pytest.approx(1.0, rel=1e-4)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="tuner calibrate"):
        C.Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="layers"):
        C.Calibration.from_dict({**cal.to_dict(), "num_layers": 5})


def test_labels_spread_over_classes():
    assert C.calibration_labels(1000, 4) == [0, 250, 500, 750]
    assert C.calibration_labels(10, 12)[:3] == [0, 0, 1]


def test_cache_is_keyed_by_checkpoint_and_spec(tmp_path, monkeypatch):
    from tests.conftest import small_config

    calls = []

    def fake_calibrate(var, vae, model_cfg, samples=16, seed=0, progress=None, *, spec=None,
                       checkpoint_sha256=None, backend="torch", dtype=None, progress_per_scale=False):
        calls.append((checkpoint_sha256, spec))
        cal = synthetic_calibration(SMALL, seed=len(calls))
        return C.Calibration(**{**cal.__dict__, "spec": spec, "checkpoint_sha256": checkpoint_sha256})

    monkeypatch.setattr(C, "calibrate", fake_calibrate)
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path))
    assert C.default_cache_dir() == tmp_path / "calibration"
    cfg = small_config()
    spec = C.CalibrationSpec(samples=2)
    a = C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256="abc", spec=spec)
    b = C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256="abc", spec=spec)
    assert a == b and len(calls) == 1
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1
    C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256="abd", spec=spec)
    C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256="abc", spec=C.CalibrationSpec(samples=3))
    C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256=None, spec=spec)  # never cached
    C.load_or_compute_calibration(None, None, cfg, checkpoint_sha256=None, spec=spec)
    assert len(calls) == 5
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 3


def test_markdown_and_heatmaps(tmp_path):
    cal = synthetic_calibration(SMALL, seed=0)
    md = R.calibration_markdown(cal)
    assert "| layer | mean | rank |" in md and md.count("\n| 1 |") == 2
    paths = R.plot_calibration(cal, tmp_path)
    assert [p.name for p in paths] == ["key_similarity.png", "asi_z.png", "density.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
