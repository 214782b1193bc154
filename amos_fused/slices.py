"""Slice geometry and the default scale `eta` (docs/algorithm.md: "Slices", "The scale eta").

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


def default_eta(shape, mean_square):
    """The spec's default eta of a parameter of `shape`: RMS(theta_0) for matrices, from the mean
    of theta_0**2 over the (global) tensor, or the fan-in rule if that is 0; 0.5 otherwise."""
    if len(shape) <= 1:
        return 0.5
    fan_in = math.prod(shape[1:])
    rms = math.sqrt(mean_square) if mean_square else 0.0
    if rms > 0 and math.isfinite(rms):
        return rms
    return math.sqrt(1.0 / fan_in) if fan_in else 1.0
