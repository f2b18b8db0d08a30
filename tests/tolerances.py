"""The one tolerance table of the test suite: every tolerance a test uses is named here, with what it is for.

Two kinds:

- the per-dtype rule for a fast path against the float64 reference (:func:`assert_close_to_reference`): our error is
  at most ``RATIO`` times the error of the same-dtype naive reference plus ``ATOL[dtype]`` (scaled by the magnitude of
  the reference output);
- named tolerances for comparisons that are not "fast path vs reference" (two float32 implementations of the same
  sum, float64 algebra, prototype alignment, parity with PEFT).

Never raise one of these to make a test pass: find the error.
"""

from __future__ import annotations

import torch

RATIO = 2.0
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Two float32 computations of the same quantity that differ only in summation order or fusion (e.g. the compiled
# kernel against the torch regimes, a layer against the functional op): a few ulps of values of order 1-10.
FP32_SAME_MATH = {"rtol": 1e-5, "atol": 1e-5}
# Zero-shot scores (token NLLs of O(1-10) and their sums/means) computed twice in float32 by the same model with a
# different summation (HF's mean loss against our sum / count; the CLI against score_choices in process).
FP32_SCORES_SAME_MATH = FP32_SAME_MATH
# Routing weights (softmax outputs in [0, 1]) of two float32 implementations.
FP32_WEIGHTS = {"rtol": 0.0, "atol": 1e-6}
# Routing weights computed from float32 scores when the inputs are bf16/fp16: the scores are the same float32 sums, so
# the same bound as float32 holds.
LOW_PRECISION_WEIGHTS = FP32_WEIGHTS
# float32 scores x·p against the float64 product for bf16/fp16 x (exact in float32): float32 accumulation error of a
# ~300-term dot product of O(1) values.
FP32_SCORES = {"rtol": 1e-5, "atol": 1e-4}
# float64 algebra done two ways (QR/SVD vs direct products): rounding of float64 at O(1) values.
FLOAT64_ALGEBRA = {"rtol": 1e-9, "atol": 1e-10}
FLOAT64_EXACT = 1e-12
# float32 rounding of a float64 product B·A of O(1) factors with r <= 16 terms.
FP32_PRODUCT = {"rtol": 1e-5, "atol": 1e-6}
# An exact prototype (float32 or float64 inputs) against the float64 SVD's top right singular vector: |cos| at least.
PROTOTYPE_MIN_COS = 0.99999
# An exact prototype stored in bf16/fp16 (8 or 11 mantissa bits), and PEFT's 15-step power iteration on a spectrum
# decaying by 0.5 per singular value (converges to (0.5)^30 in the eigenvalue ratio), against the float64 SVD.
PROTOTYPE_LOW_PRECISION_MIN_COS = 0.999
PROTOTYPE_POWER_CONVERGED_MIN_COS = 0.999
# Two float32 computations of the same unit prototype (extension vs torch.linalg, float32 vs float64 inputs).
PROTOTYPE_FP32 = {"rtol": 0.0, "atol": 2e-5}
# The same for bf16 factors (the prototypes are stored in bf16: 8 mantissa bits).
PROTOTYPE_BF16 = {"rtol": 0.0, "atol": 1e-2}
# The same bf16/fp16 layer output computed twice where float32 contributions reach y in another order (the grouped
# expand's atomics; a CUDA-graph replay or a torch.compile'd call against an eager one): a few ulps of the 16-bit
# output (a bf16 ulp is 2^-8 relative).
LOW_PRECISION_ADD_ORDER = {"rtol": 2e-2, "atol": 2e-2}


def packed_b(dtype: torch.dtype) -> dict:
    """B recovered from packed experts (``b_t / s``, where ``s·Bᵀ`` was rounded to the library's dtype once and the
    quotient is rounded once more) against the B it was packed from: two roundings of at most eps/2 each, relative,
    with a factor of two for the float32 product and quotient in between."""
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 0.0}


# Patched-model logits of the Triton and the torch backend in float32 (different summation orders through 2-4
# layers), relative to the logits' largest magnitude.
FP32_BACKEND_LOGITS_REL = 1e-4
# Patched model logits against PEFT's Arrow model in float32, relative to the adapters' effect (max |PEFT - base|).
LOGITS_VS_PEFT_REL = 1e-4
# The adapters must move the logits at least this much for a parity test to mean anything.
MIN_ADAPTER_EFFECT = 1e-2
# Prompt log-probs of a model served by vLLM against the same model patched with patch_model in transformers, both
# float32: the two engines use different GEMM and attention kernels, so they round differently. Measured at most
# 4.5e-7 (tiny Phi-3 and Phi-2, routed, eager and compiled, 1 and 2 tensor-parallel ranks).
FP32_ENGINE_LOGPROB_ATOL = 5e-6
# The convergence warning prints min |cos| with 4 decimals: the printed value is within this of the measured one.
PROTOTYPE_COS_REPORTED = 1e-4
# Not a tolerance but the size of an effect: on adapters whose σ2/σ1 >= 0.95, exact prototypes move a patched model's
# logits by more than this fraction of the adapters' effect (||y_exact - y_PEFT|| / ||y_PEFT - y_base||; 0.77 and 0.79
# measured on the synthetic adapters with σ2/σ1 = 0.97 and 0.99, see the README's prototype section).
NONCONVERGED_MIN_EFFECT_GAP = 0.3


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if a.numel() == 0:
        return 0.0
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def assert_close_to_reference(
    ours: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """Assert ``|ours - ref64| <= RATIO * |ref_same_dtype - ref64| + ATOL[dtype] * max(1, |ref64|_inf)``."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    scale = max(1.0, float(ref64.detach().abs().max())) if ref64.numel() else 1.0
    ours_err = max_err(ours, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    bound = RATIO * ref_err + ATOL[dtype] * scale
    assert ours_err <= bound, f"{what}: error {ours_err:.3e} > bound {bound:.3e} (same-dtype reference {ref_err:.3e})"


def assert_matches_peft(ours: torch.Tensor, peft: torch.Tensor, base: torch.Tensor, what: str = "") -> None:
    """Patched logits equal PEFT's within LOGITS_VS_PEFT_REL of the adapters' effect, which must be visible."""
    effect = max_err(peft, base)
    assert effect > MIN_ADAPTER_EFFECT, f"{what}: the adapters barely move the logits ({effect:.2e})"
    err = max_err(ours, peft)
    assert err <= LOGITS_VS_PEFT_REL * effect, f"{what}: |ours - PEFT| {err:.3e} > {LOGITS_VS_PEFT_REL} × {effect:.3e}"
