"""Triton kernels of genknowsub_fast (installed as ``genknowsub_fast.triton_kernels``)."""
