#!/usr/bin/env bash
# The GPU check of issue 20 in one command (see experiments/gpu/README.md):
#
#   experiments/gpu/run.sh [--dry-run] [--no-install] OUTDIR [more flags of python -m experiments.gpu.check]
#
# Installs the package on the machine's own torch/triton (pip --no-deps: nothing is downloaded), then
# runs the Python driver, which does every step with a time limit and writes the tables to OUTDIR.
# Exit status: the driver's (1 on any mismatch or failed step). --dry-run: CPU, toy sizes, no install.
# GPU_CHECK_TOTAL_S (default 470) bounds install + driver together: the driver gets what is left.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

dry=0 install=1 args=()
while (($#)); do
  case "$1" in
    --dry-run) dry=1; args+=("$1") ;;
    --no-install) install=0 ;;
    *) args+=("$1") ;;
  esac
  shift
done

t0=$SECONDS
status="skipped"
if ((dry)); then
  echo "[install] dry run: pip install skipped (it would change this environment)"
elif ((install)); then
  # --no-build-isolation: the device has no network to fetch setuptools into an isolated build env.
  echo "[install] \$ $PY -m pip install --no-index --no-deps --no-build-isolation -e ."
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    status="ok"
  else
    status="failed"
    echo "[install] FAILED: pip install; the steps run from the source tree (python -m ...) regardless" >&2
  fi
  echo "[install] $status in $((SECONDS - t0)) s"
fi

t1=$SECONDS
budget=()
if ((!dry)); then  # a --budget-s among the user's flags comes later and wins
  budget=(--budget-s "$(( ${GPU_CHECK_TOTAL_S:-470} - (SECONDS - t0) ))")
fi
rc=0
"$PY" -m experiments.gpu.check --install-status "$status" "${budget[@]}" "${args[@]}" || rc=$?
echo "[run.sh] driver exit status $rc after $((SECONDS - t1)) s; total $((SECONDS - t0)) s"
exit "$rc"
