"""The compiled CPU op (csrc/routed_lora_cpu.cpp) against reference.py in float64, every dtype and every ISA path.

The float64 reference gets exactly the op's inputs (x, A and s·Bᵀ rounded to the dtype, float32 prototypes), so the
difference is the op's own arithmetic. The same-dtype reference models an honest computation in that dtype under the
routing rules every backend follows: scores in float32 from float32 prototypes (x converted exactly), then every
product and sum of the delta in the dtype (reference.expand_with_routing).
"""

import pytest
import torch

from genknowsub_fast import reference
from genknowsub_fast.backends import cpu_kernel
from genknowsub_fast.backends.packing import padded_rows
from tests.extension_required import require_op
from tests.routing_cases import make_case
from tests.tolerances import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    require_op("routed_lora_delta_")


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one instruction-set path of the kernels for the test (skipped where this CPU cannot run it), then
    restores the process's ISA (the best one, or the one GENKNOWSUB_FAST_CPU_ISA forced for the whole run)."""
    before = cpu_kernel.isa()
    try:
        cpu_kernel.isa(request.param)
    except ValueError as exc:
        pytest.skip(str(exc))
    yield request.param
    cpu_kernel.isa(before)


def op_inputs(case, dtype):
    """(x, prototypes, a, b_t) as the op takes them: model dtype, float32 prototypes, scaling folded in, padded rows."""
    b_t = (case.b.transpose(1, 2) * case.scaling.view(-1, 1, 1)).to(dtype)
    return case.x.to(dtype), case.prototypes.float(), case.a.to(dtype).contiguous(), padded_rows(b_t.contiguous())


def run_op(x, protos, a, b_t, k, temp, mixing="output", y=None, scores=None):
    y = torch.zeros(x.shape[0], b_t.shape[2], dtype=x.dtype) if y is None else y
    torch.ops.genknowsub_fast_C.routed_lora_delta_(y, x, protos, a, b_t, k, float(temp), mixing == "weights", scores)
    return y


def references(x, protos, a, b_t, k, temp, mixing="output", y0=None, routing=None):
    """(float64 reference, same-dtype reference) of y0 + delta for the op's exact inputs.

    Computed routing: the float64 reference routes on float64 scores, the same-dtype one on float32 scores (one GEMM);
    the cases have a clear top-k margin, so both choose the same experts and only the softmax weights differ by the
    scores' float32 rounding (large logits make that visible: E = 256 has logits up to 77).
    """
    b = b_t.transpose(1, 2).contiguous()
    ones = torch.ones(a.shape[0], dtype=torch.float64)
    if routing is not None:
        w, idx = routing
        w64 = w
    else:
        w64, idx = reference.route(x.double(), protos.double(), k, temp)
        w, idx32 = reference.route(x.float(), protos.float(), k, temp)
        assert torch.equal(idx, idx32), "the case's top-k margin must be clear in float32"
    d64 = reference.expand_with_routing(x.double(), a.double(), b.double(), ones, w64.double(), idx, mixing)
    dlo = reference.expand_with_routing(x, a, b, ones.to(x.dtype), w, idx, mixing)
    if y0 is None:
        return d64, dlo
    return y0.double() + d64, y0 + dlo


def check(case, dtype, k, temp, mixing="output", what=""):
    x, protos, a, b_t = op_inputs(case, dtype)
    ours = run_op(x, protos, a, b_t, k, temp, mixing)
    ref64, ref_lo = references(x, protos, a, b_t, k, temp, mixing)
    assert_close_to_reference(ours, ref64, ref_lo, dtype, what)


SHAPES = [  # (T, E, r, d_in, d_out, k, temperature, mixing), each for a schedule or an edge of the kernels
    (1, 4, 3, 19, 23, 2, 1.0, "output"),  # decode: (token, slot) pairs split over threads; d not a multiple of 8
    (1, 4, 3, 19, 23, 2, 1.0, "weights"),
    (3, 5, 1, 33, 17, 5, 0.3, "output"),  # r = 1, k = E
    (7, 1, 4, 21, 10, 1, 1.0, "output"),  # E = 1
    (9, 40, 5, 70, 45, 3, 4.0, "output"),  # E > 32, few tokens: scores in their own pass over tokens × experts
    (40, 6, 8, 70, 45, 3, 1.0, "output"),  # per-token pass, scores inside it
    (40, 6, 8, 70, 45, 3, 1.0, "weights"),
    (40, 48, 4, 77, 96, 3, 1.0, "output"),  # scores as one float32 GEMM (T >= 32, E > 32)
    (70, 12, 4, 37, 130, 3, 0.5, "output"),  # d_out spans several 64-column tiles, T several 32-token blocks
    (40, 40, 16, 500, 33, 3, 1.0, "output"),  # A over 1 MB and T·k >= 2E: shrink grouped by expert
    (40, 40, 16, 500, 33, 3, 1.0, "weights"),
    (20, 36, 4, 2100, 70, 3, 1.0, "output"),  # d_in over 2048, E > 32: register-tiled scores over a long d_in
    (2, 40, 4, 1100, 200, 3, 1.0, "output"),  # decode, E > 32: prototype rows and chosen rows prefetched ahead
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-r{}-{}x{}-k{}-{}".format(*s[:6], s[7]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(isa, dtype, shape):
    t, e, r, d_in, d_out, k, temp, mixing = shape
    case = make_case(t, e, r, d_in, d_out, seed=sum(shape[:6]), shared_scaling=mixing == "weights")
    check(case, dtype, k, temp, mixing, f"{isa} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 40, 200])
def test_large_library(isa, dtype, t):
    """E = 256 (the Arrow paper's library): decode, per-token and grouped-by-expert shrinks, scores as a GEMM."""
    case = make_case(t, 256, 8, 264, 100, seed=t)
    check(case, dtype, 3, 1.0, "output", f"E=256 T={t} {isa} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [33, 50])
def test_large_b(isa, dtype, t):
    """Bᵀ over 4 MB: the expand walks all tokens per tile (T·k < 2E), or runs grouped by expert (T·k >= 2E)."""
    case = make_case(t, 64, 16, 64, 2100, seed=11)  # 64·16·2100 elements: 8.6 MB in float32, 4.3 MB in 16 bits
    check(case, dtype, 3, 1.0, "output", f"large B T={t} {isa} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ranks_zero_padding(isa, dtype):
    case = make_case(12, 5, 4, 29, 31, seed=7, mixed_ranks=True)
    check(case, dtype, 3, 1.0, "output", f"mixed ranks {isa} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adds_to_y_with_one_rounding(isa, dtype):
    case = make_case(33, 6, 4, 24, 40, seed=5)
    x, protos, a, b_t = op_inputs(case, dtype)
    y0 = torch.randn(33, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = run_op(x, protos, a, b_t, 3, 1.0, y=y0.clone())
    ref64, ref_lo = references(x, protos, a, b_t, 3, 1.0, y0=y0)
    assert_close_to_reference(ours, ref64, ref_lo, dtype, f"y + delta {isa} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [3, 40])
def test_given_scores_replace_the_routing(isa, dtype, t):
    """Signed scores from the caller: the op routes on |scores|, whatever x·p would give."""
    case = make_case(t, 40, 4, 64, 48, seed=t)
    x, protos, a, b_t = op_inputs(case, dtype)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(t, 40, generator=g) * torch.linspace(1, 3, 40)[torch.randperm(40, generator=g)]
    ours = run_op(x, protos, a, b_t, 3, 0.7, scores=scores)
    routing = reference.route(scores, torch.eye(40), 3, 0.7)  # top-k of |scores|
    ref64, ref_lo = references(x, protos, a, b_t, 3, 0.7, routing=routing)
    assert_close_to_reference(ours, ref64, ref_lo, dtype, f"given scores {isa} {dtype}")
    # scores equal to x·p route as the op does itself
    exact = (x.double() @ protos.double().T).float()
    ref64, ref_lo = references(x, protos, a, b_t, 3, 0.7)
    assert_close_to_reference(run_op(x, protos, a, b_t, 3, 0.7, scores=exact), ref64, ref_lo, dtype, "x·p given")


@pytest.mark.parametrize("t", [3, 40])
def test_ties_go_to_the_lower_index(isa, t):
    """Equal |score|: the lower expert index wins, for computed scores (both score paths) and for given ones."""
    e = 40
    case = make_case(t, e, 2, 64, 8, seed=3)
    case.prototypes[:] *= 1e-3
    case.prototypes[7] = case.prototypes[21] = torch.nn.functional.normalize(torch.ones(64, dtype=torch.float64), dim=0)
    x, protos, a, b_t = op_inputs(case, torch.float32)
    x = x.abs() + 0.1  # every token scores high, and equally, on experts 7 and 21

    def only(expert):
        return references(x, protos, a, b_t, 1, 1.0, routing=(torch.ones(t, 1), torch.full((t, 1), expert)))

    assert_close_to_reference(run_op(x, protos, a, b_t, 1, 1.0), *only(7), torch.float32, "tie 7 / 21")
    scores = torch.zeros(t, e)
    scores[:, 30], scores[:, 12] = -2.0, 2.0  # opposite signs, equal magnitude
    got = run_op(x, protos, a, b_t, 1, 1.0, scores=scores)
    assert_close_to_reference(got, *only(12), torch.float32, "tie 12 / 30 in given scores")


def test_no_tokens_leaves_y_alone():
    case = make_case(0, 4, 2, 16, 8, seed=0)
    x, protos, a, b_t = op_inputs(case, torch.bfloat16)
    y = torch.empty(0, 8, dtype=torch.bfloat16)
    assert run_op(x, protos, a, b_t, 2, 1.0, y=y).shape == (0, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_leading_shape_is_rows_of_tokens(dtype):
    """x (..., d_in) and y (..., d_out) with the same leading shape: the same sums as the (T, d) call, row for row."""
    case = make_case(12, 5, 3, 20, 10, seed=6)
    x, protos, a, b_t = op_inputs(case, dtype)
    flat = run_op(x, protos, a, b_t, 3, 0.8)
    y = torch.zeros(2, 3, 2, 10, dtype=dtype)
    torch.ops.genknowsub_fast_C.routed_lora_delta_(y, x.view(2, 3, 2, 20), protos, a, b_t, 3, 0.8, False, None)
    assert torch.equal(y.view(12, 10), flat)
    one = torch.zeros(10, dtype=dtype)  # a single token as a 1-D vector: as the (1, d) call (the same schedule)
    torch.ops.genknowsub_fast_C.routed_lora_delta_(one, x[4], protos, a, b_t, 3, 0.8, False, None)
    assert torch.equal(one, run_op(x[4:5], protos, a, b_t, 3, 0.8)[0])
    scores = x.float() @ protos.T
    y = torch.zeros(3, 4, 10, dtype=dtype)
    torch.ops.genknowsub_fast_C.routed_lora_delta_(y, x.view(3, 4, 20), protos, a, b_t, 3, 0.8, False, scores)
    assert torch.equal(y.view(12, 10), run_op(x, protos, a, b_t, 3, 0.8, scores=scores))
    with pytest.raises(RuntimeError, match="do not match"):  # leading shapes (3, 4) and (4, 3)
        torch.ops.genknowsub_fast_C.routed_lora_delta_(
            torch.zeros(4, 3, 10, dtype=dtype), x.view(3, 4, 20), protos, a, b_t, 3, 0.8, False, None
        )
    with pytest.raises(RuntimeError, match="expected x"):  # y must have x's number of dimensions
        torch.ops.genknowsub_fast_C.routed_lora_delta_(
            torch.zeros(12, 10, dtype=dtype), x.view(3, 4, 20), protos, a, b_t, 3, 0.8, False, None
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(protos=lambda p: p.bfloat16()), "prototypes must be float32"),
        (dict(a=lambda a: a.double()), "must have x's dtype"),
        (dict(x=lambda x: x[:, :-1].contiguous()), "do not match"),
        (dict(k=lambda k: 5), "top_k must be in"),
        (dict(temp=lambda t: 0.0), "temperature"),
        (dict(scores=lambda s: torch.zeros(6, 3)), "scores must be"),
        (dict(b_t=lambda b: b.transpose(1, 2).contiguous().transpose(1, 2)), "unit-stride"),
    ],
)
def test_bad_arguments_raise(change, message):
    case = make_case(6, 4, 2, 16, 8, seed=0)
    x, protos, a, b_t = op_inputs(case, torch.float32)
    args = dict(x=x, protos=protos, a=a, b_t=b_t, k=2, temp=1.0, scores=None)
    for key, fn in change.items():
        args[key] = fn(args[key])
    y = torch.zeros(6, 8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.genknowsub_fast_C.routed_lora_delta_(
            y, args["x"], args["protos"], args["a"], args["b_t"], args["k"], args["temp"], False, args["scores"]
        )
