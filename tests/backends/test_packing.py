"""The packed layout: float32 prototypes, folded scaling, padded CPU rows, mixing checks."""

import pytest
import torch

from genknowsub_fast.backends.packing import check_mixing, pack_experts, padded_rows


def test_views_and_folded_scaling():
    a = torch.randn(3, 2, 7)
    b = torch.randn(3, 5, 2)
    s = torch.tensor([0.5, 1.0, 2.0])
    p = torch.randn(3, 7)
    pk = pack_experts(a, b, s, p)
    torch.testing.assert_close(pk.prototypes, p)
    torch.testing.assert_close(pk.a, a)
    torch.testing.assert_close(pk.a_flat, a.reshape(6, 7))
    torch.testing.assert_close(pk.b_t, b.transpose(1, 2) * s.view(3, 1, 1))
    torch.testing.assert_close(pk.b_flat, (b.transpose(1, 2) * s.view(3, 1, 1)).reshape(6, 5))
    assert (pk.d_in, pk.d_out, pk.num_experts, pk.rank) == (7, 5, 3, 2)


def test_padded_rows_have_an_odd_cache_line_stride():
    b = torch.randn(2, 3, 5632)
    out = padded_rows(b)
    torch.testing.assert_close(out, b)
    line_stride = out.stride(1) * out.element_size() // 64
    assert line_stride % 2 == 1 and out.stride(0) == 3 * out.stride(1)
    assert out.view(6, 5632).shape == (6, 5632)


def test_dtype_and_shape_checks():
    a, b, s, p = torch.randn(2, 3, 4), torch.randn(2, 5, 3), torch.ones(2), torch.randn(2, 4)
    half = pack_experts(a, b, s, p, dtype=torch.bfloat16)
    assert half.b_t.dtype == half.a.dtype == torch.bfloat16
    assert half.prototypes.dtype == torch.float32, "routing scores are float32 whatever the compute dtype"
    torch.testing.assert_close(half.prototypes, p, rtol=0, atol=0)
    with pytest.raises(ValueError, match="experts run in one of"):
        pack_experts(a, b, s, p, dtype=torch.int8)
    with pytest.raises(ValueError, match="floating-point"):
        pack_experts(a.to(torch.int32), b, s, p)
    with pytest.raises(ValueError, match="expected A"):
        pack_experts(a, torch.randn(2, 5, 2), s, p)
    with pytest.raises(ValueError, match="prototypes"):
        pack_experts(a, b, s, torch.randn(3, 4))
    with pytest.raises(ValueError, match="scaling"):
        pack_experts(a, b, torch.ones(3), p)


def test_weights_mixing_needs_shared_rank_and_scaling():
    check_mixing("weights", torch.full((3,), 2.0), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="one shared scaling"):
        check_mixing("weights", torch.tensor([1.0, 2.0]), None)
    with pytest.raises(ValueError, match="share one rank"):
        check_mixing("weights", torch.ones(2), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="mixing must be"):
        check_mixing("average", torch.ones(2), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_stored_form_round_trips_and_pack_into_equals_pack_experts(dtype):
    """A file stores stored_tensors(packed) and maps it back with from_stored; a build fills a module chunk by chunk
    with pack_into: both give pack_experts' tensors bit for bit."""
    from genknowsub_fast.backends.packing import from_stored, pack_into, stored_tensors

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 40, generator=gen), torch.randn(5, 72, 3, generator=gen)
    s, p = torch.tensor([2.0, 0.75, 1.5, 1 / 3, 4.0]), torch.randn(5, 40, generator=gen)
    whole = pack_experts(a, b, s, p.to(dtype), dtype=dtype)
    tensors, layout = stored_tensors(whole)
    assert layout == {"d_out": 72} and all(t.is_contiguous() and t.shape[0] == 5 for t in tensors.values())
    back = from_stored({k: t.clone() for k, t in tensors.items()}, layout)
    empty = from_stored({k: torch.zeros_like(t) for k, t in tensors.items()}, layout)
    for start, stop in ((0, 2), (2, 5)):
        pack_into(empty, start, a[start:stop], b[start:stop], s[start:stop], p[start:stop].to(dtype))
    for packed in (back, empty):
        assert packed.b_t.stride() == whole.b_t.stride()
        for name in ("prototypes", "a", "b_t"):
            assert torch.equal(getattr(packed, name), getattr(whole, name)), name
    with pytest.raises(ValueError, match="b_t has shape"):
        from_stored({**tensors, "b_t": tensors["b_t"][:, :2]}, layout)
    with pytest.raises(ValueError, match="prototypes has shape"):
        from_stored({**tensors, "prototypes": tensors["prototypes"][:4]}, layout)
