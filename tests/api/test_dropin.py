"""``tuner.apply_policy`` on the official VAR structure (tests/api/official_modules.py): equal to our
engine bit for bit, exact planned bytes, everything restored afterwards, other models refused."""
from __future__ import annotations

import pytest
import torch

import tuner
from tests.api.conftest import POLICIES
from tests.api.official_modules import official_var
from tests.conftest import small_config
from tests.model.official_reading import official_infer
from tuner.errors import UserError

LABELS = [3, 7, 0]
SAMPLING = dict(cfg=1.5, top_k=50, top_p=0.96)  # the FID protocol's filtering, scaled to 64 codes


def functional_reading(model):
    """tests/model/official_reading.py's images for ``LABELS``, seed 11."""
    return official_infer(dict(model.var.state_dict()), model.vae, (1, 2, 3, 4), torch.tensor(LABELS), 11,
                          **SAMPLING)


def official_images(var, labels=LABELS, seed=11, **sampling):
    sampling = sampling or SAMPLING
    return var.autoregressive_infer_cfg(B=len(labels), label_B=torch.tensor(labels), g_seed=seed, **sampling)


def attn_state(var) -> list[dict]:
    """Every attention module's instance attributes (the objects themselves, compared with ``is``)."""
    return [dict(block.attn.__dict__) for block in var.blocks]


def assert_same_state(before: list[dict], var) -> None:
    after = attn_state(var)
    for i, (b, a) in enumerate(zip(before, after)):
        assert a.keys() == b.keys(), (i, a.keys() ^ b.keys())
        changed = [k for k in b if a[k] is not b[k]]
        assert changed == [], (i, changed)
        assert type(var.blocks[i].attn).forward is var.blocks[i].attn.forward.__func__


def test_official_reading_without_policy_equals_the_functional_reading(api_model, official):
    """(a) the module reading and tests/model/official_reading agree: two readings of one code."""
    ours = official_images(official)
    ref = functional_reading(api_model)
    assert ours.shape == ref.shape == (3, 3, 8, 8)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", list(POLICIES))
def test_drop_in_equals_the_engine_bit_for_bit(name, api_model, policy_files, official):
    """(b) images under apply_policy == tuner.generate with the file == the engine's bytes, exactly."""
    from tuner.memory import memory_report

    policy = tuner.load_policy(policy_files[name])
    with tuner.apply_policy(official, policy) as hooks:
        ours = official_images(official)
    engine = tuner.generate(api_model, LABELS, policy=policy_files[name], seed=11, **SAMPLING)
    assert torch.equal(ours, engine), (ours - engine).abs().max()
    planned = memory_report(hooks.plan, api_model.config, dtype="fp32", batch=len(LABELS))
    assert hooks.runs == 1
    assert hooks.kv_bytes_allocated == planned.kv_bytes_total > 0
    assert hooks.plan == policy.plan


def test_full_policy_under_hooks_matches_the_unhooked_official_code(policy_files, official):
    plain = official_images(official)
    with tuner.apply_policy(official, policy_files["full"]):
        hooked = official_images(official)
    assert (plain - hooked).abs().max().item() < 1e-5


def test_each_run_gets_a_fresh_cache_and_the_same_images(policy_files, official):
    with tuner.apply_policy(official, policy_files["scalekv"]) as hooks:
        a, b = official_images(official), official_images(official)
    assert hooks.runs == 2 and torch.equal(a, b)


def test_hooks_are_gone_after_a_normal_exit(policy_files, official):
    """(c) every patched instance attribute is the object it was before (or absent, as before)."""
    official_images(official)  # the official code has run once: caching False, caches None
    official.blocks[0].attn.cached_k = marker = torch.zeros(1)  # an instance attribute with a value
    before = attn_state(official)
    assert "forward" not in before[0]
    with tuner.apply_policy(official, policy_files["ams"]):
        assert "forward" in official.blocks[0].attn.__dict__
        official_images(official)
    assert_same_state(before, official)
    assert official.blocks[0].attn.cached_k is marker


def test_hooks_are_gone_after_an_exception_inside_the_with(api_model, policy_files, official):
    """(c) an error mid-run (scale 2, cache allocated, caching on) still restores everything."""
    before = attn_state(official)
    calls = []

    def fail_at_scale_2(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = official.head.register_forward_hook(fail_at_scale_2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with tuner.apply_policy(official, policy_files["window"]):
                official_images(official)
    finally:
        handle.remove()
    assert all(block.attn.caching is False for block in official.blocks)
    assert_same_state(before, official)
    ref = functional_reading(api_model)
    assert (official_images(official) - ref).abs().max().item() < 1e-5  # the model works as before


@pytest.mark.parametrize("other,fragment", [
    (small_config(depth=3), "depth 3, width 192 (3 heads of 64)"),
    (small_config(depth=2, patch_nums=(1, 2, 4)), "patch_nums [1, 2, 4]"),
])
def test_a_policy_for_another_model_is_refused(other, fragment, tmp_path, official):
    """(d) refused before anything is patched, with both models named."""
    from tuner.policies.window import WindowPolicy
    from tuner.policy_file import write_policy_file

    path = write_policy_file(tmp_path / "other.json", WindowPolicy(window=1), other)
    before = attn_state(official)
    with pytest.raises(UserError) as err:
        with tuner.apply_policy(official, path):
            pytest.fail("entered the with block")
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg
    assert "this VAR has depth 2, width 128 (2 heads of 64), patch_nums [1, 2, 3, 4]" in msg
    assert "use a policy tuned for this model" in msg
    assert_same_state(before, official)


def test_apply_policy_twice_is_refused_and_leaves_the_outer_hooks(policy_files, official):
    with tuner.apply_policy(official, policy_files["ams"]):
        hooked = official.blocks[0].attn.__dict__["forward"]
        with pytest.raises(UserError, match="already under tuner.apply_policy"):
            with tuner.apply_policy(official, policy_files["window"]):
                pass
        assert official.blocks[0].attn.__dict__["forward"] is hooked


def test_not_an_official_var_is_refused(policy_files, api_model):
    with pytest.raises(UserError, match="is not an official VAR model"):
        tuner.apply_policy(torch.nn.Linear(2, 2), policy_files["full"])
    with pytest.raises(UserError, match="VARTransformer is not an official VAR model"):
        tuner.apply_policy(api_model.var, policy_files["full"])  # our engine's module is not the official one

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(2, 2)

    class NotVAR(torch.nn.Module):
        patch_nums = (1, 2, 3, 4)

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

    with pytest.raises(UserError, match=r"NotVAR.blocks\[0\].attn lacks kv_caching, num_heads"):
        tuner.apply_policy(NotVAR(), policy_files["full"])


def test_a_bare_policy_object_plans_against_the_var(official, api_model):
    from tuner.policies.window import WindowPolicy

    policy = WindowPolicy(window=1)
    with tuner.apply_policy(official, policy):
        ours = official_images(official)
    from tuner.model.generate import generate

    ref = generate(api_model.var, api_model.vae, torch.tensor(LABELS), seed=11, policy=policy, **SAMPLING)
    assert torch.equal(ours, ref.images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_drop_in_under_fp16_autocast_on_cuda_equals_the_engine(small_ckpts, policy_files):
    """The official demo's setting: fp16 autocast over fp32 weights, Triton attention; the cache is fp16
    (the autocast dtype) and holds exactly the planner's bytes."""
    from tuner.memory import memory_report

    model = tuner.load_model(small_ckpts, device="cuda", dtype="fp16")
    var = official_var(model.config, model.vae, model.var.state_dict(), device="cuda")
    labels = torch.tensor(LABELS, device="cuda")
    for name in ("ams", "sink_window_int8"):
        fp16 = torch.autocast("cuda", dtype=torch.float16)
        with tuner.apply_policy(var, policy_files[name]) as hooks, fp16:
            ours = var.autoregressive_infer_cfg(B=len(LABELS), label_B=labels, g_seed=11, **SAMPLING)
        engine = tuner.generate(model, LABELS, policy=policy_files[name], seed=11, **SAMPLING)
        assert (ours.float().cpu() - engine).abs().max().item() < 1e-3, name  # other tokens: far larger
        planned = memory_report(hooks.plan, model.config, dtype="fp16", batch=len(LABELS))
        assert hooks.kv_bytes_allocated == planned.kv_bytes_total, name
