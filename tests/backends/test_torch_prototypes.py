"""Arrow prototypes in plain PyTorch: the exact r×r method against a full SVD, and PEFT's power iteration."""

import pytest
import torch

from genknowsub_fast import reference
from genknowsub_fast.backends import torch_prototypes
from tests.tolerances import PROTOTYPE_MIN_COS, PROTOTYPE_POWER_CONVERGED_MIN_COS


def _decaying(e, r, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(e, r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(e, d_out, r, generator=g, dtype=torch.float64) * (0.5 ** torch.arange(r, dtype=torch.float64))
    return a, b


@pytest.mark.parametrize("r", [1, 4, 16])
def test_exact_prototypes_match_svd(r):
    a, b = _decaying(6, r, 37, 29, seed=r)
    p, zero = torch_prototypes.exact_prototypes(a.float(), b.float())
    ref = reference.prototypes_svd(a, b)
    cos = (p.double() * ref).sum(1).abs()
    assert not zero.any()
    assert float(cos.min()) >= PROTOTYPE_MIN_COS


def test_exact_prototypes_zero_expert_and_canonical_sign():
    a, b = _decaying(3, 4, 12, 10)
    b[1] = 0
    p, zero = torch_prototypes.exact_prototypes(a, b)
    assert zero.tolist() == [False, True, False]
    assert torch.all(p[1] == 0)
    torch.testing.assert_close(p, reference.prototypes_svd(a, b))  # same canonical sign as the reference


def test_power_prototypes_are_peft_like_and_seeded():
    a, b = _decaying(4, 4, 40, 30, seed=7)
    p1 = torch_prototypes.power_prototypes(a.float(), b.float(), rng_seed=3)
    p2 = torch_prototypes.power_prototypes(a.float(), b.float(), rng_seed=3)
    assert torch.equal(p1, p2)
    cos = (p1.double() * reference.prototypes_svd(a, b)).sum(1).abs()
    assert float(cos.min()) > PROTOTYPE_POWER_CONVERGED_MIN_COS  # decay 0.5 per singular value: 15 steps converge


def test_power_prototypes_match_peft_implementation():
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    a, b = _decaying(3, 4, 20, 16, seed=2)
    cfg = ArrowConfig(top_k=1, rng_seed=11)
    cfg.task_adapter_names, cfg.gks_adapter_names = ["t"], []
    layer = ArrowLoraLinearLayer(20, cfg)
    ours = torch_prototypes.power_prototypes(a.float(), b.float(), rng_seed=11)
    for e in range(3):
        torch.testing.assert_close(ours[e], layer.top_right_singular_vec_from_BA(a[e].float(), b[e].float()))
