"""Kernels: pure-torch references (the spec, the CPU path) and Triton kernels, with a dispatch."""
