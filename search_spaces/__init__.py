"""The shipped search spaces (``<family>.yaml``; ``all.yaml`` stands for the union of every searchable
family, expanded from the registry by :func:`tuner.search.space.load_space`), installed with the package.

A data package: :func:`tuner.search.space.space_path_for` finds the files beside this module, in a
source checkout and in an installed wheel alike.
"""
