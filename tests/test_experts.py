"""ModuleExperts: a readable repr and float-only dtypes."""

import pytest
import torch

from genknowsub_fast import ModuleExperts


def _experts(e=3, r=2, d_in=512, d_out=768):
    gen = torch.Generator().manual_seed(0)
    return ModuleExperts(
        torch.randn(e, r, d_in, generator=gen),
        torch.randn(e, d_out, r, generator=gen),
        torch.ones(e),
        torch.nn.functional.normalize(torch.randn(e, d_in, generator=gen), dim=1),
        torch.tensor([2, 1, 2]),
    )


def test_repr_is_one_short_line():
    """the dataclass repr printed every tensor."""
    text = repr(_experts())
    assert text == "ModuleExperts(3 experts, 512→768, rank 1/2, float32, cpu)"


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, "float16"])
def test_to_refuses_non_float_dtypes(dtype):
    """`to(dtype=torch.int8)` truncated every factor to zero."""
    with pytest.raises(ValueError, match="floating-point dtype"):
        _experts().to(dtype=dtype)


def test_to_keeps_scaling_and_ranks_dtypes():
    m = _experts().to(dtype=torch.bfloat16)
    assert m.a.dtype == m.b.dtype == m.prototypes.dtype == torch.bfloat16
    assert m.scaling.dtype == torch.float32 and m.ranks.dtype == torch.int64
