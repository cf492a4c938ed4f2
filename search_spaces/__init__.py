"""The shipped search spaces (``<family>.yaml``; ``all.yaml`` is their union), installed with the package.

A data package: :func:`tuner.search.space.space_path_for` finds the files beside this module, in a
source checkout and in an installed wheel alike.
"""
