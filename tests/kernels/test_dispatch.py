"""Backend resolution, argument checks, and the lazy triton import of the public ops."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import varkv_kernels.dispatch
from varkv_kernels.dispatch import kv_attention, resolve_backend, token_scores
from varkv_kernels.reference import kv_attention_reference

REPO = Path(__file__).resolve().parents[2]


def test_package_is_ours_and_leaves_the_name_kernels_free():
    """Our kernels import as varkv_kernels; ``import kernels`` from the checkout's root (where
    ``python -m pytest`` puts it first on sys.path) never finds our folder as a package of its own,
    so transformers gets Hugging Face's kernels package (or, without it, an empty namespace it skips)."""
    assert Path(varkv_kernels.dispatch.__file__).resolve().parent == REPO / "kernels"
    assert not (REPO / "kernels" / "__init__.py").exists()
    probe = ("import kernels, os; f = getattr(kernels, '__file__', None); "
             "print(os.path.realpath(f) if f else 'namespace')")
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == "namespace" or not Path(found).is_relative_to(REPO / "kernels"), found


def test_auto_and_torch_resolution():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown attention backend 'cuda'; use one of auto, torch, triton"):
        resolve_backend("cuda", "cpu")
    q = torch.zeros(1, 1, 2, 16)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton'"):
        kv_attention(q, q, q, torch.zeros(1, 1, dtype=torch.int32), q, q, 1.0, backend="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only enabled without a GPU")
def test_triton_on_cpu_under_the_interpreter():
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert resolve_backend("triton", "cpu") == "triton"


_CHILD = """
import os, sys, torch
from varkv_kernels.dispatch import kv_attention, resolve_backend, token_scores
q = torch.randn(1, 2, 3, 16)
kv_attention(q, q, q, torch.zeros(1, 2, dtype=torch.int32), q, q, 1.0)
token_scores(q, q, torch.full((1, 2), 3, dtype=torch.int32), 1.0, pool_kernel=3)
print("triton imported:", "triton" in sys.modules)
for step in ("unset", "late"):
    try:
        resolve_backend("triton", "cpu")
    except ValueError as exc:
        print(step + ":", exc)
    os.environ["TRITON_INTERPRET"] = "1"
"""


def test_triton_without_interpreter_or_gpu_is_refused_in_a_fresh_process():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "triton imported: False"  # the torch backend never imports triton
    assert lines[1] == ("unset: the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before start "
                        "for the CPU interpreter; use --attention-backend torch (or auto) otherwise")
    assert lines[2].startswith("late: the triton backend needs a CUDA GPU")
    assert lines[2].endswith("(TRITON_INTERPRET=1 was set after the kernels were imported)")


def test_default_backend_on_cpu_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, kn, vn = (torch.randn(2, 2, n, 16, generator=gen) for n in (3, 5, 5, 3, 3))
    lens = torch.tensor([[5, 2], [0, 4]], dtype=torch.int32)
    assert torch.equal(kv_attention(q, kc, vc, lens, kn, vn, 0.5),
                       kv_attention_reference(q, kc, vc, lens, kn, vn, 0.5))


@pytest.mark.parametrize("bad,match", [
    (dict(k_new=torch.zeros(1, 2, 4, 16)), r"k_new must have q's shape \(1, 2, 3, 16\)"),
    (dict(k_cache=torch.zeros(1, 2, 5, 32)), r"k_cache must be \[1, 2, C, 16\]"),
    (dict(v_cache=torch.zeros(1, 2, 6, 16)), "v_cache shape"),
    (dict(cache_lens=torch.zeros(1, 2)), "cache_lens must be int32"),
    (dict(v_new=torch.zeros(1, 2, 3, 16, dtype=torch.float16)), "v_new dtype"),
])
def test_attention_argument_errors(bad, match):
    args = dict(q=torch.zeros(1, 2, 3, 16), k_cache=torch.zeros(1, 2, 5, 16),
                v_cache=torch.zeros(1, 2, 5, 16), cache_lens=torch.zeros(1, 2, dtype=torch.int32),
                k_new=torch.zeros(1, 2, 3, 16), v_new=torch.zeros(1, 2, 3, 16))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kv_attention(softmax_scale=1.0, backend="torch", **args)


def test_scoring_argument_errors():
    q, keys = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 9, 16)
    lens = torch.full((1, 2), 9, dtype=torch.int32)
    with pytest.raises(ValueError, match="pool_kernel must be 0, 1 or an odd width, got 4"):
        token_scores(q, keys, lens, 1.0, pool_kernel=4, backend="torch")
    with pytest.raises(ValueError, match="disagree"):
        token_scores(q, keys[:, :1], lens, 1.0, backend="torch")
    with pytest.raises(ValueError, match="key_lens must be int32"):
        token_scores(q, keys, lens.float(), 1.0, backend="torch")
