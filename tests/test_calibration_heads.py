"""Per-(layer, head) calibration statistics: vs a direct computation, on generations, cache, determinism."""
from __future__ import annotations

import math

import pytest
import torch

from tuner import calibration as C
from tuner import calibration_heads as H
from tuner.calibration_heads_observer import HeadStatsObserver
from tuner.policies.base import CacheGeometry

G = CacheGeometry(2, 3, 8, (1, 2, 3, 4))  # 30 tokens; history >= 2 tokens from scale 2 on


def feed(obs, g: CacheGeometry, batches=(2, 1), seed=0):
    """Call the observer like the engine (full policy, scale-major), one generation per batch of images.

    Returns per batch ``(q, k)``: ``[layers, 2B, H, L, d]`` each (rows: B conditional, B unconditional).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        shape = (g.num_layers, 2 * b, g.num_heads, g.seq_len, g.head_dim)
        q, k = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        for s in range(g.num_scales):
            n = g.tokens_through(s)
            pos = torch.arange(n).expand(2 * b, g.num_heads, n)
            for layer in range(g.num_layers):
                kk = k[layer, :, :, :n]
                obs(layer, s, q[layer, :, :, g.scale_starts[s]:n], kk, kk, pos)
        out.append((q, k))
    return out


def reference(batches, g: CacheGeometry, scale: float):
    """Plain-Python statistics from explicitly computed attention probabilities, per image half.

    Returns ``mass[half][l][h][sq][src]``, ``disp[half][l][h][sq]`` (None without a dispersion) as
    means over the half's rows, and the number of images per half.
    """
    nl, nh, ns = g.num_layers, g.num_heads, g.num_scales
    sums = [[[[[0.0] * ns for _ in range(ns)] for _ in range(nh)] for _ in range(nl)] for _ in range(2)]
    dsum = [[[[0.0] * ns for _ in range(nh)] for _ in range(nl)] for _ in range(2)]
    rows, images = [0, 0], [0, 0]
    scale_of = [s for s in range(ns) for _ in range(g.scale_lengths[s])]
    image = 0
    for q, k in batches:
        b = q.shape[1] // 2
        for r in range(2 * b):
            half = (image + r % b) % 2
            rows[half] += 1
            for layer in range(nl):
                for h in range(nh):
                    qq, kk = q[layer, r, h].tolist(), k[layer, r, h].tolist()
                    for sq in range(ns):
                        start, n = g.scale_starts[sq], g.tokens_through(sq)
                        ents, ps = [], []
                        for i in range(start, n):
                            logits = [scale * sum(a * c for a, c in zip(qq[i], kk[j])) for j in range(n)]
                            top = max(logits)
                            e = [math.exp(x - top) for x in logits]
                            probs = [x / sum(e) for x in e]
                            for j, pr in enumerate(probs):
                                sums[half][layer][h][sq][scale_of[j]] += pr / g.scale_lengths[sq]
                            hist = probs[:start]
                            if len(hist) >= 2:
                                p = [x / sum(hist) for x in hist]
                                ents.append(-sum(x * math.log(x) for x in p if x > 0))
                                ps.append(p)
                        if ps:
                            m = [sum(col) / len(ps) for col in zip(*ps)]
                            hm = -sum(x * math.log(x) for x in m if x > 0)
                            dsum[half][layer][h][sq] += (sum(ents) / len(ents)) / hm
        for i in range(b):
            images[(image + i) % 2] += 1
        image += b
    mass = [[[[[v / rows[hf] for v in row] for row in m] for m in lay] for lay in sums[hf]]
            for hf in range(2)]
    disp = [[[[v / rows[hf] if g.scale_starts[s] >= 2 else None for s, v in enumerate(hd)] for hd in lay]
              for lay in dsum[hf]] for hf in range(2)]
    return mass, disp, rows, tuple(images)


@pytest.mark.parametrize("chunk", [1 << 24, 7])
def test_observer_matches_direct_computation(chunk):
    obs = HeadStatsObserver(G, softmax_scale=0.7, chunk_elements=chunk)
    batches = feed(obs, G, batches=(2, 1, 2))  # images 0 1 | 2 | 3 4: halves 0 1 | 0 | 1 0
    stats = H.stats_from(obs, "g", H.HeadSpec())
    mass, disp, rows, images = reference(batches, G, 0.7)
    assert stats.half_images == images == (3, 2)
    w = [r / sum(rows) for r in rows]
    for layer in range(G.num_layers):
        for h in range(G.num_heads):
            per_scale = []
            for sq in range(G.num_scales):
                for hf in range(2):
                    assert stats.mass_halves[hf, layer, h, sq].tolist() == pytest.approx(
                        mass[hf][layer][h][sq], abs=1e-6)
                full = [w[0] * a + w[1] * b for a, b in zip(mass[0][layer][h][sq], mass[1][layer][h][sq])]
                assert stats.mass[layer, h, sq].tolist() == pytest.approx(full, abs=1e-6)
                if disp[0][layer][h][sq] is None:
                    assert math.isnan(stats.dispersion_by_scale[layer, h, sq])
                    continue
                d = w[0] * disp[0][layer][h][sq] + w[1] * disp[1][layer][h][sq]
                assert float(stats.dispersion_by_scale[layer, h, sq]) == pytest.approx(d, rel=1e-5)
                per_scale.append(d)
            mean = sum(per_scale) / len(per_scale)
            assert float(stats.dispersion[layer, h]) == pytest.approx(mean, rel=1e-5)
            for hf in range(2):
                ds = [v for v in disp[hf][layer][h] if v is not None]
                got = float(stats.dispersion_halves[hf, layer, h])
                assert got == pytest.approx(sum(ds) / len(ds), rel=1e-5)


def test_mass_agrees_with_the_layer_calibration_density():
    """The per-layer AMS-KV density is the head-mean of the mass, rescaled by the token counts."""
    obs, cal_obs = HeadStatsObserver(G), C.CalibrationObserver(G)

    def both(*args):
        obs(*args)
        cal_obs(*args)

    feed(both, G)
    stats, cal = H.stats_from(obs, "g", H.HeadSpec()), cal_obs.finalize()
    n = G.scale_lengths
    for layer in range(G.num_layers):
        for sq in range(G.num_scales):
            want = [cal.density[layer][sq][i] * n[i] / n[sq] for i in range(G.num_scales)]
            assert stats.mass[layer, :, sq].mean(0).tolist() == pytest.approx(want, abs=1e-6)


def test_dispersion_separates_vertical_from_diagonal_heads():
    """Head 0 reads the spatially aligned key of the previous scale (diagonal), head 1 the same two keys
    from every query (vertical): dispersion ~0 vs ~1, and only head 1 is contextual."""
    g = CacheGeometry(1, 2, 21, (1, 2, 4))
    keys = torch.eye(g.seq_len)  # key j = e_j: q = 20·e_t attends key t with mass ~1
    q = torch.zeros(1, 2, g.seq_len, g.seq_len)
    for s in (1, 2):
        pn, prev = g.patch_nums[s], g.patch_nums[s - 1]
        for i in range(g.scale_lengths[s]):
            y, x = divmod(i, pn)
            aligned = g.scale_starts[s - 1] + (y * prev // pn) * prev + x * prev // pn
            q[0, 0, g.scale_starts[s] + i, aligned] = 20.0
            q[0, 1, g.scale_starts[s] + i, [1, 2]] = 20.0
    obs = HeadStatsObserver(g)
    k = keys.expand(2, 2, -1, -1)
    for s in range(g.num_scales):
        n = g.tokens_through(s)
        obs(0, s, q.expand(2, -1, -1, -1)[:, :, g.scale_starts[s]:n], k[:, :, :n], k[:, :, :n],
            torch.arange(n).expand(2, 2, n))
    stats = H.stats_from(obs, "g", H.HeadSpec())
    assert float(stats.dispersion[0, 0]) < 0.01 and float(stats.dispersion[0, 1]) > 0.99
    assert stats.contextual.tolist() == [[False, True]]
    assert float(stats.mass[0, 0, 2, 1]) > 0.99 and float(stats.history_mass()[0, 1, 2]) > 0.99


def test_generation_rows_sum_to_one_and_match_calibration_images(small_model):
    m = small_model
    images = C.CalibrationSpec(samples=3, batch_size=2)
    stats = H.compute_head_stats(m.var, m.vae, m.config, H.HeadSpec(images))
    g = stats.geometry
    assert stats.half_images == (2, 1)
    for t in (stats.mass, stats.mass_halves[0], stats.mass_halves[1]):
        sq, src = torch.meshgrid(torch.arange(g.num_scales), torch.arange(g.num_scales), indexing="ij")
        assert torch.allclose(t.sum(-1), torch.ones_like(t.sum(-1)), atol=1e-6)
        assert bool((t[..., src > sq] == 0).all()) and bool((t >= 0).all())
    # the same images as the per-layer calibration: its density is the head-mean of the mass
    cal = C.calibrate(m.var, m.vae, m.config, spec=images)
    n = g.scale_lengths
    for layer in range(g.num_layers):
        want = [[cal.density[layer][j][i] * n[i] / n[j] for i in range(g.num_scales)]
                for j in range(g.num_scales)]
        assert stats.mass[layer].mean(0).tolist() == [pytest.approx(row, abs=1e-6) for row in want]


def test_seeded_determinism(small_model):
    m = small_model
    spec = H.HeadSpec(C.CalibrationSpec(samples=2, batch_size=2, seed=3))
    a = H.compute_head_stats(m.var, m.vae, m.config, spec)
    assert a.equal(H.compute_head_stats(m.var, m.vae, m.config, spec))
    seed0 = H.HeadSpec(C.CalibrationSpec(samples=2, batch_size=2))
    other = H.compute_head_stats(m.var, m.vae, m.config, seed0)
    assert not torch.equal(a.mass, other.mass)


class NotATensor:
    """Something a weights_only load must refuse to unpickle."""


def test_cache_round_trip_weights_only_and_recompute(tmp_path, small_model, monkeypatch):
    m = small_model
    calls = []
    compute = H.compute_head_stats

    def counting(*args, **kw):
        calls.append(kw.get("checkpoint_sha256"))
        return compute(*args, **kw)

    monkeypatch.setattr(H, "compute_head_stats", counting)
    spec = H.HeadSpec(C.CalibrationSpec(samples=2, batch_size=2))

    def get(spec=spec, sha="random:seed 0"):
        return H.head_stats(m.var, m.vae, m.config, checkpoint_sha256=sha, spec=spec, cache_dir=tmp_path)

    a = get()
    path = H.cache_path(m.config, "random:seed 0", spec, tmp_path)
    assert path.is_file() and len(calls) == 1
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"meta", *H.TENSORS} and isinstance(raw["meta"], str)
    assert all(isinstance(raw[k], torch.Tensor) for k in H.TENSORS)
    assert H.HeadStats.load(path).equal(a) and get().equal(a) and len(calls) == 1
    get(H.HeadSpec(spec.images, contextual_quantile=0.75))            # spec change: computed again
    get(H.HeadSpec(C.CalibrationSpec(samples=3, batch_size=2)))
    get(sha="random:seed 1")
    assert len(calls) == 4 and len(list(tmp_path.glob("*_heads_*.pt"))) == 4
    get(sha=None)                                                        # random weights: never cached
    get(sha=None)
    assert len(calls) == 6 and len(list(tmp_path.glob("*.pt"))) == 4
    path.write_bytes(b"not a torch file")                               # corrupt: computed again
    assert get().equal(a) and len(calls) == 7
    torch.save({"meta": "{}", "mass": NotATensor()}, path)              # a pickle: refused, not loaded
    with pytest.raises(ValueError, match="cannot read head stats"):
        H.HeadStats.load(path)
    assert get().equal(a) and len(calls) == 8
    assert H.HeadStats.load(path).equal(a)


def test_spec_split_and_scas():
    with pytest.raises(ValueError, match="contextual_quantile"):
        H.HeadSpec(contextual_quantile=1.5)
    assert H.HeadSpec().key() != H.HeadSpec(C.CalibrationSpec(samples=17)).key()
    disp = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5], [float("nan"), 0.2, 0.9, 0.1]])
    assert H.contextual_split(disp, 0.5).tolist() == [[False, True, True, False], [True] * 4,
                                                      [False, True, True, False]]
    obs = HeadStatsObserver(G)
    feed(obs, G)
    stats = H.stats_from(obs, "g", H.HeadSpec())
    scas = stats.scas(sink_scales=1)
    assert scas[..., 0].isnan().all() and scas[..., -1].isnan().all()
    want = (stats.mass[0, 2, 2, 1] + stats.mass[0, 2, 3, 1]) / 2
    assert float(scas[0, 2, 1]) == pytest.approx(float(want))
    assert float(scas[1, 0, 2]) == pytest.approx(float(stats.mass[1, 0, 3, 2]))
