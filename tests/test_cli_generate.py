"""`tuner generate` / `tuner bench` end to end through the CLI, and every bad input of the issue."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tuner.cli.app import build_app

runner = CliRunner()


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


def ckpt_args(small_ckpts):
    var_p, vae_p = small_ckpts
    return ["--var-ckpt", var_p, "--vae-ckpt", vae_p]


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_writes_npz_and_pngs(tmp_path, small_ckpts):
    out = tmp_path / "out"
    r = run("generate", *ckpt_args(small_ckpts), "--classes", "1,2,9", "--seed", "0", "--out", out)
    assert r.exit_code == 0, r.output
    data = np.load(out / "samples.npz")
    assert data["images"].dtype == np.float32 and data["images"].shape == (3, 3, 8, 8)
    assert data["labels"].tolist() == [1, 2, 9]
    assert 0 <= data["images"].min() and data["images"].max() <= 1
    assert len(list(out.glob("0*_class*.png"))) == 3
    assert str(out) in r.output


def test_generate_matches_library_call(tmp_path, small_ckpts, small_model):
    from tuner.model.generate import generate

    out = tmp_path / "o"
    r = run("generate", *ckpt_args(small_ckpts), "--classes", "4,5", "--seed", "7", "--cfg", "2",
            "--top-k", "10", "--top-p", "0.9", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    ref = generate(small_model.var, small_model.vae, torch.tensor([4, 5]), seed=7, cfg=2.0, top_k=10,
                   top_p=0.9)
    assert np.allclose(np.load(out / "samples.npz")["images"], ref.images.numpy(), atol=1e-6)


def test_bench_reports_bytes(small_ckpts):
    r = run("bench", *ckpt_args(small_ckpts), "--batch", "2", "--repeats", "1", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.output)
    assert data["kv_bytes_allocated"] == data["kv_bytes_planned"]
    assert len(data["per_scale_ms"]) == 4 and data["images_per_s"] > 0


def test_bench_reports_decode_and_end_to_end_next_to_the_transformer(small_ckpts):
    """The VQ-VAE decode is timed and counted: end to end contains the scale loop, images/s is end to
    end and the transformer-only rate is the separate, larger figure (relations, not time limits)."""
    import json

    r = run("bench", *ckpt_args(small_ckpts), "--batch", "2", "--repeats", "3", "--warmup", "1", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert "total_ms" not in d  # renamed: it was the scale loop alone
    assert d["decode_ms"] > 0 and d["transformer_ms"] > 0
    assert d["end_to_end_ms"] >= d["transformer_ms"]
    assert d["end_to_end_ms"] >= d["decode_ms"]
    assert d["images_per_s"] == pytest.approx(2 / (d["end_to_end_ms"] / 1e3), rel=1e-3)
    assert d["transformer_images_per_s"] == pytest.approx(2 / (d["transformer_ms"] / 1e3), rel=1e-3)
    assert d["transformer_images_per_s"] >= d["images_per_s"]
    table = run("bench", *ckpt_args(small_ckpts), "--batch", "2", "--repeats", "1", "--warmup", "0",
                "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "| scale | latency (ms) |" in table.output
    assert "transformer (scale loop)" in table.output and "VQ-VAE decode" in table.output
    assert "images/s end to end (transformer only:" in table.output


def test_generate_times_the_decode_after_the_scale_loop(small_model):
    from tuner.model.generate import generate

    res = generate(small_model.var, small_model.vae, torch.tensor([1, 2]), seed=0)
    assert len(res.scale_seconds) == 4 and res.decode_seconds > 0


def test_bench_threads_sets_this_process(small_ckpts):
    import json

    before = torch.get_num_threads()
    try:
        r = run("bench", *ckpt_args(small_ckpts), "--batch", "1", "--repeats", "1", "--warmup", "0", "--json",
                "--device", "cpu", "--threads", "1")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["machine"].split("; ")[0].endswith(", 1 threads")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [
    ["generate", "--threads", "0"],
    ["bench", "--threads", "0"],
    ["calibrate", "--threads", "0"],
    ["presets", "--out", "p", "--threads", "0"],
    ["evaluate", "--policy", "ams", "--threads", "0"],
])
def test_threads_must_be_at_least_one(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*argv)
    assert_user_error(r, "--threads 0 must be at least 1")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_missing_checkpoint(tmp_path, small_ckpts):
    r = run("generate", "--var-ckpt", tmp_path / "nope.pth", "--vae-ckpt", small_ckpts[1], "--out", tmp_path)
    assert_user_error(r, "not found", "--var-ckpt")


def test_truncated_checkpoint(tmp_path, small_ckpts):
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(small_ckpts[0].read_bytes()[:1000])
    r = run("generate", "--var-ckpt", bad, "--vae-ckpt", small_ckpts[1], "--out", tmp_path / "o")
    assert_user_error(r, "not a readable PyTorch checkpoint")


def test_non_checkpoint_file(tmp_path, small_ckpts):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    r = run("generate", "--var-ckpt", bad, "--vae-ckpt", small_ckpts[1], "--out", tmp_path / "o")
    assert_user_error(r, "not a readable PyTorch checkpoint", "not a zip-format torch checkpoint")
    assert "Weights only load failed" not in r.output  # torch's page of advice is not the user's problem


class Payload:
    """Stands in for anything pickled into a checkpoint besides tensors."""


def test_checkpoint_with_pickled_objects_is_refused_by_name(tmp_path, small_ckpts):
    bad = tmp_path / "objects.pth"
    torch.save({"head.weight": Payload()}, bad)
    r = run("generate", "--var-ckpt", bad, "--vae-ckpt", small_ckpts[1], "--out", tmp_path / "o")
    assert_user_error(r, "not a readable PyTorch checkpoint", "Payload", "never unpickled")


def test_vae_passed_as_var(tmp_path, small_ckpts):
    r = run("generate", "--var-ckpt", small_ckpts[1], "--vae-ckpt", small_ckpts[1], "--out", tmp_path / "o")
    assert_user_error(r, "VQ-VAE state dict", "swap")


@pytest.mark.parametrize("edit,fragment", [
    (lambda sd: sd.pop("head.bias"), "missing keys head.bias"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys extra.weight"),
    (lambda sd: sd.__setitem__("blocks.0.ffn.fc1.bias", torch.zeros(3)), "mis-shaped blocks.0.ffn.fc1.bias"),
])
def test_bad_state_dict(tmp_path, small_ckpts, edit, fragment):
    sd = torch.load(small_ckpts[0], weights_only=True)
    edit(sd)
    p = tmp_path / "edited.pth"
    torch.save(sd, p)
    r = run("generate", "--var-ckpt", p, "--vae-ckpt", small_ckpts[1], "--out", tmp_path / "o")
    assert_user_error(r, fragment)


@pytest.mark.parametrize("flags,fragment", [
    (["--classes", "10"], "outside [0, 10)"),
    (["--classes", ""], "--classes is empty"),
    (["--classes", ","], "--classes is empty"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "-0.1"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--cfg", "-2"], "--cfg"),
    (["--dtype", "fp8"], "--dtype"),
    (["--attention-backend", "cuda"], "--attention-backend"),
])
def test_bad_flags(tmp_path, small_ckpts, flags, fragment):
    r = run("generate", *ckpt_args(small_ckpts), "--out", tmp_path / "o", *flags)
    assert_user_error(r, fragment)


def test_unknown_model(tmp_path):
    r = run("generate", "--model", "d99", "--out", tmp_path)
    assert_user_error(r, "unknown model", "d16")


def test_named_model_without_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNER_WEIGHTS_DIR", raising=False)
    r = run("generate", "--model", "d16", "--out", tmp_path)
    assert_user_error(r, "--weights-dir")


def test_weights_dir_missing_file(tmp_path):
    r = run("generate", "--model", "d16", "--weights-dir", tmp_path, "--out", tmp_path / "o")
    assert_user_error(r, "var_d16.pth not found")


def test_unwritable_output_dir(tmp_path, small_ckpts):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a path below a regular file can never be created, even as root
    r = run("generate", *ckpt_args(small_ckpts), "--out", blocker / "sub")
    assert_user_error(r, "not writable", "--out")
