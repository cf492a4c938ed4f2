"""The GPU check of issue 20: ``experiments/gpu/run.sh OUTDIR`` (see README.md here)."""
