"""Slice geometry (docs/algorithm.md: "Slices"); the default scale `eta` is in defaults.py.

Every tensor is viewed as a matrix [R, C] in its own memory order; slice r is one row.
"""
import math

GRANULARITIES = ("row", "tensor", "element")


def slice_shape(shape, granularity):
    """(R, C): number of slices and elements per slice of a tensor of `shape`."""
    n = math.prod(shape)
    if granularity == "element":
        return n, 1
    if granularity == "tensor" or len(shape) <= 1:
        return 1, n
    return shape[0], math.prod(shape[1:])

