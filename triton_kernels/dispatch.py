"""Dispatch table: (T, E, r, k, dtype, device capability) → which kernels run, with which block sizes.

Pure Python (no Triton import), so the table can be read and tested anywhere.

Where the numbers come from. No GPU was available while this table was written, so no threshold below rests on a GPU
timing. Each one is derived from operation counts or hardware limits, stated next to it; the crossovers between
regimes are the places to calibrate with ``benchmarks/test_bench_triton.py`` on a GPU.

Regimes (one per stage; the shrink and the expand choose independently but by the same rules):

- ``dense``  — every expert's shrink/expand, masked to the selected ones. Costs E·r rows against d_in (shrink) and
  against d_out (expand) per call, independent of k, with no gather and no sort.
  Chosen while ``E·r <= DENSE_MAX_ER`` (64): that is at most 64 / 3072 = 2.1 % extra work per side on the narrowest
  Phi-3-mini projection (d_in or d_out 3072), inside the 5 % budget of DESIGN.md. E=10 r=4 (40) is dense;
  E=64 r=8 (512: 17 % per side) is not.
- ``gather`` — per token, only its k·r selected rows of A and Bᵀ. Costs T·k·r rows per side with no reuse across
  tokens, against E·r rows (each read once) for dense/grouped: cheaper while ``T·k <= E``. Decode.
- ``grouped`` — routing alone in the first pass, then the (token, slot) pairs sorted by expert and padded to blocks
  of BLOCK_M (vLLM's fused-MoE alignment, done with torch ops on the device), a grouped shrink GEMM and a grouped
  expand GEMM that adds into y with atomics (a token's k slots land in k different expert blocks). Prefill with large
  E·r. Cost per side: T·k·max(r, 16) rows (tl.dot needs 16) plus padding, plus k atomic read-modify-writes of y.

Split-K of the route pass: with n = cdiv(T, BLOCK_T) token blocks and fewer than the device's SMs, the pass over
``[P ; A]`` (or P alone) would be read by only n SMs; it is split over d_in into
``min(cdiv(SMs, n), cdiv(d_in, MIN_K_PER_SPLIT))`` parts whose float32 partials a second small kernel adds up.
MIN_K_PER_SPLIT = 4·BLOCK_K so each split runs at least 4 K-iterations, enough to fill a 3-stage software pipeline.
Without a device (the interpreter) the SM count is unknown and split_k is 1 unless a test forces it.

Block sizes:
- accumulators are float32 in registers; with 4 warps (128 threads) a tile of BLOCK_T × NW stays at or below
  ``ACC_ELEMS_MAX`` = 8192 elements = 64 registers per thread, half the 128-register budget that keeps 4 warps
  resident twice per SM, leaving the other half for operands and addresses. The AOT test checks that no
  configuration of this table spills (``ptxas -v``), for sm_80 and sm_90;
- BLOCK_K = 64 for 16-bit inputs: 128 bytes per row per stage, one cache line and the widest shared-memory swizzle.
  float32 (exact FMA dots, no TF32) gets BLOCK_K = 16 and half the accumulator budget: see FP32_ACC_ELEMS_MAX;
- num_stages = 3 when three stages of the operand tiles fit in shared memory (99 KiB on sm_86/89, 163 KiB on sm_80,
  227 KiB on sm_90: the per-block opt-in limits from the CUDA programming guide), else 2;
- BLOCK_N = 64 in the gathered expand: 64 bf16 = 128 bytes, one cache line per gathered Bᵀ row segment.
Capability matters here only through the shared-memory limit: nothing else in the table differs between sm_80 and
sm_90 because nothing was measured that would justify a difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODE_DENSE = 0
MODE_GATHER = 1
MODE_ROUTE = 2  # routing only; the shrink is the grouped kernel's job

DENSE_MAX_ER = 64
ACC_ELEMS_MAX = 8192
NUM_WARPS = 4
GATHER_BLOCK_N = 64
GROUPED_BLOCK_N = 128
DENSE_BLOCK_N = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 64}
# float32 runs tl.dot with input_precision="ieee" (exact, no TF32) on the FMA units, whose lowering also keeps operand
# fragments in registers. ptxas -v on this table (sm_80, sm_90): with the 16-bit budget (8192) and BLOCK_K = 32 five
# float32 configurations spilled 8-288 bytes; with 4096 and BLOCK_K = 16 one still spilled 12 bytes (the fused dense
# epilogue at BLOCK_T = 32, sm_90); with 2048 and BLOCK_K = 16 none does.
FP32_ACC_ELEMS_MAX = 2048
MIN_DOT = 16  # smallest tl.dot block dimension that compiles for NVIDIA GPUs

# Max dynamic shared memory per block (bytes), by compute capability; the default covers sm_86/sm_89/sm_12x.
_SMEM_LIMIT = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024}
_SMEM_DEFAULT = 99 * 1024


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def smem_limit(capability: tuple[int, int] | None) -> int:
    """Shared memory a block may use on ``capability`` (the largest limit when unknown: the interpreter has none)."""
    if capability is None:
        return max(_SMEM_LIMIT.values())
    return _SMEM_LIMIT.get(tuple(capability), _SMEM_DEFAULT)


@dataclass(frozen=True)
class RoutePlan:
    """Configuration of the route + shrink pass (``route_shrink.py``)."""

    mode: int  # MODE_DENSE, MODE_GATHER or MODE_ROUTE
    block_t: int
    block_k: int
    block_e: int  # logits block: next_pow2(E), at least 16 (tl.dot N)
    block_ea: int  # experts in the dense shrink block: next_pow2(E), with block_ea·block_r >= 16
    block_r: int
    block_kk: int
    gather_block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GroupedPlan:
    """Configuration of the grouped (sorted by expert) shrink and expand (``grouped.py``)."""

    block_m: int
    block_k: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int
    fp32_accumulate: bool  # atomics into a float32 buffer, then one y += buffer (see choose_plan)


@dataclass(frozen=True)
class ExpandPlan:
    """Configuration of the expand: kind "dense", "gather" or "grouped" (then ``grouped`` holds its blocks)."""

    kind: str
    block_t: int
    block_n: int
    block_ea: int
    block_r: int
    block_kk: int
    block_kc: int  # dense: K chunk of the E·r columns
    num_warps: int
    num_stages: int
    grouped: GroupedPlan | None = None


@dataclass(frozen=True)
class Plan:
    """Everything one routed linear call launches."""

    route: RoutePlan
    expand: ExpandPlan


def _elt_size(dtype: torch.dtype) -> int:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return torch.empty((), dtype=dtype).element_size()


def _block_k(dtype: torch.dtype) -> int:
    # 128 bytes per row for 16-bit types; float32 takes 16 (64 bytes): see FP32_ACC_ELEMS_MAX.
    return 16 if dtype == torch.float32 else 64


def _acc_max(dtype: torch.dtype) -> int:
    return FP32_ACC_ELEMS_MAX if dtype == torch.float32 else ACC_ELEMS_MAX


def _stages(stage_bytes: int, capability: tuple[int, int] | None) -> int:
    return 3 if 3 * stage_bytes <= smem_limit(capability) else 2


def _block_rows(num_tokens: int, width: int, acc_max: int) -> int:
    """Largest token block in {16, 32, 64} with BLOCK·width <= acc_max, and no larger than T needs."""
    b = MIN_DOT
    while b < 64 and b < num_tokens and 2 * b * width <= acc_max:
        b *= 2
    return b


def shrink_regime(num_tokens: int, num_experts: int, rank: int, top_k: int) -> str:
    """ "dense", "gather" or "grouped" for a call (same rule for shrink and expand; see the module docstring)."""
    if num_experts * rank <= DENSE_MAX_ER:
        return "dense"
    if num_tokens * top_k <= num_experts:
        return "gather"
    return "grouped"


def choose_plan(
    num_tokens: int,
    num_experts: int,
    rank: int,
    top_k: int,
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    num_sms: int | None,
    regime: str | None = None,
    split_k: int | None = None,
) -> Plan:
    """The plan for one call. ``regime`` and ``split_k`` override the table (tests use them to reach every path).

    ``capability`` and ``num_sms`` are None when no GPU runs the kernels (the interpreter).
    """
    for name, v in (("num_experts", num_experts), ("rank", rank), ("top_k", top_k), ("d_in", d_in), ("d_out", d_out)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
    regime = regime or shrink_regime(num_tokens, num_experts, rank, top_k)
    if regime not in ("dense", "gather", "grouped"):
        raise ValueError(f"unknown regime {regime!r}; expected 'dense', 'gather' or 'grouped'")
    elt = _elt_size(dtype)
    acc_max = _acc_max(dtype)
    block_e = max(MIN_DOT, next_pow2(num_experts))
    block_r = next_pow2(rank)
    block_ea = max(next_pow2(num_experts), -(-MIN_DOT // block_r))
    block_kk = next_pow2(top_k)
    block_k = _block_k(dtype)

    mode = {"dense": MODE_DENSE, "gather": MODE_GATHER, "grouped": MODE_ROUTE}[regime]
    nw = block_e + (block_ea * block_r if mode == MODE_DENSE else 0)
    # In mode DENSE the epilogue's masked pick of the selected experts holds a second (BLOCK_T, E·r) tile next to the
    # accumulator, so the A part counts twice (at BLOCK_T = 64 this config spilled 16-96 bytes on sm_80/sm_90).
    block_t = _block_rows(num_tokens, nw + (nw - block_e), acc_max)
    # Gathered shrink: a (BLOCK_T, BLOCK_KK·BLOCK_R, GATHER_BLOCK_K) float32 product tile, kept at ACC_ELEMS_MAX
    # (it is a multiply-add, not a tl.dot, so GATHER_BLOCK_K may go below 16 when k·r is large). float32 operands
    # take half: at E=10 r=8 k=3 (a library of 10 rank-8 adapters) the split-K epilogue kernel spilled 4 bytes on
    # sm_90 with the full tile (ptxas -v, aot.py --extra).
    gather_elems = ACC_ELEMS_MAX // 2 if dtype == torch.float32 else ACC_ELEMS_MAX
    gather_block_k = max(1, min(128, gather_elems // (block_t * block_kk * block_r)))
    n_tblocks = max(1, -(-num_tokens // block_t))
    if split_k is None:
        split_k = 1
        if num_sms is not None and n_tblocks < num_sms:
            split_k = max(1, min(-(-num_sms // n_tblocks), -(-d_in // (4 * block_k))))
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    route = RoutePlan(
        mode=mode,
        block_t=block_t,
        block_k=block_k,
        block_e=block_e,
        block_ea=block_ea,
        block_r=block_r,
        block_kk=block_kk,
        gather_block_k=gather_block_k,
        split_k=split_k,
        num_warps=NUM_WARPS,
        num_stages=_stages((block_t + nw) * block_k * elt, capability),
    )

    if regime == "dense":
        # tl.dot over K = E·BLOCK_R in chunks of BLOCK_KC columns (128 bytes of a row, as BLOCK_K).
        block_kc = min(block_ea * block_r, block_k)
        block_n = DENSE_BLOCK_N[dtype]
        bt = _block_rows(num_tokens, block_n, acc_max)
        # No software pipelining: with E·r <= DENSE_MAX_ER the K loop runs 1-4 times, and 3 stages of (64 + 128) × 64
        # operand tiles spilled (ptxas -v, sm_80 and sm_90) for nothing to overlap.
        expand = ExpandPlan("dense", bt, block_n, block_ea, block_r, block_kk, block_kc, NUM_WARPS, 1)
    elif regime == "gather":
        # (BLOCK_T, BLOCK_KK·BLOCK_R, BLOCK_N) float32 product tile at ACC_ELEMS_MAX; no tl.dot, so BLOCK_T may be 1.
        # BLOCK_N narrows below GATHER_BLOCK_N only when k·r alone exceeds the budget (k·r > 128).
        bt = max(1, min(next_pow2(num_tokens), ACC_ELEMS_MAX // (block_kk * block_r * GATHER_BLOCK_N)))
        block_n = max(MIN_DOT, min(GATHER_BLOCK_N, ACC_ELEMS_MAX // (bt * block_kk * block_r)))
        expand = ExpandPlan("gather", bt, block_n, block_ea, block_r, block_kk, 0, NUM_WARPS, 1)
    else:
        # Block of (token, slot) pairs per expert: the largest of {16, 32, 64} not above the mean pairs per expert
        # T·k/E, which bounds the padding of the per-expert blocks to under one block per expert.
        mean_pairs = num_tokens * top_k / num_experts
        block_m = MIN_DOT
        while block_m < 64 and 2 * block_m <= mean_pairs:
            block_m *= 2
        gblock_r = max(MIN_DOT, block_r)
        block_n = min(GROUPED_BLOCK_N, acc_max // block_m)
        # bfloat16 atomic add exists in hardware from sm_90 (PTX atom/red .bf16); on sm_80 Triton emulates it with a
        # 32-bit compare-and-swap loop per element pair, and ptxas spilled 8-24 bytes in those loops. There the expand
        # adds into a float32 buffer (native float32 atomics) and y += buffer follows.
        fp32_acc = dtype == torch.bfloat16 and capability is not None and tuple(capability) < (9, 0)
        if fp32_acc:
            # float32 atomics are issued per element (bf16 ones per pair), each with its own 64-bit address: the
            # 64 × 128 tile spilled 40 bytes on sm_80; half of it does not.
            block_n = min(block_n, ACC_ELEMS_MAX // 2 // block_m)
        grouped = GroupedPlan(
            block_m=block_m,
            block_k=block_k,
            block_n=block_n,
            block_r=gblock_r,
            num_warps=NUM_WARPS,
            num_stages=_stages((block_m + gblock_r) * block_k * elt, capability),
            fp32_accumulate=fp32_acc,
        )
        expand = ExpandPlan("grouped", block_m, block_n, block_ea, block_r, block_kk, 0, NUM_WARPS, 1, grouped)
    return Plan(route=route, expand=expand)
