"""Triton kernels of the sampler's hot path."""
