"""The README's "Use a policy in your code" section runs as written: the API example, the official-VAR
drop-in (on the tiny weights in the official structure) and the pasted `tuner plan` output."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from typer.testing import CliRunner

import tuner
from tests.api.official_modules import official_var
from tuner.cli.app import build_app

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Use a policy in your code"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    assert HEADING in text
    return text.split(HEADING, 1)[1].split("\n## ", 1)[0]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(), re.S)


def test_the_api_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example names the policy file relative to the repository
    torch.set_num_threads(1)
    (example,) = blocks("python")[:1]
    assert example.startswith("import tuner\n") and len(example.strip().splitlines()) == 3
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    images = scope["images"]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    model = tuner.load_model("tiny")
    ref = tuner.generate(model, [0, 1, 2, 3], policy=ROOT / "policies" / "tiny-15pct.json")
    assert torch.equal(images, ref)


def test_the_drop_in_example_runs_on_the_official_structure(monkeypatch):
    """The example's ``with`` statement, on tiny's weights in the official module structure (the
    official code cannot ship here). Tiny's vocabulary has 512 codes, and the official sampler needs
    ``top_k`` below it, so 900 becomes 100; everything else is the README's text."""
    monkeypatch.chdir(ROOT)
    example = blocks("python")[1]
    compile(example, "README.md", "exec")
    lines = example.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("with tuner.apply_policy(var, policy):"))
    statement = "\n".join(lines[start:]).replace("top_k=900", "top_k=100")
    assert "var.autoregressive_infer_cfg(" in statement
    model = tuner.load_model("tiny")
    var = official_var(model.config, model.vae, model.var.state_dict())
    labels = torch.tensor([0, 3, 5, 9])
    policy = tuner.load_policy("policies/tiny-15pct.json")
    scope = {"tuner": tuner, "torch": torch, "var": var, "policy": policy, "labels": labels}
    exec(compile(statement, "README.md", "exec"), scope)
    ref = tuner.generate(model, labels, policy=policy, seed=0, cfg=1.5, top_k=100, top_p=0.96)
    assert torch.equal(scope["images"], ref)
    assert "forward" not in var.blocks[0].attn.__dict__


def test_the_pasted_plan_output_is_what_tuner_plan_prints(monkeypatch):
    monkeypatch.chdir(ROOT)
    command = blocks("bash")[0].strip()
    assert command.startswith("tuner plan ")
    res = CliRunner().invoke(build_app(), command.split()[1:])
    assert res.exit_code == 0, res.output
    pasted = re.search(re.escape(command) + r"\n```\n\n```\n(.*?)```", section(), re.S).group(1)
    assert res.output.strip() == pasted.strip()
    d30 = blocks("bash")[1].strip()
    res = CliRunner().invoke(build_app(), d30.split()[1:])
    shown = re.search(re.escape(d30) + r"\n```\n\n```\n(.*?)```", section(), re.S).group(1)
    for line in shown.strip().splitlines():
        assert line == "…" or line in res.output.splitlines(), line
    full = CliRunner().invoke(build_app(), "plan --model d30 --family full --gpu-mem 80GiB".split())
    assert "max batch 192 on 80.0 GiB" in full.output and "the full cache allows 192 images" in section()
