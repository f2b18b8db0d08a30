"""Exact prototypes of the compiled extension (csrc/prototypes_*.{cpp,cu}) and of the batched entry point.

Ground truth: the top right singular vector of ΔW = B A from a float64 full SVD. Both the extension and the
torch.linalg fallback must reach |cos| >= 0.99999 on decaying spectra and agree with each other, sign included.
"""

from __future__ import annotations

import pytest
import torch

from genknowsub_fast.backends import extension, prototype_ext, torch_prototypes
from tests.extension_required import require_op
from tests.tolerances import (
    FP32_WEIGHTS,
    PROTOTYPE_BF16,
    PROTOTYPE_FP32,
    PROTOTYPE_LOW_PRECISION_MIN_COS,
    PROTOTYPE_MIN_COS,
)

MIN_COS = PROTOTYPE_MIN_COS


@pytest.fixture(scope="module")
def op():
    require_op("arrow_prototypes_batched")
    return torch.ops.genknowsub_fast_C


def decaying(e, r, d_in, d_out, seed=0, decay=0.6, dtype=torch.float64):
    """Factors with geometrically decaying singular values (ratio ``decay``), ΔW of rank r with a clear top gap."""
    g = torch.Generator().manual_seed(seed)

    def mat(m, n):
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        return (u * decay ** torch.arange(k, dtype=torch.float64)) @ v.T

    a = torch.stack([mat(r, d_in) for _ in range(e)])
    b = torch.stack([mat(d_out, r) for _ in range(e)])
    return a.to(dtype), b.to(dtype)


def svd_top(a, b):
    return torch.linalg.svd(b.double() @ a.double()).Vh[:, 0, :]


def abs_cos(p, ref):
    p = p.double()
    return ((p * ref).sum(-1).abs() / (p.norm(dim=-1) * ref.norm(dim=-1))).min().item()


@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("d_in", [37, 211])
def test_matches_float64_svd(op, r, d_in):
    a, b = decaying(3, r, d_in, 150, seed=r + d_in)
    ref = svd_top(a, b)
    for dtype in (torch.float32, torch.float64):
        p, zero = op.arrow_prototypes(a.to(dtype), b.to(dtype))
        assert p.dtype == dtype and p.shape == (3, d_in) and not zero.any()
        assert abs_cos(p, ref) >= MIN_COS, (r, d_in, dtype)
        assert torch.allclose(p.double().norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=PROTOTYPE_FP32["atol"])


@pytest.mark.parametrize("r", [1, 3, 4, 8, 16, 64])
def test_agrees_with_torch_fallback(op, r):
    a, b = decaying(4, r, 93, 70, seed=10 + r, dtype=torch.float32)
    p, zero = op.arrow_prototypes(a, b)
    pt, zt = torch_prototypes.exact_prototypes(a, b)
    assert torch.equal(zero, zt)
    torch.testing.assert_close(p, pt, **PROTOTYPE_FP32)  # same canonical sign, so no sign flips


def test_e1_and_fixed_rank_paths(op):
    # E = 1 takes the split-over-d_in path; r = 2, 4, 8 the unrolled Gram kernels; d_in not a multiple of 16.
    for r in (2, 3, 4, 8):
        a, b = decaying(1, r, 1001, 333, seed=r)
        p, _ = op.arrow_prototypes(a.float(), b.float())
        assert abs_cos(p, svd_top(a, b)) >= MIN_COS, r


@pytest.mark.parametrize("d_in", [37, 259, 1030, 3075])
def test_rank8_float32_gram_kernels(op, d_in):
    # r = 8 float32 takes the AVX2 Gram kernels where built with them (A in column blocks of 256 plus a tail of
    # d_in % 4 columns); E = 1 splits the columns into chunks that start at unaligned offsets, E = 6 does not.
    for e in (1, 6):
        a, b = decaying(e, 8, d_in, 97, seed=d_in + e)
        ref = svd_top(a, b)
        p32, zero = op.arrow_prototypes(a.float(), b.float())
        p64, _ = op.arrow_prototypes(a, b)
        assert not zero.any()
        assert abs_cos(p32, ref) >= MIN_COS, (d_in, e)
        torch.testing.assert_close(p32.double(), p64, **PROTOTYPE_FP32)


def test_large_call_outputs(op):
    # Over 64 MB of prototypes: the outputs are slices of one huge-page block, each tensor with its own storage, and
    # must equal the per-module (small call) results and outlive each other.
    g = torch.Generator().manual_seed(5)
    a_list = [torch.randn(64, 1, 16384, generator=g) for _ in range(17)]
    b_list = [torch.randn(64, 4, 1, generator=g) for _ in range(17)]
    protos, zeros = op.arrow_prototypes_batched(a_list, b_list)
    ptrs = {p.untyped_storage().data_ptr() for p in protos}
    assert len(ptrs) == 17
    keep = protos[4].clone()
    del protos[:4], protos[1:]
    for _ in range(3):
        torch.ones(1 << 20).sum()
    p4, z4 = op.arrow_prototypes(a_list[4], b_list[4])
    assert torch.equal(protos[0], keep) and torch.equal(protos[0], p4) and torch.equal(zeros[4], z4)


def test_many_experts_parallel_path(op):
    a, b = decaying(9, 4, 45, 61, seed=3)
    p, _ = op.arrow_prototypes(a.float(), b.float())
    assert abs_cos(p, svd_top(a, b)) >= MIN_COS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(op, dtype):
    a, b = decaying(3, 4, 77, 40, seed=5)
    a, b = a.to(dtype), b.to(dtype)
    p, zero = op.arrow_prototypes(a, b)
    assert p.dtype == dtype and not zero.any()
    # ground truth of the factors as given (rounded to dtype), so only the output rounding counts
    assert abs_cos(p, svd_top(a, b)) >= PROTOTYPE_LOW_PRECISION_MIN_COS
    pt, _ = torch_prototypes.exact_prototypes(a, b)
    torch.testing.assert_close(p.float(), pt.float(), **PROTOTYPE_BF16)


def test_non_contiguous_inputs(op):
    a, b = decaying(3, 4, 64, 50, seed=6, dtype=torch.float32)
    a_nc = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    b_nc = torch.cat([b, b], dim=1)[:, ::2]
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous()
    p, _ = op.arrow_prototypes(a_nc, b_nc)
    torch.testing.assert_close(p, op.arrow_prototypes(a, b_nc.contiguous())[0], **FP32_WEIGHTS)


def test_zero_and_rank_deficient_experts(op):
    a, b = decaying(4, 4, 50, 30, seed=7, dtype=torch.float32)
    a[1] = 0  # ΔW = 0 through A
    b[2] = 0  # ΔW = 0 through B
    a[3, 2:] = 0  # rank 2 padded to r = 4 (library zero-padding)
    b[3, :, 2:] = 0
    p, zero = op.arrow_prototypes(a, b)
    assert zero.tolist() == [False, True, True, False]
    assert torch.isfinite(p).all() and (p[1] == 0).all() and (p[2] == 0).all()
    assert abs_cos(p[[0, 3]], svd_top(a[[0, 3]], b[[0, 3]])) >= MIN_COS
    zt = torch_prototypes.exact_prototypes(a, b)[1]
    assert torch.equal(zero, zt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank8_conditioning_paths(op, dtype):
    # r = 8 whitens with a Cholesky factor of G_a when it is well-conditioned and falls back to G_a's eigen
    # decomposition (dropping null directions) otherwise: zero, rank-deficient, ill-conditioned and plain experts.
    a, b = decaying(6, 8, 300, 120, seed=11)
    a[1] = 0
    b[2] = 0
    a[3, 5:] = 0  # rank 5 padded to r = 8
    b[3, :, 5:] = 0
    a[4, 6] = a[4, 2] + 1e-9 * a[4, 6]  # full rank, cond(G_a) ~ 1e18: the eigen path, nothing dropped wrongly
    a[5] = a[5] * torch.tensor([1.0, 1e-3, 1.0, 1e-2, 1.0, 1e-3, 1.0, 1.0], dtype=torch.float64)[:, None]
    a, b = a.to(dtype), b.to(dtype)
    p, zero = op.arrow_prototypes(a, b)
    assert zero.tolist() == [False, True, True, False, False, False]
    keep = [0, 3, 4, 5]
    assert abs_cos(p[keep], svd_top(a[keep], b[keep])) >= MIN_COS
    pt, zt = torch_prototypes.exact_prototypes(a, b)
    assert torch.equal(zero, zt)


def test_tiny_but_nonzero_expert_is_not_zero(op):
    a, b = decaying(2, 4, 40, 30, seed=8, dtype=torch.float32)
    a[1] *= 1e-20
    p, zero = op.arrow_prototypes(a, b)
    assert not zero.any()
    assert abs_cos(p, svd_top(a, b)) >= MIN_COS


@pytest.mark.parametrize("r", [4, 8, 5])  # the AVX2 Gram kernels (r = 4, 8) and the generic one
def test_non_finite_raises_naming_the_factor(op, r):
    """NaN / Inf are found in the extension's own pass; the op names the factor, the Python entry raises ValueError."""
    from genknowsub_fast import ops

    cases = (("a", r"A \(pair 0\) contains"), ("b", r"B \(pair 0\) contains"), ("ab", r"A and B \(pair 0\) contain"))
    for bad, name in cases:
        a, b = decaying(2, r, 20, 10, seed=9, dtype=torch.float32)
        if "a" in bad:
            a[1, 0, 3] = float("nan")
        if "b" in bad:
            b[0, 4, 0] = float("inf")
        with pytest.raises(RuntimeError, match=f"{name} NaN or Inf"):
            op.arrow_prototypes(a, b)
        with pytest.raises(ValueError, match=f"^{name} NaN or Inf"):
            ops.arrow_prototypes(a, b)
    a, b = decaying(2, r, 20, 10, seed=9, dtype=torch.float32)
    b[1, 2, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"^B \(pair 1\) contains NaN or Inf"):
        prototype_ext.exact_prototypes_batched([a[:1], a], [b[:1], b])


def test_batched_is_one_call_for_mixed_shapes(op):
    shapes = [(3, 4, 33, 20), (5, 8, 17, 41), (1, 1, 64, 9), (2, 16, 30, 30)]
    cases = [decaying(*s, seed=i) for i, s in enumerate(shapes)]
    a_list = [c[0].float() for c in cases]
    b_list = [c[1].float() for c in cases]
    protos, zeros = op.arrow_prototypes_batched(a_list, b_list)
    assert len(protos) == len(zeros) == len(shapes)
    for p, z, (a, b) in zip(protos, zeros, cases):
        assert p.shape == (a.shape[0], a.shape[2]) and z.shape == (a.shape[0],) and z.dtype == torch.bool
        assert abs_cos(p, svd_top(a, b)) >= MIN_COS
        torch.testing.assert_close(p, op.arrow_prototypes(a.float(), b.float())[0])


def test_exact_prototypes_batched_both_paths(op):
    cases = [decaying(3, 4, 40, 30, seed=1), decaying(2, 8, 25, 50, seed=2)]
    a_list = [c[0].float() for c in cases]
    b_list = [c[1].float() for c in cases]
    p_ext, z_ext = prototype_ext.exact_prototypes_batched(a_list, b_list, use_extension=True)
    p_t, z_t = prototype_ext.exact_prototypes_batched(a_list, b_list, use_extension=False)
    for pe, pt, ze, zt in zip(p_ext, p_t, z_ext, z_t):
        torch.testing.assert_close(pe, pt, **PROTOTYPE_FP32)
        assert torch.equal(ze, zt)
    assert prototype_ext.exact_prototypes_batched([], []) == ([], [])
    with pytest.raises(ValueError, match="expected A"):
        prototype_ext.exact_prototypes_batched([a_list[0]], [b_list[1]])


def test_progress_chunks_give_the_same_result(op, monkeypatch):
    cases = [decaying(2, 4, 30 + i, 20, seed=i) for i in range(5)]
    a_list = [c[0].float() for c in cases]
    b_list = [c[1].float() for c in cases]
    whole = prototype_ext.exact_prototypes_batched(a_list, b_list)
    monkeypatch.setattr(prototype_ext, "PROGRESS_CHUNK_ELEMENTS", 500)
    chunked = prototype_ext.exact_prototypes_batched(a_list, b_list, progress=True)
    for p, q in zip(whole[0], chunked[0]):
        assert torch.equal(p, q)


def test_ops_and_library_use_it(op):
    from genknowsub_fast import ops

    a, b = decaying(3, 4, 40, 30, seed=11, dtype=torch.float32)
    p = ops.arrow_prototypes(a, b, method="exact")
    torch.testing.assert_close(p, op.arrow_prototypes(a, b)[0])


def test_fake_impl_traces(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(3, 4, 40)
        b = torch.empty(3, 30, 4)
        p, z = op.arrow_prototypes(a, b)
        (pb,), (zb,) = op.arrow_prototypes_batched([a], [b])
    assert p.shape == pb.shape == (3, 40) and z.shape == zb.shape == (3,) and z.dtype == torch.bool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("r", [1, 4, 16, 64])
def test_cuda_matches_svd_and_cpu(op, r):
    if not extension.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA")
    shapes = [(3, r, 211, 150), (1, r, 1001, 77), (10, r, 64, 300)]
    cases = [decaying(*s, seed=r + i) for i, s in enumerate(shapes)]
    a_list = [c[0].float().cuda() for c in cases]
    b_list = [c[1].float().cuda() for c in cases]
    a_list[0][1] = 0  # a zero expert
    protos, zeros = op.arrow_prototypes_batched(a_list, b_list)
    torch.cuda.synchronize()
    for i, (p, z, a, b) in enumerate(zip(protos, zeros, a_list, b_list)):
        pc, zc = op.arrow_prototypes(a.cpu(), b.cpu())
        assert torch.equal(z.cpu(), zc)
        keep = ~zc
        assert (p.cpu()[~keep] == 0).all()
        if keep.any():
            assert abs_cos(p.cpu()[keep], svd_top(a.cpu()[keep], b.cpu()[keep])) >= MIN_COS, i
            torch.testing.assert_close(p.cpu(), pc, **PROTOTYPE_FP32)
    ph, _ = op.arrow_prototypes(a_list[2].half(), b_list[2].half())
    assert ph.dtype == torch.float16 and ph.is_cuda
