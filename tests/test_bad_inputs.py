"""Every ``tuner`` subcommand refuses bad input the one way the project allows.

One table, :data:`ROWS`: a command line, the exit status (2) and a fragment of the message. For each
row the test asserts

- exit status 2;
- stderr is exactly one line, it starts with ``error: `` and contains the fragment (and not the
  row's ``absent`` text, e.g. a flag the command does not have);
- no ``Traceback`` in stdout or stderr;
- nothing is left behind: the row runs with its working directory a fresh, empty temporary directory
  holding only the row's fixture files, every output/storage path points inside it, and afterwards
  the directory holds exactly those files, byte for byte (no output directory, database, journal or
  heatmap was created, no fixture was modified);
- (rows run in this process) nothing expensive started: starting Ray or an in-process evaluator,
  generating, calibrating, evaluating or benchmarking raises :class:`ExpensiveWork` instead.

Most rows run in this process through :func:`tuner.cli.main` (the ``tuner`` entry point, stdout and
stderr captured); rows marked ``sub`` (inputs built to exhaust memory or CPU) run as
``python -m tuner`` subprocesses, two at a time in the background, under a time and memory limit.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNSET = ("TUNER_WEIGHTS_DIR", "TUNER_INCEPTION_WEIGHTS", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "MPLBACKEND": "Agg",
       "DO_NOT_TRACK": "true"}
SUB_TIMEOUT_S = 90
SUB_MEMORY_BYTES = 6 << 30


class Row(NamedTuple):
    id: str
    argv: list
    fragment: str
    files: tuple = ()  # fixture names (see FIXTURES) put into the row's directory first
    code: int = 2
    absent: str | None = None  # text the error line must not contain
    sub: bool = False  # run as a subprocess (under a time and memory limit)
    env: dict | None = None  # extra environment


S = ["search", "--mem-target", "15%"]  # a search with a target: only the flag under test is bad
CK = ("var.pth", "vae.pth")
TINY_POL = "policy.json"

ROWS = [
    # --- top level and usage errors (typer/click), one line too ---------------------------------------------
    Row("tuner-unknown-command", ["nocmd"], "No such command 'nocmd'"),
    Row("policy-unknown-subcommand", ["policy", "nosub"], "No such command 'nosub'"),
    Row("search-unknown-option", ["search", "--bogus"], "No such option: --bogus"),
    Row("search-trials-not-int", ["search", "--trials", "abc"], "'--trials'"),
    Row("generate-cfg-not-number", ["generate", "--cfg", "abc"], "'--cfg'"),
    Row("studies-missing-storage", ["studies"], "Missing option '--storage'"),
    Row("show-missing-study", ["show", "--storage", "sqlite:///study.db"], "Missing argument"),
    Row("policy-show-missing-path", ["policy", "show"], "Missing argument"),
    Row("presets-missing-out", ["presets"], "Missing option '--out'"),
    Row("evaluate-missing-policy", ["evaluate"], "Missing option '--policy'"),

    # --- search: targets and limits ----------------------------------------------------------------------
    Row("search-no-target", ["search"], "--mem-target"),
    Row("search-mem-0", ["search", "--mem-target", "0"], "--mem-target '0'"),
    Row("search-mem-150pct", ["search", "--mem-target", "150%"], "--mem-target '150%'"),
    Row("search-mem-abc", ["search", "--mem-target", "abc"], "--mem-target 'abc'"),
    Row("search-mem-neg5pct", ["search", "--mem-target", "-5%"], "--mem-target '-5%'"),
    Row("search-mem-empty", ["search", "--mem-target", ""], "--mem-target is empty"),
    Row("search-mem-10XB", ["search", "--mem-target", "10XB"], "--mem-target '10XB'"),
    Row("search-mem-nanpct", ["search", "--mem-target", "nan%"], "--mem-target 'nan%'"),
    Row("search-mem-2", ["search", "--mem-target", "2"], "more than the full cache"),
    Row("search-fid-limit-neg", ["search", "--fid-limit", "-1"], "--fid-limit -1"),
    Row("search-fid-limit-nan", [*S, "--fid-limit", "nan"], "--fid-limit nan"),
    Row("search-fid-limit-inf", ["search", "--fid-limit", "inf"], "--fid-limit inf"),
    Row("search-fid-metric-fid-neg", ["search", "--metric", "fid", "--fid-limit", "-0.5"],
        "--fid-limit -0.5"),
    Row("search-ssim-limit-1.5", ["search", "--metric", "ssim", "--fid-limit", "1.5"], "SSIM"),
    Row("search-ssim-limit-0", ["search", "--metric", "ssim", "--fid-limit", "0"], "SSIM"),
    Row("search-psnr-limit-neg", ["search", "--metric", "psnr", "--fid-limit", "-3"], "PSNR"),
    Row("search-metric-unknown", [*S, "--metric", "lpips"], "--metric 'lpips'"),
    Row("search-sampler-unknown", [*S, "--sampler", "cmaes"], "--sampler 'cmaes'"),
    Row("search-family-unknown", [*S, "--family", "nope"], "--family 'nope'"),
    # --- search: model and weights (checked before Ray starts) ------------------------------------------
    Row("search-model-unknown", [*S, "--model", "d99"], "--model 'd99' is unknown"),
    Row("search-d16-no-weights", [*S, "--model", "d16"], "--weights-dir"),
    Row("search-d16-no-weights-names-ckpt", [*S, "--model", "d16"], "--var-ckpt"),
    Row("search-d16-no-weights-names-random", [*S, "--model", "d16"], "or use --random-weights"),
    Row("search-d16-empty-weights-dir", [*S, "--model", "d16", "--weights-dir", "weights"],
        "var_d16.pth not found", ("weights",)),
    Row("search-d16-weights-dir-missing", [*S, "--model", "d16", "--weights-dir", "nodir"],
        "--weights-dir nodir"),
    Row("search-d16-weights-dir-garbage", [*S, "--model", "d16", "--weights-dir", "wbad"],
        "not a readable PyTorch checkpoint", ("wbad",)),
    Row("search-d16-env-weights-dir-empty", [*S, "--model", "d16"], "var_d16.pth not found", ("weights",),
        env={"TUNER_WEIGHTS_DIR": "weights"}),
    Row("search-ckpt-garbage", [*S, "--var-ckpt", "garbage.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("garbage.pth", "vae.pth")),
    Row("search-ckpt-truncated", [*S, "--var-ckpt", "trunc.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("trunc.pth", "vae.pth")),
    Row("search-ckpt-empty", [*S, "--var-ckpt", "var.pth", "--vae-ckpt", "empty.pth"],
        "not a readable PyTorch checkpoint", ("var.pth", "empty.pth")),
    Row("search-ckpt-missing", [*S, "--var-ckpt", "missing.pth", "--vae-ckpt", "vae.pth"], "not found",
        ("vae.pth",)),
    Row("search-ckpt-directory", [*S, "--var-ckpt", "adir", "--vae-ckpt", "vae.pth"], "is a directory",
        ("adir", "vae.pth")),
    Row("search-ckpt-only-var", [*S, "--var-ckpt", "var.pth"], "pass both --var-ckpt and --vae-ckpt",
        ("var.pth",)),
    # --- search: space files ------------------------------------------------------------------------------
    Row("search-space-missing", [*S, "--space", "missing.yaml"], "--space"),
    Row("search-space-directory", [*S, "--space", "adir"], "--space", ("adir",)),
    Row("search-space-yaml-syntax", [*S, "--space", "space_syntax.yaml"], "space_syntax.yaml",
        ("space_syntax.yaml",)),
    Row("search-space-not-mapping", [*S, "--space", "space_list.yaml"], "space_list.yaml",
        ("space_list.yaml",)),
    Row("search-space-empty", [*S, "--space", "space_empty.yaml"], "space_empty.yaml", ("space_empty.yaml",)),
    Row("search-space-unknown-family", [*S, "--space", "space_family.yaml"], "space_family.yaml",
        ("space_family.yaml",)),
    Row("search-space-huge-string", [*S, "--space", "space_len.yaml"], "--space", ("space_len.yaml",),
        sub=True),
    Row("search-space-huge-power", [*S, "--space", "space_pow.yaml"], "--space", ("space_pow.yaml",),
        sub=True),
    Row("search-space-huge-repeat", [*S, "--space", "space_repeat.yaml"], "--space", ("space_repeat.yaml",),
        sub=True),
    Row("search-space-alias-bomb", [*S, "--space", "space_bomb.yaml"], "--space", ("space_bomb.yaml",),
        sub=True),
    # --- search: budgets and counts -------------------------------------------------------------------------
    Row("search-trials-0", [*S, "--trials", "0"], "--trials 0"),
    Row("search-samples-1", [*S, "--samples", "1"], "--samples 1"),
    Row("search-final-samples-0", [*S, "--final-samples", "0"], "--final-samples 0"),
    Row("search-final-top-k-0", [*S, "--final-top-k", "0"], "--final-top-k 0"),
    Row("search-eval-batch-0", [*S, "--eval-batch-size", "0"], "--eval-batch-size 0"),
    Row("search-eval-batch-neg", [*S, "--eval-batch-size", "-4"], "--eval-batch-size -4"),
    Row("search-workers-neg", [*S, "--workers", "-1"], "--workers -1"),
    Row("search-timeout-0", [*S, "--timeout", "0"], "--timeout 0"),
    Row("search-timeout-neg", [*S, "--timeout", "-5"], "--timeout -5"),
    Row("search-patience-0", [*S, "--patience", "0"], "--patience 0"),
    Row("search-trial-timeout-0", [*S, "--trial-timeout", "0"], "timeout"),
    Row("search-gpus-without-cluster", [*S, "--gpus", "2"], "--gpus"),
    Row("search-gpus-0", [*S, "--gpus", "0", "--ray-address", "auto"], "--gpus 0"),
    Row("search-seed-neg", [*S, "--seed", "-1"], "--seed -1"),
    Row("search-seed-huge", [*S, "--seed", str(2**40)], f"--seed {2**40}"),
    # --- search: sampling and evaluation settings -------------------------------------------------------
    Row("search-cfg-nan", [*S, "--cfg", "nan"], "--cfg nan"),
    Row("search-cfg-neg", [*S, "--cfg", "-1"], "--cfg -1"),
    Row("search-top-k-neg", [*S, "--top-k", "-1"], "--top-k -1"),
    Row("search-top-p-1.5", [*S, "--top-p", "1.5"], "--top-p 1.5"),
    Row("search-top-p-nan", [*S, "--top-p", "nan"], "--top-p nan"),
    Row("search-dtype-fp64", [*S, "--dtype", "fp64"], "--dtype 'fp64'"),
    Row("search-device-cuda-no-gpu", [*S, "--device", "cuda"], "--device cuda"),
    Row("search-device-cuda1-no-gpu", [*S, "--device", "cuda:1"], "--device cuda:1"),
    Row("search-device-garbage", [*S, "--device", "gpu"], "--device 'gpu'"),
    Row("search-device-cuda-in-driver",
        [*S, "--workers", "0", "--ray-address", "127.0.0.1:1", "--device", "cuda"], "--device cuda"),
    Row("search-device-garbage-on-cluster", [*S, "--ray-address", "127.0.0.1:1", "--device", "gpu"],
        "--device 'gpu'"),
    Row("search-backend-cudnn", [*S, "--attention-backend", "cudnn"], "--attention-backend 'cudnn'"),
    Row("search-evaluator-no-colon", [*S, "--evaluator", "nocolon"], "evaluator factory"),
    Row("search-evaluator-arg", [*S, "--evaluator-arg", "noequals"], "--evaluator-arg"),
    # --- search: storage, tracking, cluster, output ---------------------------------------------------------
    Row("search-storage-json-file", [*S, "--storage", "sqlite:///j.json"], "not an SQLite database",
        ("j.json",)),
    Row("search-storage-text-file", [*S, "--storage", "sqlite:///notes.txt"], "not an SQLite database",
        ("notes.txt",)),
    Row("search-storage-directory", [*S, "--storage", "sqlite:///adir"], "is a directory", ("adir",)),
    Row("search-storage-under-file", [*S, "--storage", "sqlite:///afile/s.db"], "--storage", ("afile",)),
    Row("search-storage-dialect", [*S, "--storage", "nosuchdialect://x/y"], "not a usable SQLAlchemy URL"),
    Row("search-storage-no-scheme", [*S, "--storage", "justtext"], "--storage"),
    Row("search-storage-postgres-down", [*S, "--storage", "postgresql://nobody@127.0.0.1:1/db"], "--storage"),
    Row("search-mlflow-unreachable", [*S, "--mlflow-uri", "http://127.0.0.1:1"],
        "--mlflow-uri http://127.0.0.1:1 is unreachable"),
    Row("search-mlflow-json-file", [*S, "--mlflow-uri", "sqlite:///j.json"], "--mlflow-uri", ("j.json",)),
    Row("search-mlflow-file-store", [*S, "--mlflow-uri", "mlruns"], "--mlflow-uri mlruns"),
    Row("search-ray-address-port-1", [*S, "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1"),
    Row("search-ray-address-nohost", [*S, "--ray-address", "nohost"], "--ray-address nohost"),
    Row("search-ray-address-bad-port", [*S, "--ray-address", "127.0.0.1:99999"],
        "--ray-address 127.0.0.1:99999"),
    # a database in a directory that does not exist yet is fine, but the directory is made only after every
    # check passed: with any other bad flag it must not appear
    Row("search-storage-newdir-bad-space",
        [*S, "--storage", "sqlite:///newdir/s.db", "--space", "space_family.yaml"],
        "--space", ("space_family.yaml",)),
    Row("search-storage-newdir-mlflow-down", [*S, "--storage", "sqlite:///newdir/s.db", "--mlflow-uri",
                                              "http://127.0.0.1:1"], "--mlflow-uri"),
    Row("search-storage-newdir-ray-down",
        [*S, "--storage", "sqlite:///newdir/s.db", "--ray-address", "127.0.0.1:1"],
        "--ray-address 127.0.0.1:1"),
    Row("search-storage-newdir-no-weights", [*S, "--storage", "sqlite:///newdir/s.db", "--model", "d16"],
        "--weights-dir"),
    Row("search-mlflow-newdir-bad-storage", [*S, "--mlflow-uri", "sqlite:///mdir/m.db", "--storage",
                                             "sqlite:///j.json"], "not an SQLite database", ("j.json",)),
    Row("search-out-under-file", [*S, "--out", "afile/sub"], "--out", ("afile",)),
    Row("search-out-is-file", [*S, "--out", "afile"], "--out", ("afile",)),

    # --- studies / show -----------------------------------------------------------------------------------
    Row("studies-missing-db", ["studies", "--storage", "sqlite:///missing.db"], "no such database file"),
    Row("studies-json-file", ["studies", "--storage", "sqlite:///j.json"], "not an SQLite database",
        ("j.json",)),
    Row("studies-directory", ["studies", "--storage", "sqlite:///adir"], "--storage", ("adir",)),
    Row("studies-dialect", ["studies", "--storage", "nosuchdialect://x/y"], "not a usable SQLAlchemy URL"),
    Row("studies-empty-url", ["studies", "--storage", ""], "--storage"),
    Row("studies-postgres-down", ["studies", "--storage", "postgresql://nobody@127.0.0.1:1/db"], "--storage"),
    Row("studies-mlflow-db", ["studies", "--storage", "sqlite:///mlflow.db"], "--storage", ("mlflow.db",)),
    Row("show-unknown-study", ["show", "nope", "--storage", "sqlite:///study.db"], "no study 'nope'",
        ("study.db",)),
    Row("show-missing-db", ["show", "s1", "--storage", "sqlite:///missing.db"], "no such database file"),
    Row("show-json-file", ["show", "s1", "--storage", "sqlite:///j.json"], "not an SQLite database",
        ("j.json",)),
    Row("show-dialect", ["show", "s1", "--storage", "nosuchdialect://x/y"], "not a usable SQLAlchemy URL"),

    # --- generate -----------------------------------------------------------------------------------------
    Row("generate-cfg-nan", ["generate", "--cfg", "nan"], "--cfg nan"),
    Row("generate-cfg-inf", ["generate", "--cfg", "inf"], "--cfg inf"),
    Row("generate-cfg-neg", ["generate", "--cfg", "-2"], "--cfg -2"),
    Row("generate-top-k-neg", ["generate", "--top-k", "-1"], "--top-k -1"),
    Row("generate-top-p-1.5", ["generate", "--top-p", "1.5"], "--top-p 1.5"),
    Row("generate-top-p-neg", ["generate", "--top-p", "-0.1"], "--top-p -0.1"),
    Row("generate-top-p-nan", ["generate", "--top-p", "nan"], "--top-p nan"),
    Row("generate-batch-0", ["generate", "--batch-size", "0"], "--batch-size 0"),
    Row("generate-batch-neg", ["generate", "--batch-size", "-3"], "--batch-size -3"),
    Row("generate-png-upscale-neg", ["generate", "--png-upscale", "-1"], "--png-upscale -1"),
    Row("generate-dtype-fp64", ["generate", "--dtype", "fp64"], "--dtype 'fp64'"),
    Row("generate-backend-cudnn", ["generate", "--attention-backend", "cudnn"],
        "--attention-backend 'cudnn'"),
    Row("generate-device-cuda-no-gpu", ["generate", "--device", "cuda"], "--device cuda"),
    Row("generate-device-garbage", ["generate", "--device", "gpu"], "--device 'gpu'"),
    Row("generate-seed-neg", ["generate", "--seed", "-1"], "--seed -1"),
    Row("generate-seed-huge", ["generate", "--seed", str(10**24)], "--seed"),
    Row("generate-classes-empty", ["generate", "--classes", ""], "--classes is empty"),
    Row("generate-classes-comma", ["generate", "--classes", ","], "--classes is empty"),
    Row("generate-classes-words", ["generate", "--classes", "a,b"], "--classes 'a,b'"),
    Row("generate-classes-out-of-range", ["generate", "--classes", "1,10"], "--classes 10"),
    Row("generate-classes-negative", ["generate", "--classes", "-1"], "--classes -1"),
    Row("generate-model-unknown", ["generate", "--model", "d99"], "unknown model"),
    Row("generate-d16-no-weights", ["generate", "--model", "d16"], "--weights-dir"),
    Row("generate-d16-empty-weights-dir", ["generate", "--model", "d16", "--weights-dir", "weights"],
        "var_d16.pth not found", ("weights",)),
    Row("generate-ckpt-garbage", ["generate", "--var-ckpt", "garbage.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("garbage.pth", "vae.pth")),
    Row("generate-ckpt-truncated", ["generate", "--var-ckpt", "trunc.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("trunc.pth", "vae.pth")),
    Row("generate-ckpt-empty", ["generate", "--var-ckpt", "empty.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("empty.pth", "vae.pth")),
    Row("generate-ckpt-missing", ["generate", "--var-ckpt", "missing.pth", "--vae-ckpt", "vae.pth"],
        "not found", ("vae.pth",)),
    Row("generate-ckpt-only-vae", ["generate", "--vae-ckpt", "vae.pth"],
        "pass both --var-ckpt and --vae-ckpt", ("vae.pth",)),
    Row("generate-ckpt-swapped", ["generate", "--var-ckpt", "vae.pth", "--vae-ckpt", "vae.pth"], "VQ-VAE",
        ("vae.pth",)),
    Row("generate-ckpt-pickled-object", ["generate", "--var-ckpt", "pickled.pth", "--vae-ckpt", "vae.pth"],
        "never unpickled", ("pickled.pth", "vae.pth")),
    Row("generate-classes-beyond-small-model",
        ["generate", *("--var-ckpt", "var.pth", "--vae-ckpt", "vae.pth"), "--classes", "10"],
        "--classes 10", CK),
    Row("generate-policy-missing", ["generate", "--policy", "missing.json"], "cannot read policy file"),
    Row("generate-policy-invalid-json", ["generate", "--policy", "pol_invalid.json"], "not valid JSON",
        ("pol_invalid.json",)),
    Row("generate-policy-for-d16", ["generate", "--policy", "pol_d16.json"], "policy for model d16",
        ("pol_d16.json",)),
    Row("generate-policy-other-checkpoint", ["generate", "--var-ckpt", "var.pth", "--vae-ckpt", "vae.pth",
                                             "--policy", TINY_POL], "policy for model tiny", (*CK, TINY_POL)),
    Row("generate-out-under-file", ["generate", "--out", "afile/sub"], "--out", ("afile",)),
    Row("generate-out-is-file", ["generate", "--out", "afile"], "--out", ("afile",)),

    # --- evaluate -----------------------------------------------------------------------------------------
    Row("evaluate-samples-1", ["evaluate", "--policy", "full", "--samples", "1"], "--samples 1"),
    Row("evaluate-samples-0", ["evaluate", "--policy", "full", "--samples", "0"], "--samples 0"),
    Row("evaluate-batch-0", ["evaluate", "--policy", "full", "--batch-size", "0"], "--batch-size 0"),
    Row("evaluate-seed-neg", ["evaluate", "--policy", "full", "--seed", "-2"], "--seed -2"),
    Row("evaluate-dtype-fp64", ["evaluate", "--policy", "full", "--dtype", "fp64"], "--dtype 'fp64'"),
    Row("evaluate-backend-cudnn", ["evaluate", "--policy", "full", "--attention-backend", "cudnn"],
        "--attention-backend 'cudnn'"),
    Row("evaluate-device-cuda-no-gpu", ["evaluate", "--policy", "full", "--device", "cuda"], "--device cuda"),
    Row("evaluate-unknown-preset", ["evaluate", "--policy", "nope"], "unknown policy 'nope'"),
    Row("evaluate-policy-missing", ["evaluate", "--policy", "missing.json"], "cannot read policy file"),
    Row("evaluate-policy-invalid-json", ["evaluate", "--policy", "pol_invalid.json"], "not valid JSON",
        ("pol_invalid.json",)),
    Row("evaluate-policy-schema-true", ["evaluate", "--policy", "pol_schema_true.json"],
        "schema_version True", ("pol_schema_true.json",)),
    Row("evaluate-policy-for-d16", ["evaluate", "--policy", "pol_d16.json"], "policy for model d16",
        ("pol_d16.json",)),
    Row("evaluate-model-unknown", ["evaluate", "--policy", "full", "--model", "d99"], "d99"),
    Row("evaluate-d16-no-weights", ["evaluate", "--policy", "full", "--model", "d16"], "--weights-dir"),
    Row("evaluate-d16-no-weights-names-random", ["evaluate", "--policy", "full", "--model", "d16"],
        "or use --random-weights"),
    Row("evaluate-d16-empty-weights-dir", ["evaluate", "--policy", "full", "--model", "d16", "--weights-dir",
                                           "weights"], "var_d16.pth not found", ("weights",)),
    Row("evaluate-ckpt-garbage", ["evaluate", "--policy", "full", "--var-ckpt", "garbage.pth", "--vae-ckpt",
                                  "vae.pth"], "not a readable PyTorch checkpoint",
        ("garbage.pth", "vae.pth")),
    Row("evaluate-reference-missing", ["evaluate", "--policy", "full", "--reference", "ref.npz"], "ref.npz"),
    Row("evaluate-inception-missing", ["evaluate", "--policy", "full", "--inception-weights", "inc.pth"],
        "inc.pth"),

    # --- plan ----------------------------------------------------------------------------------------------
    Row("plan-neither-policy-nor-family", ["plan"], "exactly one of"),
    Row("plan-both-policy-and-family", ["plan", "--policy", TINY_POL, "--family", "full"], "exactly one of",
        (TINY_POL,)),
    Row("plan-policy-with-param", ["plan", "--policy", TINY_POL, "--param", "window=2"], "--param",
        (TINY_POL,)),
    Row("plan-model-unknown", ["plan", "--model", "d99", "--family", "full"], "d99"),
    Row("plan-dtype-fp64", ["plan", "--family", "full", "--dtype", "fp64"], "--dtype 'fp64'"),
    Row("plan-family-unknown", ["plan", "--family", "nope"], "unknown policy family 'nope'"),
    Row("plan-param-no-equals", ["plan", "--family", "window", "--param", "window"], "name=value"),
    Row("plan-param-bad-yaml", ["plan", "--family", "window", "--param", "window=["], "--param"),
    Row("plan-param-window-0", ["plan", "--family", "window", "--param", "window=0"], "window"),
    Row("plan-param-unknown", ["plan", "--family", "window", "--param", "nonsense=1"], "nonsense"),
    Row("plan-ams-quantile", ["plan", "--family", "ams", "--param", "theta_quantile=1.5"], "theta_quantile"),
    Row("plan-calibration-missing", ["plan", "--family", "ams", "--calibration", "missing.json"],
        "--calibration missing.json"),
    Row("plan-calibration-garbage", ["plan", "--family", "ams", "--calibration", "j.json"], "calibration",
        ("j.json",)),
    Row("plan-gpu-mem-abc", ["plan", "--family", "full", "--gpu-mem", "abc"], "--gpu-mem"),
    Row("plan-gpu-mem-0", ["plan", "--family", "full", "--gpu-mem", "0"], "--gpu-mem"),
    Row("plan-gpu-mem-10XB", ["plan", "--family", "full", "--gpu-mem", "10XB"], "--gpu-mem"),
    Row("plan-heatmap-under-file", ["plan", "--family", "full", "--heatmap", "afile/h.png"], "--heatmap",
        ("afile",)),
    Row("plan-heatmap-directory", ["plan", "--family", "full", "--heatmap", "adir"],
        "--heatmap adir is a directory", ("adir",)),
    Row("plan-heatmap-unknown-type", ["plan", "--family", "full", "--heatmap", "h.xyz"], "--heatmap"),
    Row("plan-policy-missing", ["plan", "--policy", "missing.json"], "cannot read policy file"),
    Row("plan-policy-text", ["plan", "--policy", "notes.txt"], "not valid JSON", ("notes.txt",)),
    Row("plan-policy-for-tiny-on-d16", ["plan", "--model", "d16", "--policy", TINY_POL],
        "policy for model tiny", (TINY_POL,)),

    # --- policy show / validate ---------------------------------------------------------------------------
    Row("show-policy-missing", ["policy", "show", "missing.json"], "cannot read policy file"),
    Row("show-policy-directory", ["policy", "show", "adir"], "cannot read policy file", ("adir",)),
    Row("show-policy-invalid-json", ["policy", "show", "pol_invalid.json"], "not valid JSON",
        ("pol_invalid.json",)),
    Row("show-policy-truncated", ["policy", "show", "pol_trunc.json"], "not valid JSON", ("pol_trunc.json",)),
    Row("show-policy-list", ["policy", "show", "pol_list.json"], "not a varkv-tuner policy file",
        ("pol_list.json",)),
    Row("show-policy-no-schema", ["policy", "show", "pol_no_schema.json"], "no schema_version",
        ("pol_no_schema.json",)),
    Row("show-policy-schema-true", ["policy", "show", "pol_schema_true.json"], "schema_version True",
        ("pol_schema_true.json",)),
    Row("show-policy-schema-float", ["policy", "show", "pol_schema_float.json"], "schema_version 1.0",
        ("pol_schema_float.json",)),
    Row("show-policy-schema-string", ["policy", "show", "pol_schema_str.json"], "schema_version '1'",
        ("pol_schema_str.json",)),
    Row("show-policy-schema-2", ["policy", "show", "pol_schema2.json"], "schema_version 2",
        ("pol_schema2.json",)),
    Row("show-policy-memory-list", ["policy", "show", "pol_memory_list.json"], "policy",
        ("pol_memory_list.json",)),
    Row("show-policy-deeply-nested", ["policy", "show", "pol_deep.json"], "policy", ("pol_deep.json",),
        sub=True),
    Row("show-policy-unknown-family", ["policy", "show", "pol_family.json"], "unknown policy family",
        ("pol_family.json",)),
    Row("show-policy-edited-budgets", ["policy", "show", "pol_budgets.json"], "budget table",
        ("pol_budgets.json",)),
    Row("show-policy-bad-params", ["policy", "show", "pol_params.json"], "bad budgets parameters",
        ("pol_params.json",)),
    Row("show-policy-memory-mismatch", ["policy", "show", "pol_kv.json"], "memory figure", ("pol_kv.json",)),
    Row("show-policy-model-malformed", ["policy", "show", "pol_model.json"], "pol_model.json",
        ("pol_model.json",)),
    Row("show-heatmap-under-file", ["policy", "show", TINY_POL, "--heatmap", "afile/h.png"], "--heatmap",
        (TINY_POL, "afile")),
    Row("show-heatmap-directory", ["policy", "show", TINY_POL, "--heatmap", "adir"], "--heatmap adir",
        (TINY_POL, "adir")),
    Row("show-heatmap-unknown-type", ["policy", "show", TINY_POL, "--heatmap", "h.xyz"], "--heatmap",
        (TINY_POL,)),
    Row("validate-wrong-model", ["policy", "validate", TINY_POL, "--model", "d16"], "policy for model tiny",
        (TINY_POL,)),
    Row("validate-unknown-model", ["policy", "validate", TINY_POL, "--model", "d99"], "d99", (TINY_POL,)),
    Row("validate-missing-model-flag", ["policy", "validate", TINY_POL], "Missing option '--model'",
        (TINY_POL,)),
    Row("validate-garbage-file", ["policy", "validate", "garbage.pth", "--model", "tiny"], "garbage.pth",
        ("garbage.pth",)),
    Row("validate-deeply-nested", ["policy", "validate", "pol_deep.json", "--model", "tiny"], "policy",
        ("pol_deep.json",), sub=True),

    # --- policy check ---------------------------------------------------------------------------------------
    Row("check-reference-missing", ["policy", "check", TINY_POL, "--reference", "refs"], "reference refs",
        (TINY_POL,)),
    Row("check-reference-empty-dir", ["policy", "check", TINY_POL, "--reference", "adir"],
        "no reference policy files", (TINY_POL, "adir")),
    Row("check-candidate-missing", ["policy", "check", "missing.json", "--reference", "refs_tiny"],
        "cannot read policy file", ("refs_tiny",)),
    Row("check-candidate-invalid", ["policy", "check", "pol_invalid.json", "--reference", "refs_tiny"],
        "not valid JSON", ("pol_invalid.json", "refs_tiny")),
    Row("check-metric-unknown",
        ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--metric", "lpips"],
        "--metric 'lpips'", (TINY_POL, "refs_tiny")),
    Row("check-guard-unknown",
        ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--guard-metrics", "x"],
        "--guard-metrics", (TINY_POL, "refs_tiny")),
    Row("check-samples-1", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--samples", "1"],
        "--samples", (TINY_POL, "refs_tiny")),
    Row("check-batch-0", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--batch-size", "0"],
        "--batch-size", (TINY_POL, "refs_tiny")),
    Row("check-mem-tol-neg", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--mem-tol", "-1"],
        "--mem-tol -1", (TINY_POL, "refs_tiny")),
    Row("check-psnr-tol-nan", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--psnr-tol", "nan"],
        "--psnr-tol nan", (TINY_POL, "refs_tiny")),
    Row("check-seed-neg", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--seed", "-1"],
        "--seed -1", (TINY_POL, "refs_tiny")),
    Row("check-model-unknown", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--model", "d99"],
        "d99", (TINY_POL, "refs_tiny")),
    Row("check-wrong-model", ["policy", "check", TINY_POL, "--reference", "refs_tiny", "--model", "d16"],
        "policy for model tiny", (TINY_POL, "refs_tiny")),
    Row("check-no-reference-for-candidate", ["policy", "check", "pol_d16.json", "--reference", "refs_tiny"],
        "no reference policy for", ("pol_d16.json", "refs_tiny")),
    Row("check-d16-no-weights", ["policy", "check", "pol_d16.json", "--reference", "refs_d16"],
        "--weights-dir", ("pol_d16.json", "refs_d16"), absent="--random-weights"),
    Row("check-d16-no-weights-no-ckpt-flags", ["policy", "check", "pol_d16.json", "--reference", "refs_d16"],
        "TUNER_WEIGHTS_DIR", ("pol_d16.json", "refs_d16"), absent="--var-ckpt"),

    # --- calibrate ----------------------------------------------------------------------------------------
    Row("calibrate-samples-0", ["calibrate", "--samples", "0"], "--samples 0"),
    Row("calibrate-samples-neg", ["calibrate", "--samples", "-1"], "--samples -1"),
    Row("calibrate-seed-neg", ["calibrate", "--seed", "-1"], "--seed -1"),
    Row("calibrate-model-unknown", ["calibrate", "--model", "d99"], "unknown model"),
    Row("calibrate-d16-no-weights", ["calibrate", "--model", "d16"], "--weights-dir"),
    Row("calibrate-ckpt-garbage", ["calibrate", "--var-ckpt", "garbage.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("garbage.pth", "vae.pth")),
    Row("calibrate-ckpt-truncated", ["calibrate", "--var-ckpt", "var.pth", "--vae-ckpt", "trunc.pth"],
        "not a readable PyTorch checkpoint", ("var.pth", "trunc.pth")),
    Row("calibrate-ckpt-missing", ["calibrate", "--var-ckpt", "var.pth", "--vae-ckpt", "missing.pth"],
        "not found", ("var.pth",)),
    Row("calibrate-device-cuda-no-gpu", ["calibrate", "--device", "cuda"], "--device cuda"),
    Row("calibrate-device-garbage", ["calibrate", "--device", "gpu"], "--device 'gpu'"),
    Row("calibrate-out-under-file", ["calibrate", "--out", "afile/sub"], "--out", ("afile",)),
    Row("calibrate-out-is-file", ["calibrate", "--out", "afile"], "--out", ("afile",)),

    # --- presets ------------------------------------------------------------------------------------------
    Row("presets-mem-0", ["presets", "--mem-target", "0", "--out", "p"], "--mem-target '0'"),
    Row("presets-mem-150pct", ["presets", "--mem-target", "150%", "--out", "p"], "--mem-target '150%'"),
    Row("presets-mem-abc", ["presets", "--mem-target", "abc", "--out", "p"], "--mem-target 'abc'"),
    Row("presets-mem-neg5pct", ["presets", "--mem-target", "-5%", "--out", "p"], "--mem-target '-5%'"),
    Row("presets-mem-empty", ["presets", "--mem-target", "", "--out", "p"], "--mem-target is empty"),
    Row("presets-mem-10XB", ["presets", "--mem-target", "10XB", "--out", "p"], "--mem-target '10XB'"),
    Row("presets-mem-unreachable", ["presets", "--mem-target", "0.1%", "--out", "p"], "smallest achievable"),
    Row("presets-mem-unreachable-bytes", ["presets", "--mem-target", "1kB", "--out", "p"],
        "no preset can fit"),
    Row("presets-calibration-samples-0", ["presets", "--calibration-samples", "0", "--out", "p"],
        "--calibration-samples 0"),
    Row("presets-model-unknown", ["presets", "--model", "d99", "--out", "p"], "unknown model"),
    Row("presets-d16-no-weights", ["presets", "--model", "d16", "--out", "p"], "--weights-dir"),
    Row("presets-ckpt-garbage",
        ["presets", "--var-ckpt", "garbage.pth", "--vae-ckpt", "vae.pth", "--out", "p"],
        "not a readable PyTorch checkpoint", ("garbage.pth", "vae.pth")),
    Row("presets-device-cuda-no-gpu", ["presets", "--device", "cuda", "--out", "p"], "--device cuda"),
    Row("presets-out-under-file", ["presets", "--out", "afile/sub"], "--out", ("afile",)),

    # --- bench --------------------------------------------------------------------------------------------
    Row("bench-batch-0", ["bench", "--batch", "0"], "--batch"),
    Row("bench-repeats-0", ["bench", "--repeats", "0"], "--repeats"),
    Row("bench-warmup-neg", ["bench", "--warmup", "-1"], "--warmup"),
    Row("bench-dtype-fp64", ["bench", "--dtype", "fp64"], "--dtype 'fp64'"),
    Row("bench-backend-cudnn", ["bench", "--attention-backend", "cudnn"], "--attention-backend 'cudnn'"),
    Row("bench-device-cuda-no-gpu", ["bench", "--device", "cuda"], "--device cuda"),
    Row("bench-model-unknown", ["bench", "--model", "d99"], "unknown model"),
    Row("bench-d16-no-weights", ["bench", "--model", "d16"], "--weights-dir"),
    Row("bench-ckpt-garbage", ["bench", "--var-ckpt", "garbage.pth", "--vae-ckpt", "vae.pth"],
        "not a readable PyTorch checkpoint", ("garbage.pth", "vae.pth")),
    Row("bench-policy-missing", ["bench", "--policy", "missing.json"], "cannot read policy file"),
    Row("bench-policy-for-d16", ["bench", "--policy", "pol_d16.json"], "policy for model d16",
        ("pol_d16.json",)),
    Row("bench-out-under-file", ["bench", "--out", "afile/b.md"], "--out afile/b.md", ("afile",)),
    Row("bench-out-directory", ["bench", "--out", "adir"], "--out adir is a directory", ("adir",)),
    Row("bench-out-empty", ["bench", "--out", ""], "--out is empty"),
    Row("plan-heatmap-empty", ["plan", "--family", "full", "--heatmap", ""], "--heatmap is empty"),
    Row("generate-out-empty", ["generate", "--out", ""], "--out is empty"),

    # --- --threads: every command that computes ------------------------------------------------------------
    Row("generate-threads-0", ["generate", "--threads", "0"], "--threads 0 must be at least 1"),
    Row("bench-threads-neg", ["bench", "--threads", "-2"], "--threads -2 must be at least 1"),
    Row("calibrate-threads-0", ["calibrate", "--threads", "0"], "--threads 0 must be at least 1"),
    Row("presets-threads-0", ["presets", "--out", "p", "--threads", "0"], "--threads 0 must be at least 1"),
    Row("evaluate-threads-0", ["evaluate", "--policy", "ams", "--threads", "0"],
        "--threads 0 must be at least 1"),
    Row("bench-threads-not-int", ["bench", "--threads", "two"], "'--threads'"),
]


# --- fixture files ----------------------------------------------------------------------------------------
def _policy_variant(assets: Path, edit) -> str:
    doc = json.loads((assets / TINY_POL).read_text())
    edit(doc)
    return json.dumps(doc)


def _set(key, value):
    def edit(doc):
        doc[key] = value
    return edit


def _edit_budgets(doc):
    doc["budgets"][0][-1] += 1


def _edit_params(doc):
    doc["policy"]["params"]["max_tokens"] = -5


def _edit_kv(doc):
    doc["memory"]["kv_bytes_per_image"] += 2


def _edit_model(doc):
    doc["model"]["depth"] = "six"


def _edit_family(doc):
    doc["policy"]["family"] = "quantum"


def _deep(levels: int = 200_000) -> str:
    return '{"schema_version": 1, "model": ' + "[" * levels + "]" * levels + "}"


def _alias_bomb() -> str:
    """A billion-laughs YAML file: 9 levels of 9 aliases each, 9**9 strings once expanded."""
    lines = ["schema_version: 1", "families:", "  ams:", "    params: {}",
             'a: &a ["lol","lol","lol","lol","lol","lol",'
             '"lol","lol","lol"]']
    names = "abcdefghi"
    for prev, cur in zip(names, names[1:]):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    return text + "#" * max(0, 438 - len(text)) + "\n"


SPACE_HEAD = "schema_version: 1\nfamilies:\n  window:\n    params:\n"
FIXTURES = {
    # name: (kind, maker): "copy" an asset file, "bytes"/"text" a file of maker(assets), "dir" a directory
    # (maker: its files, or None for an empty one)
    "var.pth": ("copy", "var.pth"),
    "vae.pth": ("copy", "vae.pth"),
    "pickled.pth": ("copy", "pickled.pth"),
    "trunc.pth": ("bytes", lambda a: (a / "var.pth").read_bytes()[:1000]),
    "garbage.pth": ("bytes", lambda a: bytes(range(256)) * 16),
    "empty.pth": ("bytes", lambda a: b""),
    "notes.txt": ("text", lambda a: "hello\n"),
    "j.json": ("text", lambda a: '{"a": 1}\n'),
    "afile": ("text", lambda a: "x\n"),
    "adir": ("dir", None),
    "weights": ("dir", None),
    "wbad": ("dir", {"var_d16.pth": b"not a checkpoint", "vae_ch160v4096z32.pth": b"neither"}),
    "study.db": ("copy", "study.db"),
    "mlflow.db": ("copy", "mlflow.db"),
    TINY_POL: ("copy", TINY_POL),
    "pol_d16.json": ("copy", "pol_d16.json"),
    "refs_tiny": ("dir", {"ref.json": lambda a: (a / TINY_POL).read_bytes()}),
    "refs_d16": ("dir", {"ref.json": lambda a: (a / "pol_d16.json").read_bytes()}),
    "pol_invalid.json": ("text", lambda a: '{"schema_version": 1, "model": {'),
    "pol_trunc.json": ("text", lambda a: (a / TINY_POL).read_text()[:300]),
    "pol_list.json": ("text", lambda a: "[1, 2, 3]"),
    "pol_no_schema.json": ("text", lambda a: _policy_variant(a, lambda d: d.pop("schema_version"))),
    "pol_schema_true.json": ("text", lambda a: _policy_variant(a, _set("schema_version", True))),
    "pol_schema_float.json": ("text", lambda a: _policy_variant(a, _set("schema_version", 1.0))),
    "pol_schema_str.json": ("text", lambda a: _policy_variant(a, _set("schema_version", "1"))),
    "pol_schema2.json": ("text", lambda a: _policy_variant(a, _set("schema_version", 2))),
    "pol_memory_list.json": ("text", lambda a: _policy_variant(a, _set("memory", []))),
    "pol_deep.json": ("text", lambda a: _deep()),
    "pol_family.json": ("text", lambda a: _policy_variant(a, _edit_family)),
    "pol_budgets.json": ("text", lambda a: _policy_variant(a, _edit_budgets)),
    "pol_params.json": ("text", lambda a: _policy_variant(a, _edit_params)),
    "pol_kv.json": ("text", lambda a: _policy_variant(a, _edit_kv)),
    "pol_model.json": ("text", lambda a: _policy_variant(a, _edit_model)),
    "space_syntax.yaml": ("text", lambda a: "schema_version: 1\nfamilies: {ams: [\n"),
    "space_list.yaml": ("text", lambda a: "- 1\n- 2\n"),
    "space_empty.yaml": ("text", lambda a: ""),
    "space_family.yaml": ("text", lambda a: "schema_version: 1\nfamilies:\n  quantum:\n    params: {}\n"),
    "space_len.yaml": ("text", lambda a: SPACE_HEAD + "      window: {type: int, low: 1, "
                       "high: 'len(\"x\" * 10**15)'}\n"),
    "space_pow.yaml": ("text", lambda a: SPACE_HEAD + '      window: {type: int, low: 1, '
                       'high: "((((10**64)**64)**64)**64)"}\n'),
    "space_repeat.yaml": ("text", lambda a: "schema_version: 1\nfamilies:\n  budgets:\n    params:\n"
                          "      layer_weights: {type: float, low: 0.25, high: 4.0, repeat: 100000000}\n"),
    "space_bomb.yaml": ("text", lambda a: _alias_bomb()),
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Files the fixtures copy: small checkpoints, policy files, an Optuna and an MLflow database."""
    import torch

    from tests.conftest import small_config
    from tuner.model.config import model_config
    from tuner.model.loading import random_models
    from tuner.policies.window import WindowPolicy
    from tuner.policy_file import write_policy_file

    d = tmp_path_factory.mktemp("bad-input-assets")
    small = random_models(small_config(), seed=0)
    torch.save(small.var.state_dict(), d / "var.pth")
    torch.save(small.vae.state_dict(), d / "vae.pth")
    torch.save({"head.weight": Payload()}, d / "pickled.pth")
    shutil.copy(ROOT / "policies" / "tiny-10pct.json", d / TINY_POL)
    write_policy_file(d / "pol_d16.json", WindowPolicy(window=3), model_config("d16"),
                      provenance={"mem_target": "10%", "metric": "fid_vs_full"})
    _make_databases(d)
    return d


class Payload:
    """Anything pickled into a checkpoint besides tensors."""


def _make_databases(d: Path) -> None:
    code = (
        "import sys, optuna, mlflow\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "optuna.create_study(study_name='s1', storage='sqlite:///' + sys.argv[1] + '/study.db')\n"
        "mlflow.tracking.MlflowClient(tracking_uri='sqlite:///' + sys.argv[1] + '/mlflow.db')"
        ".create_experiment('x')\n")
    res = subprocess.run([sys.executable, "-c", code, str(d)], env=_subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def _materialize(name: str, target: Path, assets: Path) -> None:
    kind, maker = FIXTURES[name]
    path = target / name
    if kind == "copy":
        shutil.copy(assets / maker, path)
    elif kind == "bytes":
        path.write_bytes(maker(assets))
    elif kind == "text":
        path.write_text(maker(assets))
    else:
        path.mkdir()
        for child, content in (maker or {}).items():
            data = content(assets) if callable(content) else content
            (path / child).write_bytes(data)


def snapshot(root: Path) -> dict:
    """Every path below ``root`` with its type and (files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() and not p.is_symlink() else \
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def prepare(row: Row, directory: Path, assets: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for name in row.files:
        _materialize(name, directory, assets)
    return snapshot(directory)


# --- running a row ---------------------------------------------------------------------------------------
class ExpensiveWork(BaseException):
    """Raised (in-process rows) where expensive or side-effecting work would start."""


EXPENSIVE = ("tuner.search.ray_pool.start_ray", "tuner.search.workers.InlinePool.start",
             "tuner.model.generate.generate", "tuner.calibration.load_or_compute_calibration",
             "tuner.quality.evaluate.PolicyEvaluator.evaluate", "tuner.cli.bench_cmd.run_bench")


def _subprocess_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (SUB_MEMORY_BYTES, SUB_MEMORY_BYTES))


def run_subprocess(row: Row, cwd: Path) -> tuple[int, str, str]:
    try:
        res = subprocess.run([sys.executable, "-m", "tuner", *row.argv], cwd=cwd,
                             env=_subprocess_env(row.env), capture_output=True, text=True,
                             timeout=SUB_TIMEOUT_S, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as exc:
        return -1, str(exc.stdout or ""), f"timed out after {SUB_TIMEOUT_S} s\n{exc.stderr or ''}"
    return res.returncode, res.stdout, res.stderr


def run_in_process(row: Row, cwd: Path, monkeypatch) -> tuple[int, str, str]:
    from tuner.cli import main

    for target in EXPENSIVE:
        def refuse(*args, _what=target, **kwargs):
            raise ExpensiveWork(f"{_what} was reached: the row must fail before it")
        monkeypatch.setattr(target, refuse)
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in {**ENV, **(row.env or {})}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(row.argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the test reports
            err.write(traceback.format_exc())
            code = 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory, assets):
    """The ``sub`` rows, started first (autouse) in a pool of 2 while the in-process rows run.

    Calibration statistics get a cache outside every row's directory (no row may reach them anyway).
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNER_CACHE_DIR", str(tmp_path_factory.mktemp("bad-input-cache")))
    base = tmp_path_factory.mktemp("bad-input-sub")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    jobs = {}
    for i, row in enumerate(r for r in ROWS if r.sub):
        cwd = base / f"{i:02d}"
        before = prepare(row, cwd, assets)
        jobs[row.id] = (cwd, before, pool.submit(run_subprocess, row, cwd))
    yield jobs
    pool.shutdown(wait=True)
    mp.undo()


def test_table_is_large_and_covers_every_subcommand():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    assert len(ROWS) >= 150
    commands = {" ".join(r.argv[:2]) if r.argv[0] == "policy" else r.argv[0] for r in ROWS}
    for command in ("search", "studies", "show", "generate", "evaluate", "plan", "policy show",
                    "policy validate", "policy check", "calibrate", "presets", "bench"):
        assert command in commands, command
    assert all(r.code == 2 for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, assets, background, monkeypatch):
    if row.sub:
        cwd, before, future = background[row.id]
        code, out, err = future.result()
    else:
        cwd = tmp_path / "cwd"
        before = prepare(row, cwd, assets)
        code, out, err = run_in_process(row, cwd, monkeypatch)
    shown = f"argv: {row.argv}\nexit: {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, shown
    assert code == row.code, shown
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert row.fragment in lines[0], shown
    if row.absent is not None:
        assert row.absent not in lines[0], shown
    assert snapshot(cwd) == before, f"{shown}\nleft behind or changed: " \
        f"{sorted(set(snapshot(cwd).items()) ^ set(before.items()))}"


# --- the good requests next to the bad ones: output places that do not exist yet are created (late) ---------
def test_search_creates_a_new_storage_directory_after_validation(tmp_path):
    """``--storage sqlite:///newdir/s.db`` is a fine request: the search runs and the directory appears."""
    from tests.search.helpers import TOY_SPACE

    (tmp_path / "toy.yaml").write_text(TOY_SPACE)
    args = [sys.executable, "-m", "tests.search.cli_entry", "search", "--mem-target", "60%", "--space",
            "toy.yaml", "--trials", "2", "--workers", "0", "--samples", "2", "--final-samples", "2",
            "--device", "cpu", "--mlflow-uri", "none", "--no-presets", "--no-progress", "--evaluator",
            "tests.search.fake_eval:build", "--out", "out", "--storage", "sqlite:///newdir/deeper/s.db"]
    res = subprocess.run(args, cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "newdir" / "deeper" / "s.db").is_file()


def test_plan_heatmap_into_a_new_directory(tmp_path, monkeypatch):
    row = Row("plan-heatmap-newdir", ["plan", "--family", "full", "--heatmap", "new/deeper/h.png"], "",
              code=0)
    code, out, err = run_in_process(row, tmp_path, monkeypatch)
    assert code == 0, out + err
    assert (tmp_path / "new" / "deeper" / "h.png").is_file()
