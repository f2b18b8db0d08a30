# Installs as genknowsub_fast.triton_kernels, not as top-level `triton_kernels`: a PyPI distribution owns that name.
"""Triton kernels of genknowsub_fast: the dispatch table (``dispatch``), the launch sequences (``linear``), and the
kernels of each regime (``decode``, ``route_shrink``, ``expand``, ``grouped``)."""
