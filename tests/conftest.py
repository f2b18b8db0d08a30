"""Test-session setup and fixtures shared by every test directory."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, so it must be set before anything imports triton: without
# a GPU the Triton kernels run in the interpreter (numpy), which is what the kernel tests under tests/ use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass
class TinySetup:
    """A tiny random model with synthetic task and general adapters written in PEFT format."""

    base: torch.nn.Module
    task: list
    general: list
    ids: torch.Tensor

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)


def _tiny(tmp_path_factory, make, targets, name, num_tasks=5, num_general=3):
    from genknowsub_fast.synthetic import write_adapters

    base = make()
    out = tmp_path_factory.mktemp(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, out, num_tasks, num_general, rank=4, target_modules=targets, seed=1)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return TinySetup(base, ad.task, ad.general, ids)


@pytest.fixture(scope="session")
def phi3_setup(tmp_path_factory) -> TinySetup:
    from genknowsub_fast.synthetic import PHI3_TARGETS, make_phi3

    return _tiny(tmp_path_factory, lambda: make_phi3("tiny"), PHI3_TARGETS, "phi3")


@pytest.fixture(scope="session")
def phi2_setup(tmp_path_factory) -> TinySetup:
    from genknowsub_fast.synthetic import PHI2_TARGETS, make_phi2

    return _tiny(tmp_path_factory, make_phi2, PHI2_TARGETS, "phi2")
