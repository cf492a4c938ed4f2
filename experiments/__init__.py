"""Experiment scripts and the GPU check package (``experiments.gpu``).

Run a script from the repository root as ``python -m experiments.NAME``.
"""
