"""Dispatch table: (T, E, r, k, d_in, d_out, dtype, device) → which kernels run, with which block sizes.

Pure Python (no Triton import), so the table can be read and tested anywhere. :func:`choose_plan` is cached per
argument tuple, so a layer pays for it once per token count (``TritonLayer`` also keeps its own dict of plans).

No GPU was available while this table was written, so no threshold below rests on a GPU timing. Each one is derived
from operation counts or hardware limits, stated next to it; ``benchmarks/gpu_model.py`` turns the plans into
predicted times, and ``benchmarks/bench_gpu.py`` measures them (``bash benchmarks/gpu_check.sh``).

Regimes:

- ``decode`` (T <= DECODE_MAX_T): two kernels after the base GEMM. ``decode.py``'s shrink splits d_in over many CTAs
  (grid (k-splits, column blocks)) and writes float32 partial sums of ``x·P`` (routing, float32 prototypes) and of
  ``A x`` for every expert; the expand kernel loads all splits of each column it needs as one tile, sums them, runs
  top-k + softmax, and adds the selected experts' ``Bᵀ`` rows into y. Reading every expert's A costs
  E·r·d_in·2 bytes, spread over all SMs; selecting rows first would need one more dependent launch, and at T <= 16
  a launch costs more than those bytes (gpu_model.py).
- ``dense`` (E·r <= DENSE_MAX_ER): the route pass (``route_shrink.py``) computes the routing and every expert's
  shrink from one pass over x; the dense expand (``expand.py``) does one tl.dot of the masked (T, E·r) coefficient
  block against all of Bᵀ. Costs E·r columns per side, ≤ 64 / 3072 = 2.1 % of the narrowest Phi-3-mini projection.
- ``grouped`` (E·r > DENSE_MAX_ER, T > DECODE_MAX_T): routing alone in the route pass, then the (token, slot) pairs
  sorted by expert (``grouped.py``), a grouped shrink GEMM and a grouped expand GEMM with atomics into y.

Routing scores are float32 in every regime (x·p with p float32, x converted exactly): in the decode kernels
directly (FMA dot; the bytes of P are few), in the route pass against ``PIECES`` 16-bit pieces of P in the compute
dtype, so tensor-core dots with float32 accumulation give the float32 sum (``pieces.py``).

Block sizes:

- accumulators are float32 in registers; with 4 warps a tile of ACC_ELEMS_MAX = 8192 elements is 64 registers per
  thread, half the 128-register budget that keeps 4 warps resident twice per SM. ``tests/triton_kernels/test_aot.py``
  compiles every configuration of this table for sm_80 and sm_90 with the Triton the GPU image has and checks
  ``ptxas -v`` reports no spills;
- BLOCK_K = 64 for 16-bit inputs in the route pass (128 bytes per row and stage); float32 takes 16 (see
  FP32_ACC_ELEMS_MAX);
- num_stages = 3 when three stages of the operand tiles fit in shared memory (99 KiB on sm_86/89, 163 KiB on sm_80,
  227 KiB on sm_90: the per-block opt-in limits of the CUDA programming guide), else 2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MODE_DENSE = 0
MODE_ROUTE = 2  # routing only; the shrink is the grouped kernel's job

REGIMES = ("decode", "dense", "grouped")
DECODE_MAX_T = 16
DENSE_MAX_ER = 64
ACC_ELEMS_MAX = 8192
NUM_WARPS = 4
GROUPED_BLOCK_N = 128
# float32 runs tl.dot with input_precision="ieee" (exact, no TF32) on the FMA units, whose lowering keeps operand
# fragments in registers: ptxas -v on the earlier table (sm_80, sm_90) found spills with 4096-element float32
# accumulators and BLOCK_K = 16 in the fused dense epilogue; with 2048 none.
FP32_ACC_ELEMS_MAX = 2048
MIN_DOT = 16  # smallest tl.dot block dimension that compiles for NVIDIA GPUs
# K tile of the 16-bit route pass, and the block in which pieces.py interleaves the prototype pieces along K: 64
# 16-bit values are 128 bytes per row and stage.
PIECE_BLOCK_K = 64

# Decode shrink: column blocks of DECODE_BLOCK_C outputs (prototype or A rows), K tiles of DECODE_BLOCK_K. 32 bf16 are
# 64 bytes, two 32-byte sectors per row and step; a split covers at least one tile.
DECODE_BLOCK_C = 64
DECODE_BLOCK_K = 32
# Decode expand: every CTA re-reads the partial sums it needs (all splits of the scores and of its tokens' selected
# shrink columns). Their bytes per CTA are capped at WS_READ_MAX: at the 64 bytes per clock an SM reads from L2
# (gpu_model.py) 32 KiB take about 0.3 µs, under one dependent DRAM round trip. This bounds the split count at T = 16.
WS_READ_MAX = 32 * 1024
# Largest 3-D tile (splits × tokens × columns) the decode expand loads at once: at 4096 the expand with "weights"
# mixing spilled 8 bytes on sm_90 (T = 16, E = 64, r = 8).
DECODE_TILE_MAX = 2048
# Gathered expand: (BLOCK_T, BLOCK_R, BLOCK_N) float32 product tile per selected expert.
DECODE_BLOCK_N_MAX = 128

# Max dynamic shared memory per block (bytes), by compute capability; the default covers sm_86/sm_89/sm_12x.
_SMEM_LIMIT = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024}
_SMEM_DEFAULT = 99 * 1024


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 << max(0, int(n).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def smem_limit(capability: tuple[int, int] | None) -> int:
    """Shared memory a block may use on ``capability`` (the largest limit when unknown: the interpreter has none)."""
    if capability is None:
        return max(_SMEM_LIMIT.values())
    return _SMEM_LIMIT.get(tuple(capability), _SMEM_DEFAULT)


def pieces_for(dtype: torch.dtype) -> int:
    """How many compute-dtype pieces of the float32 prototypes the route pass dots against x (see pieces.py)."""
    return 1 if dtype == torch.float32 else 3


@dataclass(frozen=True)
class DecodePlan:
    """Split-K shrink + gathered expand (``decode.py``)."""

    k_splits: int
    k_per_split: int
    shrink_block_t: int  # token block of the shrink's tl.dot (>= 16)
    shrink_block_k: int
    block_c: int  # column block of the shrink
    n_p_blocks: int  # column blocks over the prototypes (0 when the caller passes the scores)
    n_a_blocks: int  # column blocks over the E·r rows of A
    block_t: int  # token block of the expand: next_pow2(T), at most DECODE_MAX_T
    block_n: int
    block_e: int
    block_r: int
    block_kk: int
    split_chunk: int  # splits loaded per tile in the expand
    num_warps: int

    @property
    def ws_cols(self) -> int:
        """Columns of one (split, token) row of the partial-sum workspace: prototype blocks, then A blocks."""
        return (self.n_p_blocks + self.n_a_blocks) * self.block_c

    def shrink_grid(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.k_splits, self.n_p_blocks + self.n_a_blocks, cdiv(num_tokens, self.shrink_block_t))

    def expand_grid(self, num_tokens: int, d_out: int) -> tuple[int, int]:
        return (cdiv(d_out, self.block_n), cdiv(num_tokens, self.block_t))


@dataclass(frozen=True)
class RoutePlan:
    """The route pass of the dense and grouped regimes (``route_shrink.py``)."""

    mode: int  # MODE_DENSE or MODE_ROUTE
    block_t: int
    block_k: int
    block_e: int  # logits block: next_pow2(E), at least 16 (tl.dot N)
    block_ea: int  # experts in the dense shrink block: next_pow2(E), with block_ea·block_r >= 16
    block_r: int
    block_kk: int
    pieces: int  # compute-dtype pieces of the prototypes (1 for float32)
    split_k: int
    split_chunk: int  # splits summed per tile by the finalising program
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DenseExpandPlan:
    """The dense expand (``expand.py``), optionally with the base GEMM in the same kernel (``fuse_base``)."""

    block_t: int
    block_n: int
    block_ea: int
    block_r: int
    block_kc: int  # K chunk of the E·r columns
    fuse_base: bool  # y = x Wᵀ + bias + delta in one kernel: y is written once, never read back
    block_kb: int  # K tile of the fused base GEMM
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
class Plan:
    """Everything one routed linear call launches; exactly one of the regime fields is set."""

    regime: str
    decode: DecodePlan | None = None
    route: RoutePlan | None = None
    expand: DenseExpandPlan | None = None
    grouped: GroupedPlan | None = None


def _elt_size(dtype: torch.dtype) -> int:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return torch.empty((), dtype=dtype).element_size()


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


def regime_for(num_tokens: int, num_experts: int, rank: int) -> str:
    """The table's regime for a call (see the module docstring)."""
    if num_tokens <= DECODE_MAX_T:
        return "decode"
    if num_experts * rank <= DENSE_MAX_ER:
        return "dense"
    return "grouped"


def decode_plan(
    num_tokens: int,
    num_experts: int,
    rank: int,
    top_k: int,
    d_in: int,
    has_scores: bool,
    num_sms: int | None,
    k_splits: int | None = None,
) -> DecodePlan:
    """Blocks and split count of the decode kernels. Without an SM count (the interpreter) one split, unless forced.

    Splits: enough CTAs for every SM (``cdiv(SMs, column blocks)`` splits), at most one per K tile, and at most what
    keeps each expand CTA's reads of the partial sums under WS_READ_MAX.
    """
    bc, bk = DECODE_BLOCK_C, DECODE_BLOCK_K
    n_p = 0 if has_scores else cdiv(num_experts, bc)
    n_a = cdiv(num_experts * rank, bc)
    block_t = min(next_pow2(num_tokens), DECODE_MAX_T)
    block_e = max(2, next_pow2(num_experts))
    block_r = next_pow2(rank)
    block_kk = next_pow2(top_k)
    per_split = block_t * ((0 if has_scores else block_e) + block_kk * block_r) * 4
    if k_splits is None:
        k_splits = 1
        if num_sms is not None:
            k_splits = max(1, min(cdiv(num_sms, n_p + n_a), cdiv(d_in, bk), WS_READ_MAX // per_split))
    if k_splits < 1:
        raise ValueError(f"split count must be >= 1, got {k_splits}")
    # K range per split: a multiple of the K tile; rounding up may leave fewer non-empty splits, and only those run.
    k_per_split = cdiv(cdiv(d_in, k_splits), bk) * bk
    k_splits = cdiv(d_in, k_per_split)
    width = max(0 if has_scores else block_e, block_kk * block_r)
    split_chunk = max(1, min(next_pow2(k_splits), _pow2_floor(DECODE_TILE_MAX // (block_t * width))))
    block_n = max(MIN_DOT, min(DECODE_BLOCK_N_MAX, ACC_ELEMS_MAX // (block_t * block_r)))
    return DecodePlan(
        k_splits=k_splits,
        k_per_split=k_per_split,
        shrink_block_t=MIN_DOT,
        shrink_block_k=bk,
        block_c=bc,
        n_p_blocks=n_p,
        n_a_blocks=n_a,
        block_t=block_t,
        block_n=block_n,
        block_e=block_e,
        block_r=block_r,
        block_kk=block_kk,
        split_chunk=split_chunk,
        num_warps=NUM_WARPS,
    )


@functools.lru_cache(maxsize=4096)
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
    has_scores: bool = False,
    regime: str | None = None,
    split: int | None = None,
    fuse_base: bool | None = None,
) -> Plan:
    """The plan for one call (cached). ``regime``, ``split`` and ``fuse_base`` override the table (tests use them).

    ``capability`` and ``num_sms`` are None when no GPU runs the kernels (the interpreter). ``has_scores``: the caller
    passes the routing scores (tensor parallelism), so no kernel computes them.
    """
    for name, v in (("num_experts", num_experts), ("rank", rank), ("top_k", top_k), ("d_in", d_in), ("d_out", d_out)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
    regime = regime or regime_for(num_tokens, num_experts, rank)
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    elt = _elt_size(dtype)
    if regime == "decode":
        plan = decode_plan(num_tokens, num_experts, rank, top_k, d_in, has_scores, num_sms, split)
        return Plan("decode", decode=plan)

    acc_max = _acc_max(dtype)
    block_e = max(MIN_DOT, next_pow2(num_experts))
    block_r = next_pow2(rank)
    block_ea = max(next_pow2(num_experts), -(-MIN_DOT // block_r))
    block_kk = next_pow2(top_k)
    block_k = 16 if dtype == torch.float32 else PIECE_BLOCK_K
    pieces = pieces_for(dtype)
    mode = MODE_DENSE if regime == "dense" else MODE_ROUTE
    n_a = block_ea * block_r if mode == MODE_DENSE else 0
    # The pieces accumulate into one (BLOCK_T, BLOCK_E) block; in mode DENSE the epilogue's
    # masked pick of the selected experts holds a second (BLOCK_T, E·r) tile next to the accumulator, so the A part
    # counts twice (at BLOCK_T = 64 this spilled 16-96 bytes on sm_80/sm_90 in the earlier table).
    block_t = _block_rows(num_tokens, block_e + 2 * n_a, acc_max)
    n_tblocks = max(1, cdiv(num_tokens, block_t))
    if split is None:
        split = 1
        if num_sms is not None and n_tblocks < num_sms:
            split = max(1, min(cdiv(num_sms, n_tblocks), cdiv(d_in, 4 * block_k)))
    if split < 1:
        raise ValueError(f"split count must be >= 1, got {split}")
    route = RoutePlan(
        mode=mode,
        block_t=block_t,
        block_k=block_k,
        block_e=block_e,
        block_ea=block_ea,
        block_r=block_r,
        block_kk=block_kk,
        pieces=pieces,
        split_k=split,
        # The finalising program's (chunk, BLOCK_T, width) tile of partial sums at half the accumulator budget: the
        # full budget spilled 8 bytes on sm_90 (E=64, BLOCK_T=32, mode ROUTE).
        split_chunk=max(1, min(next_pow2(split), _pow2_floor(acc_max // 2 // (block_t * max(block_e, n_a))))),
        num_warps=NUM_WARPS,
        num_stages=_stages((block_t + block_e + n_a) * block_k * elt, capability),
    )
    if regime == "dense":
        # The fused base GEMM is a plain Triton GEMM: it removes the y round trip (base write, expand read + write:
        # 4·T·d_out bytes) but must match cuBLAS to gain. Nothing was measured yet, so the table keeps cuBLAS
        # (gpu_model.py prints both predictions; the benchmarks time both, impls "ours" and "ours_fused").
        fuse = bool(fuse_base)
        # A full K tile even when E·r is narrower (the padding columns are masked): with BLOCK_KC = 32 < BLOCK_K the
        # bf16 expand at BLOCK_T = 32 spilled 4 bytes on sm_90 under Triton 3.6.0; with 64 none does.
        block_kc = block_k
        if fuse:
            # 128 × 128 float32 accumulator over 8 warps (64 registers per thread), K tiles of 64, two stages (three
            # took 240 KiB of shared memory on sm_90, over its 227 KiB); sm_80's mma keeps more fragments in registers
            # (128 × 128 spilled 152 bytes there), so 128 × 64; float32 (FMA dots) at 64 × 64, as in the rest of the
            # table.
            if dtype == torch.float32:
                bt, bn, warps = 64, 64, NUM_WARPS
            else:
                bt, warps = 128, 8
                bn = 128 if capability is None or tuple(capability) >= (9, 0) else 64
            kb = block_k
            stages = 2
        else:
            bn = 64
            bt, warps, kb = _block_rows(num_tokens, bn, acc_max), NUM_WARPS, block_k
            # No software pipelining: with E·r <= DENSE_MAX_ER the K loop runs 1-4 times (3 stages of operand tiles
            # spilled in the earlier table for nothing to overlap).
            stages = 1
        expand = DenseExpandPlan(bt, bn, block_ea, block_r, block_kc, fuse, kb, warps, stages)
        return Plan("dense", route=route, expand=expand)
    if fuse_base:
        raise ValueError("fuse_base applies to the dense regime only")
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
        # float32 atomics are issued per element, each with its own 64-bit address: the 64 × 128 tile spilled 40
        # bytes on sm_80; half of it does not.
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
    return Plan("grouped", route=route, grouped=grouped)
