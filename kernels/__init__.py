"""Triton kernels of amos_fused (installed as amos_fused.kernels)."""
