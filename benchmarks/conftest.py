"""Shared set-up of the benchmark suites: thread count, and the pytest-benchmark conventions write_results.py reads.

Every benchmark sets ``benchmark.group`` to one case (shape, experts, tokens) and ``benchmark.extra_info["impl"]`` to
one of "base", "peft", "torch", "ours", ...; write_results.py reports each impl's median and its ratio to the
group's "base" and "peft" measured in the same run.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("GKF_BENCH_THREADS", min(2, os.cpu_count() or 1))))
