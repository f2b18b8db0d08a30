"""The references themselves: GKS algebra, prototypes, routing ties, and both mixing formulas."""

import torch

from genknowsub_fast import reference
from tests.tolerances import FLOAT64_ALGEBRA, FLOAT64_EXACT


def _factors(e, r, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, r, d_in, generator=g, dtype=torch.float64), torch.randn(
        e, d_out, r, generator=g, dtype=torch.float64
    )


def test_gks_param_subtracts_factor_means():
    a, b = _factors(3, 2, 5, 4)
    ga, gb = _factors(2, 2, 5, 4, seed=1)
    out = reference.gks_param([(a[i], b[i]) for i in range(3)], [(ga[i], gb[i]) for i in range(2)])
    for i, (ai, bi) in enumerate(out):
        torch.testing.assert_close(ai, a[i] - (ga[0] + ga[1]) / 2)
        torch.testing.assert_close(bi, b[i] - (gb[0] + gb[1]) / 2)


def test_gks_delta_is_exact_delta_subtraction_with_mixed_ranks():
    a1, b1 = _factors(1, 3, 6, 5)
    a2, b2 = _factors(1, 2, 6, 5, seed=2)
    g1a, g1b = _factors(1, 4, 6, 5, seed=3)
    g2a, g2b = _factors(1, 1, 6, 5, seed=4)
    task = [(a1[0], b1[0], 0.5), (a2[0], b2[0], 2.0)]
    general = [(g1a[0], g1b[0], 1.5), (g2a[0], g2b[0], 0.25)]
    out = reference.gks_delta(task, general)
    mean_g = (1.5 * g1b[0] @ g1a[0] + 0.25 * g2b[0] @ g2a[0]) / 2
    for (a, b, s), (a_new, b_new, s_new) in zip(task, out, strict=True):
        assert s_new == 1.0 and a_new.shape[0] == a.shape[0] + 5
        torch.testing.assert_close(b_new @ a_new, s * b @ a - mean_g)


def test_prototypes_svd_is_unit_top_singular_vector_and_zero_for_zero_delta():
    a, b = _factors(3, 4, 9, 7)
    b[1] = 0
    p = reference.prototypes_svd(a, b)
    assert torch.all(p[1] == 0)
    for e in (0, 2):
        dw = b[e] @ a[e]
        assert abs(float(p[e].norm()) - 1) < FLOAT64_EXACT
        # ‖ΔW p‖ equals the top singular value
        assert abs(float((dw @ p[e]).norm()) - float(torch.linalg.svdvals(dw)[0])) < FLOAT64_ALGEBRA["atol"]


def test_route_ties_go_to_the_lower_index_and_weights_softmax_over_k():
    protos = torch.eye(4, dtype=torch.float64)
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5]], dtype=torch.float64)  # |logits| = 1, 1, 1, 0.5
    w, idx = reference.route(x, protos, 2, 1.0)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    w, idx = reference.route(torch.tensor([[0.0, 2.0, 1.0, 0.0]], dtype=torch.float64), protos, 2, 0.5)
    expected = torch.softmax(torch.tensor([2.0, 1.0], dtype=torch.float64) / 0.5, 0)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(w[0], expected)


def test_output_mixing_matches_dense_sum_over_experts():
    a, b = _factors(4, 3, 6, 5)
    s = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64)
    p = reference.prototypes_svd(a, b)
    y = reference.routed_lora(x, a, b, s, p, 2, 0.8)
    w, idx = reference.route(x, p, 2, 0.8)
    coef = torch.zeros(7, 4, dtype=torch.float64).scatter_(1, idx, w)
    dense = torch.einsum("te,e,eor,erd,td->to", coef, s, b, a, x)
    torch.testing.assert_close(y, dense)


def test_weights_mixing_matches_modular_llm_per_token_merge():
    """The original code merges A and B per token with the routing weights, then applies s·B_mix·A_mix."""
    a, b = _factors(5, 3, 8, 6)
    s = torch.full((5,), 0.75, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    p = reference.prototypes_svd(a, b)
    w, idx = reference.route(x, p, 3, 1.0)
    y = reference.routed_lora(x, a, b, s, p, 3, 1.0, mixing="weights")
    for t in range(4):
        full_w = torch.zeros(5, dtype=torch.float64).index_put_((idx[t],), w[t])
        a_mix = torch.einsum("e,erd->rd", full_w, a)
        b_mix = torch.einsum("e,eor->or", full_w, b)
        torch.testing.assert_close(y[t], 0.75 * b_mix @ (a_mix @ x[t]))


def test_weight_and_bias_are_added():
    a, b = _factors(2, 2, 5, 3)
    s = torch.ones(2, dtype=torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    w0 = torch.randn(3, 5, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    p = reference.prototypes_svd(a, b)
    delta = reference.routed_lora(x, a, b, s, p, 1, 1.0)
    full = reference.routed_lora(x, a, b, s, p, 1, 1.0, weight=w0, bias=bias)
    assert full.shape == (2, 4, 3)
    torch.testing.assert_close(full, delta + x @ w0.T + bias)
