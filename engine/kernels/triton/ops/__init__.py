"""Triton kernels and their launch code; imported only when a CUDA kernel first runs (needs triton)."""
