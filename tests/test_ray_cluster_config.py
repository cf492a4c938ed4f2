"""ray_cluster.yaml: accepted by the installed Ray's cluster launcher, one Ray worker per GPU, installs
this package and mounts the weights; README's scale-out commands match it and the CLI.

Nothing here contacts a cloud or starts Ray: the config goes through the steps `ray up` runs before it
talks to AWS (fill in defaults, merge setup commands, validate against ray-schema.json), and the search's
actor requests are read from :class:`tuner.search.ray_pool.RayPool` driven by a stand-in ``ray`` module.
"""
from __future__ import annotations

import copy
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_cluster.yaml"
README = ROOT / "README.md"
REPO_MOUNT = "/home/ubuntu/varkv-tuner"
WEIGHTS_MOUNT = "/home/ubuntu/var-weights"

# (GPUs, vCPUs) of the EC2 GPU instance types a worker type may use (AWS instance-type specifications).
EC2_GPU_INSTANCES = {
    "g4dn.xlarge": (1, 4), "g4dn.2xlarge": (1, 8), "g4dn.12xlarge": (4, 48),
    "g5.xlarge": (1, 4), "g5.2xlarge": (1, 8), "g5.4xlarge": (1, 16), "g5.8xlarge": (1, 32),
    "g5.12xlarge": (4, 48), "g5.48xlarge": (8, 192),
    "g6.xlarge": (1, 4), "g6.2xlarge": (1, 8), "g6.12xlarge": (4, 48),
    "g6e.xlarge": (1, 4), "g6e.2xlarge": (1, 8), "g6e.12xlarge": (4, 48),
    "p3.2xlarge": (1, 8), "p3.8xlarge": (4, 32),
    "p4d.24xlarge": (8, 96), "p5.48xlarge": (8, 192),
}


def _raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before contacting the cloud: defaults, merged commands, schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict:
    return _ray_up_checks(_raw())


def _worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_valid_for_installed_ray_cluster_launcher(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"].get("region")
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0
    assert "GPU" not in head["resources"], "the head runs the driver; GPUs belong to the worker types"
    assert _worker_types(prepared), "no worker node type"


def test_gpu_worker_types_give_one_ray_worker_per_gpu(prepared):
    for name, node_type in _worker_types(prepared).items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in EC2_GPU_INSTANCES, f"{name}: {instance} is not a known GPU instance type"
        gpus, vcpus = EC2_GPU_INSTANCES[instance]
        assert node_type["resources"].get("GPU") == gpus, (
            f"{name}: resources GPU must equal the {gpus} GPU(s) of {instance}")
        assert 0 < node_type["resources"].get("CPU", vcpus) <= vcpus
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= prepared["max_workers"], name
        assert node_type["max_workers"] > 0, f"{name}: no node of this type can ever start"


class _FakeActorClass:
    def __init__(self, created: list):
        self.created = created

    def options(self, **options):
        created = self.created

        class _Bound:
            @staticmethod
            def remote(*args):
                created.append((options, args))
                pid = len(created)
                return types.SimpleNamespace(ready=types.SimpleNamespace(
                    remote=lambda: {"pid": pid, "model_hash": "h"}))

        return _Bound()


def _fake_ray(resources: dict, created: list) -> types.ModuleType:
    """Just enough of ``ray`` for RayPool.start/close on an already connected cluster."""
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    fake.cluster_resources = lambda: dict(resources)
    fake.remote = lambda cls: _FakeActorClass(created)
    fake.get = lambda refs, timeout=None: list(refs)
    fake.kill = lambda actor, no_restart=True: None
    return fake


def test_search_starts_one_actor_per_gpu_of_the_cluster(prepared, monkeypatch):
    from tuner.search.ray_pool import RayPool

    workers = _worker_types(prepared)
    gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in workers.values())
    cpus = sum(t["max_workers"] * t["resources"]["CPU"] for t in workers.values()) + 8
    created: list = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray({"CPU": float(cpus), "GPU": float(gpus)}, created))

    pool = RayPool("tests.nothing:factory", {"model": "d30"}, workers=None, address="auto",
                   trial_timeout_s=60)
    pool.start()
    pool.close()

    assert len(created) == gpus, "one actor per GPU of the fully scaled cluster"
    for options, (_factory, kwargs, _threads) in created:
        assert options.get("num_gpus") == 1
        assert kwargs["device"] == "cuda"
    # Each node fits as many actors as it has GPUs: CPUs never limit it below one actor per GPU.
    num_cpus = created[0][0].get("num_cpus", 1)
    for name, t in workers.items():
        assert num_cpus * t["resources"]["GPU"] <= t["resources"]["CPU"], name


def test_setup_installs_this_package_and_mounts_repo_and_weights(prepared):
    import ray

    mounts = prepared["file_mounts"]
    assert REPO_MOUNT in mounts and (ROOT / Path(mounts[REPO_MOUNT]).expanduser()).resolve() == ROOT, (
        "the repository root must be mounted (ray up runs from it)")
    assert WEIGHTS_MOUNT in mounts, "model weights must be mounted on every node"
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in by prepare_config
        commands = prepared[key]
        assert any(re.search(rf"pip install .*-e {re.escape(REPO_MOUNT)}\b", c) for c in commands), key
        pins = [m.group(1) for c in commands for m in re.finditer(r"ray\[default\]==([\w.]+)", c)]
        assert pins == [ray.__version__], f"{key}: pin ray[default]=={ray.__version__}, the Ray `ray up` runs"
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in prepared["worker_start_ray_commands"])


def _scale_out_section() -> str:
    text = README.read_text()
    assert "\n## Scale out\n" in text, "README has no '## Scale out' section"
    section = text.split("\n## Scale out\n", 1)[1]
    return section.split("\n## ", 1)[0]


def test_readme_scale_out_commands_match_config_and_cli(prepared):
    import typer

    from tuner.cli.app import build_app

    section = _scale_out_section()
    for command in ("ray up ray_cluster.yaml", "ray attach ray_cluster.yaml", "ray down ray_cluster.yaml"):
        assert command in section
    search_lines = [line.strip() for line in section.splitlines() if line.strip().startswith("tuner search")]
    assert search_lines, "no `tuner search` command in the section"
    search = typer.main.get_command(build_app()).commands["search"]
    known = {opt for p in search.params for opt in [*p.opts, *p.secondary_opts]}
    for line in search_lines:
        args = shlex.split(line.split("#", 1)[0])
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        assert set(flags) <= known, f"unknown flags {set(flags) - known} in: {line}"
        assert args[args.index("--ray-address") + 1] == "auto"
        if "--weights-dir" in args:
            assert args[args.index("--weights-dir") + 1] in prepared["file_mounts"]


def _drop_worker_node_config(c):
    del next(iter(_worker_types(c).values()))["node_config"]


def _unknown_top_level_key(c):
    c["gpu_workers_per_node"] = 1


def _fractional_gpu_resource(c):
    next(iter(_worker_types(c).values()))["resources"]["GPU"] = 0.5


def _head_type_not_defined(c):
    c["head_node_type"] = "no_such_type"


@pytest.mark.parametrize("corrupt, message", [
    (_drop_worker_node_config, "'node_config' is a required property"),
    (_unknown_top_level_key, "'gpu_workers_per_node' was unexpected"),
    (_fractional_gpu_resource, "0.5 is not of type 'integer'"),
    (_head_type_not_defined, "`head_node_type` must be one of"),
])
def test_corrupted_config_is_rejected(corrupt, message):
    import jsonschema

    config = _raw()
    _ray_up_checks(copy.deepcopy(config))  # the intact file passes the same checks
    corrupt(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        _ray_up_checks(config)


def test_gpus_flag_asks_the_autoscaler_and_waits_for_the_nodes(monkeypatch):
    """`--gpus N` on an autoscaling cluster with no GPU node yet: request N one-GPU bundles, wait until
    they exist, then start one actor per GPU; a cluster that never grows is a one-line UserError."""
    from ray.autoscaler.sdk import request_resources  # noqa: F401 - the real API exists in the pinned Ray

    from tuner.errors import UserError
    from tuner.search import ray_pool
    from tuner.search.ray_pool import RayPool

    resources = {"CPU": 8.0}
    requested: list = []

    def fake_request(bundles):
        requested.append(bundles)

    def grow_after_two_polls(_seconds):  # the autoscaler brings the nodes up while we wait
        grow_after_two_polls.calls += 1
        if grow_after_two_polls.calls == 2:
            resources["GPU"] = 3.0
    grow_after_two_polls.calls = 0

    created: list = []
    fake = _fake_ray(resources, created)
    sdk = types.ModuleType("ray.autoscaler.sdk")
    sdk.request_resources = fake_request
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.autoscaler", types.ModuleType("ray.autoscaler"))
    monkeypatch.setitem(sys.modules, "ray.autoscaler.sdk", sdk)
    monkeypatch.setattr("time.sleep", grow_after_two_polls)

    pool = RayPool("tests.nothing:factory", {"model": "d30"}, workers=None, address="auto",
                   trial_timeout_s=60, gpus=2)
    pool.start()
    pool.close()
    assert requested == [[{"GPU": 1}, {"GPU": 1}]]
    assert len(created) == 2 and all(opts.get("num_gpus") == 1 for opts, _ in created)

    resources.pop("GPU")
    with pytest.raises(UserError, match="--gpus 4: the cluster has 0 GPU"):
        ray_pool.wait_for_gpus(4, timeout_s=0.0)


def test_gpus_flag_needs_a_cluster_address():
    from tuner.errors import UserError
    from tuner.search.config import resolve_config

    with pytest.raises(UserError, match="--ray-address"):
        resolve_config(mem_target="15%", gpus=2)
    assert resolve_config(mem_target="15%", gpus=2, ray_address="auto").gpus == 2
