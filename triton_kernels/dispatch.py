"""Dispatch table: (T, E, r, k, d_in, d_out, dtype, device) → which kernels run, with which block sizes.

Pure Python (no Triton import), so the table can be read and tested anywhere. :func:`choose_plan` is the table;
:func:`plan_for` is its one cache, keyed by a layer's :class:`LayerSpec`, the token count and two flags.

No GPU was available while this table was written, so no threshold below rests on a GPU timing. Each one is derived
from operation counts or hardware limits, stated next to it; ``benchmarks/gpu_model.py`` turns the plans into
predicted times, and ``benchmarks/bench_gpu.py`` measures them (``bash benchmarks/gpu_check.sh``).

Regimes:

- ``decode`` (T <= DECODE_MAX_T, ``decode.py``): three kernels that read only what routing needs and only the k
  selected experts. (1) the route kernel: float32 partial scores ``x·P`` over slices of d_in, split across the SMs;
  (2) the shrink kernel, one program per (token, slice of d_in): sums that token's partial scores, takes the top-k and
  softmax, and multiplies the k·r selected rows of A with its slice of x; (3) the expand kernel, one program per
  (d_out block, token): sums the shrink slices, applies the mixing and adds the selected experts' Bᵀ rows into y.
  Kernels 1 and 2 need only x, so on a GPU they run on a side stream beside the base GEMM (``linear.py``); only the
  expand waits for y.
- ``dense`` (T > DECODE_MAX_T, padded E·r <= DENSE_MAX_NA): the route pass (``route_shrink.py``) computes the routing
  and every expert's shrink from one pass over x; the dense expand (``expand.py``) does one tl.dot of the masked
  (T, E·r) coefficient block against all of Bᵀ, inside the base GEMM's kernel (``fuse_base``: y is written once and
  never read back) or after cuBLAS.
- ``grouped`` (otherwise): routing alone in the route pass, which also counts each token block's pairs per expert;
  ``grouped.py``'s scatter kernel sorts the (token, slot) pairs by expert (one program per token block), then a grouped
  shrink GEMM and a grouped expand GEMM with atomics into y.

Routing scores are float32 in every regime (x·p with p float32, x converted exactly): in the decode route kernel
directly (FMA dot; the bytes of P are few), in the route pass against ``PIECES`` 16-bit pieces of P in the compute
dtype, so tensor-core dots with float32 accumulation give the float32 sum (``pieces.py``).

Block sizes:

- accumulators are float32 in registers; ACC_ELEMS_MAX = 8192 elements over 4 warps is 64 registers per thread,
  half of the 128-register budget that keeps two 4-warp programs resident per SM. ``tools/aot.py`` compiles every
  configuration of this table for sm_80 and sm_90 with the Triton of the GPU image and ``tests/triton_kernels/
  test_aot.py`` checks from its output that none spills, that shared memory fits and that the main loops load
  16 bytes per instruction or use cp.async;
- K offsets are multiples of the K tile and the K split is passed as a specialised integer (a multiple of 16), so the
  compiler knows 16-byte alignment of every row start when the row strides are multiples of 16 bytes;
- num_stages = 3 when three stages of the operand tiles fit in shared memory (99 KiB on sm_86/89, 163 KiB on sm_80,
  227 KiB on sm_90: the per-block opt-in limits of the CUDA programming guide), else 2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

MODE_DENSE = 0
MODE_ROUTE = 2  # routing only; the shrink is the grouped kernels' job

REGIMES = ("decode", "dense", "grouped")
DECODE_MAX_T = 16
# Dense while the padded E·r block (next_pow2(E)·next_pow2(r), at least 16) is at most 256 columns: the dense route
# pass then holds a (BLOCK_T, 256 + BLOCK_E) float32 accumulator, and the dense expand adds E·r columns to the base
# GEMM's K (256 / 3072 = 8 % of Phi-3-mini's qkv_proj FLOPs). gpu_model.py prices both regimes; at 512 columns the
# grouped regime is predicted cheaper.
DENSE_MAX_NA = 256
ACC_ELEMS_MAX = 8192
NUM_WARPS = 4
GROUPED_BLOCK_N = 128
# float32 runs tl.dot with input_precision="ieee" (exact, no TF32) on the FMA units, whose lowering keeps operand
# fragments in registers: ptxas -v found spills with 4096-element float32 accumulators and BLOCK_K = 16 in the fused
# dense epilogue; with 2048 none.
FP32_ACC_ELEMS_MAX = 2048
MIN_DOT = 16  # smallest tl.dot block dimension that compiles for NVIDIA GPUs
# K tile of the 16-bit route pass, and the block in which pieces.py interleaves the prototype pieces along K: 64
# 16-bit values are 128 bytes per row and stage.
PIECE_BLOCK_K = 64
# The route pass holds the score and shrink accumulators of a block of tokens at once: 8 warps give it twice the
# accumulator budget (64 registers per thread each way), so a 256-column dense shrink still gets 32-64 token rows and
# the all-of-A re-read from L2 per token block (gpu_model.py) stays small.
ROUTE_WARPS = 8
ROUTE_ACC_ELEMS_MAX = 2 * ACC_ELEMS_MAX

# Decode route kernel: (16 tokens × DECODE_ROUTE_BLOCK_K) · (DECODE_ROUTE_BLOCK_K × BLOCK_E) float32 dots, BLOCK_E at
# most DECODE_ROUTE_BLOCK_E_MAX prototypes per program: small programs (8 KiB of P per K tile), many of them, so that
# reading P takes one or two dependent rounds at T = 1 (P is E·d_in·4 bytes: 3 MiB at E = 256, d_in = 3072).
DECODE_ROUTE_BLOCK_K = 32
DECODE_ROUTE_BLOCK_E_MAX = 64
# Every shrink program re-reads its token's partial scores from all route slices (L2): S1·next_pow2(E)·4 bytes. At the
# 64 bytes per clock an SM reads from L2 (gpu_model.py) 32 KiB take about 0.3 µs, under one DRAM round trip. The
# bound is per token, so it does not shrink with T (the previous table bounded it per block of 16 tokens, which forced
# a single slice at T = 16, E = 256).
ROUTE_PARTIALS_MAX = 32 * 1024
# Decode shrink: (k·r rows × 128 bytes) tiles of A (64 16-bit or 32 float32 columns), at most DECODE_SHRINK_STEPS tiles
# per program: each tile is one dependent DRAM round (the loop has no tl.dot for the pipeliner to overlap), so slices
# are kept short and there are many programs instead. (64 float32 columns: ptxas spilled 4 bytes at 32 registers.)
DECODE_SHRINK_ROW_BYTES = 128
DECODE_SHRINK_STEPS = 2
# Decode expand: (k·r rows × BLOCK_N) tile of Bᵀ per program.
DECODE_EXPAND_TILE = 8192
DECODE_EXPAND_BLOCK_N_MAX = 256
# Smallest tile of a loop that sums partial results: 4 float32 (16 bytes) per thread of a 4-warp program.
MIN_TILE = 4 * 32 * NUM_WARPS
# Programs the route kernel aims for per SM (two keep one program's loads in flight while the other computes).
PROGRAMS_PER_SM = 2

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
class LayerSpec:
    """What the table needs to know about a prepared layer, fixed when it is prepared (the key of :func:`plan_for`).

    ``capability`` / ``num_sms`` are None where no GPU runs the kernels (the interpreter). ``regime``, ``split`` and
    ``fuse_base`` override the table (tests and benchmarks reach every path with them).
    """

    num_experts: int
    rank: int
    top_k: int
    d_in: int
    d_out: int
    dtype: torch.dtype
    capability: tuple[int, int] | None
    num_sms: int | None
    regime: str | None = None
    split: int | None = None
    fuse_base: bool | None = None
    mix_weights: bool = False
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self):
        fields = (self.num_experts, self.rank, self.top_k, self.d_in, self.d_out, self.dtype, self.capability,
                  self.num_sms, self.regime, self.split, self.fuse_base, self.mix_weights)  # fmt: skip
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:  # computed once: plan_for hashes the spec on every call
        return self._hash


@dataclass(frozen=True)
class DecodePlan:
    """The three decode kernels (``decode.py``)."""

    route_splits: int  # slices of d_in of the route kernel (0 when the caller passes the scores)
    route_k_per_split: int
    route_block_k: int
    route_block_e: int  # prototypes per route program
    route_e_blocks: int
    shrink_splits: int  # slices of d_in of the shrink kernel
    shrink_k_per_split: int
    shrink_block_k: int
    block_e: int  # next_pow2(E): the top-k row
    block_r: int
    block_kk: int
    block_kr: int  # block_kk · block_r rows of the selected experts
    route_chunk: int  # route slices summed per tile by the shrink kernel
    shrink_chunk: int  # shrink slices summed per tile by the expand kernel
    block_n: int  # expand: output columns per program
    num_warps: int
    route_stages: int

    @property
    def route_cols(self) -> int:
        """Columns of one (slice, token) row of the route partial sums."""
        return self.route_e_blocks * self.route_block_e

    def route_grid(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.route_splits, self.route_e_blocks, cdiv(num_tokens, MIN_DOT))

    def shrink_grid(self, num_tokens: int) -> tuple[int, int]:
        return (num_tokens, self.shrink_splits)

    def expand_grid(self, num_tokens: int, d_out: int) -> tuple[int, int]:
        return (cdiv(d_out, self.block_n), num_tokens)


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
    split_chunk: int  # splits of the shrink columns summed per tile by the finalising program
    score_chunk: int  # the same for the score columns
    num_warps: int
    num_stages: int
    count_pairs: bool = False  # write each token block's pairs per expert (the grouped regime's scatter reads them)

    @property
    def na(self) -> int:
        """Columns of the dense shrink block (0 in mode ROUTE)."""
        return self.block_ea * self.block_r if self.mode == MODE_DENSE else 0


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
    scatter_chunk: int  # pairs per one-hot tile in the scatter kernel


@dataclass(frozen=True)
class Plan:
    """Everything one routed linear call launches; exactly one of the regime fields is set."""

    regime: str
    decode: DecodePlan | None = None
    route: RoutePlan | None = None
    expand: DenseExpandPlan | None = None
    grouped: GroupedPlan | None = None

    @property
    def fuses_base(self) -> bool:
        """The base GEMM runs inside the expand kernel (no cuBLAS call)."""
        return self.expand is not None and self.expand.fuse_base


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


def _chunk(rows: int, width: int) -> int:
    """Rows per (rows, width) tile of a loop that sums partial rows: all rows when they fit in ACC_ELEMS_MAX, and at
    least MIN_TILE elements (masked rows past the end), so each thread loads 16 bytes per instruction."""
    lo = max(1, MIN_TILE // width)
    return max(lo, min(next_pow2(max(1, rows)), _pow2_floor(ACC_ELEMS_MAX // width)))


def dense_columns(num_experts: int, rank: int) -> int:
    """Columns of the dense shrink block: next_pow2(E)·next_pow2(r), at least MIN_DOT."""
    block_r = next_pow2(rank)
    return max(next_pow2(num_experts), -(-MIN_DOT // block_r)) * block_r


def regime_for(num_tokens: int, num_experts: int, rank: int) -> str:
    """The table's regime for a call (see the module docstring)."""
    if num_tokens <= DECODE_MAX_T:
        return "decode"
    if dense_columns(num_experts, rank) <= DENSE_MAX_NA:
        return "dense"
    return "grouped"


def decode_plan(
    num_tokens: int,
    num_experts: int,
    rank: int,
    top_k: int,
    d_in: int,
    dtype: torch.dtype,
    has_scores: bool,
    capability: tuple[int, int] | None,
    num_sms: int | None,
    split: int | None = None,
) -> DecodePlan:
    """Blocks and slice counts of the decode kernels. Without an SM count (the interpreter) one slice each, unless
    ``split`` forces a count for both the route and the shrink kernel.

    Route slices: PROGRAMS_PER_SM programs per SM over (slices × prototype blocks), at most one slice per K tile and at
    most what keeps a token's partial scores under ROUTE_PARTIALS_MAX. Shrink slices: at most DECODE_SHRINK_STEPS K
    tiles per program (each tile is a dependent round), so the grid grows with d_in and T instead of one program
    walking d_in.
    """
    block_e = max(MIN_DOT, next_pow2(num_experts))
    route_block_e = min(DECODE_ROUTE_BLOCK_E_MAX, block_e)
    # Blocks over next_pow2(E) (not E): the partial-score rows are then exactly BLOCK_E wide, zero past E, and the
    # shrink kernel reads them without a column mask (16-byte loads).
    route_e_blocks = block_e // route_block_e
    rbk = DECODE_ROUTE_BLOCK_K
    sbk = DECODE_SHRINK_ROW_BYTES // _elt_size(dtype)
    if split is not None and split < 1:
        raise ValueError(f"split count must be >= 1, got {split}")
    if has_scores:
        route_splits = 0
    elif split is not None:
        route_splits = split
    elif num_sms is None:
        route_splits = 1
    else:
        cap_bytes = ROUTE_PARTIALS_MAX // (route_e_blocks * route_block_e * 4)
        want = cdiv(PROGRAMS_PER_SM * num_sms, route_e_blocks)
        route_splits = max(1, min(want, cdiv(d_in, rbk), cap_bytes))
    route_kps = cdiv(cdiv(d_in, max(1, route_splits)), rbk) * rbk
    if route_splits:
        route_splits = cdiv(d_in, route_kps)  # rounding up the slice may leave fewer non-empty slices
    if split is not None:
        shrink_splits = split
    elif num_sms is None:
        shrink_splits = 1
    else:
        shrink_splits = cdiv(d_in, DECODE_SHRINK_STEPS * sbk)
    shrink_kps = cdiv(cdiv(d_in, shrink_splits), sbk) * sbk
    shrink_splits = cdiv(d_in, shrink_kps)
    block_r = next_pow2(rank)
    block_kk = next_pow2(top_k)
    block_kr = block_kk * block_r
    elt = _elt_size(dtype)
    return DecodePlan(
        route_splits=route_splits,
        route_k_per_split=route_kps,
        route_block_k=rbk,
        route_block_e=route_block_e,
        route_e_blocks=route_e_blocks,
        shrink_splits=shrink_splits,
        shrink_k_per_split=shrink_kps,
        shrink_block_k=sbk,
        block_e=block_e,
        block_r=block_r,
        block_kk=block_kk,
        block_kr=block_kr,
        route_chunk=_chunk(route_splits, block_e),
        shrink_chunk=_chunk(shrink_splits, block_kr),
        block_n=max(MIN_DOT, min(DECODE_EXPAND_BLOCK_N_MAX, DECODE_EXPAND_TILE // block_kr)),
        num_warps=NUM_WARPS,
        route_stages=_stages((MIN_DOT * elt + route_block_e * 4) * rbk, capability),
    )


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
    has_weight: bool = True,
    mix_weights: bool = False,
) -> Plan:
    """The plan for one call. ``regime``, ``split`` and ``fuse_base`` override the table (tests use them).

    ``capability`` and ``num_sms`` are None when no GPU runs the kernels (the interpreter). ``has_scores``: the caller
    passes the routing scores (tensor parallelism), so no kernel computes them. ``has_weight``: the call has a base
    weight the fused-base kernel can read (unit-stride rows); without one the table never fuses. ``mix_weights``:
    "weights" mixing (part of the key; no block size depends on it at present).
    """
    for name, v in (("num_experts", num_experts), ("rank", rank), ("top_k", top_k), ("d_in", d_in), ("d_out", d_out)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    if fuse_base and regime not in (None, "dense"):
        raise ValueError("fuse_base applies to the dense regime only")
    regime = regime or regime_for(num_tokens, num_experts, rank)
    if split is not None and split < 1:
        raise ValueError(f"split count must be >= 1, got {split}")
    elt = _elt_size(dtype)
    if regime == "decode":
        plan = decode_plan(num_tokens, num_experts, rank, top_k, d_in, dtype, has_scores, capability, num_sms, split)
        return Plan("decode", decode=plan)

    acc_max = _acc_max(dtype)
    block_e = max(MIN_DOT, next_pow2(num_experts))
    block_r = next_pow2(rank)
    block_ea = max(next_pow2(num_experts), -(-MIN_DOT // block_r))
    block_kk = next_pow2(top_k)
    block_k = 16 if dtype == torch.float32 else PIECE_BLOCK_K
    pieces = pieces_for(dtype)
    mode = MODE_DENSE if regime == "dense" else MODE_ROUTE
    na = block_ea * block_r if mode == MODE_DENSE else 0
    # The score and (mode DENSE) shrink accumulators of a token block live side by side; the epilogue picks the
    # selected experts' shrinks through an L2 scratch row instead of a second register tile (route_shrink.py).
    route_acc = acc_max if dtype == torch.float32 else ROUTE_ACC_ELEMS_MAX
    if has_scores:
        # Caller scores arrive as a loaded (BLOCK_T, BLOCK_E) tile in a plain blocked layout, not the dot's: top-k on
        # a 64 × 256 tile of it spilled 400 bytes on sm_90 under Triton 3.6.0; half the rows do not.
        route_acc //= 2
    block_t = MIN_DOT
    while block_t < 64 and block_t < num_tokens and 2 * block_t * (block_e + na) <= route_acc:
        block_t *= 2
    # 8 warps from 32 token rows (the larger accumulator); a 16-row block on 8 warps spilled 16 bytes on sm_90 with
    # a 256-column shrink block although it held only 17 accumulator registers per thread.
    route_block_k = block_k
    if dtype == torch.float32:
        # FMA dots hold operand fragments in registers: a 16-row block with 272 columns took 128 registers per thread
        # on 4 warps and spilled 20 bytes on sm_90; 8 warps halve each thread's share, and K tiles of 32 keep the x
        # and prototype tiles at 2 float32 per thread (16-column tiles left 1: 4-byte copies).
        route_warps = ROUTE_WARPS if block_t * (block_e + na) > acc_max else NUM_WARPS
        route_block_k = 32 if route_warps == ROUTE_WARPS else block_k
    else:
        route_warps = ROUTE_WARPS if block_t >= 32 else NUM_WARPS
    n_tblocks = max(1, cdiv(num_tokens, block_t))
    if split is None:
        split = 1
        if num_sms is not None and n_tblocks < num_sms:
            split = max(1, min(cdiv(num_sms, n_tblocks), cdiv(d_in, 4 * block_k)))
    route = RoutePlan(
        mode=mode,
        block_t=block_t,
        block_k=route_block_k,
        block_e=block_e,
        block_ea=block_ea,
        block_r=block_r,
        block_kk=block_kk,
        pieces=pieces,
        split_k=split,
        # The finalising program's (chunk, BLOCK_T, width) tile of partial sums at half the accumulator budget.
        split_chunk=max(1, min(next_pow2(split), _pow2_floor(acc_max // 2 // (block_t * max(block_e, na))))),
        score_chunk=max(
            MIN_TILE * route_warps // NUM_WARPS // (block_t * block_e),
            # a quarter of the budget: the "weights" epilogue spilled 8 bytes on sm_90 with (8, 32, 16) tiles
            min(next_pow2(split), _pow2_floor(acc_max // 4 // (block_t * block_e))),
            1,
        ),
        num_warps=route_warps,
        # Two stages when the dense shrink block is wide: three spilled 8 bytes on sm_90 (BLOCK_T = 32, 128 columns).
        num_stages=_stages((block_t + block_e + na) * route_block_k * elt, capability) if na < 128 else 2,
        count_pairs=mode == MODE_ROUTE,
    )
    if regime == "dense":
        # The fused base GEMM removes the y round trip of an expand after cuBLAS (read and write T·d_out: on an H100
        # about 19 % of a compute-bound base GEMM's time whatever T, since 4·T·d_out bytes at 3.35 TB/s against
        # 2·T·d_in·d_out FLOPs at 989 TFLOP/s is 0.19 at d_in = 3072). It pays while this kernel reaches at least
        # ~85 % of cuBLAS's rate (gpu_model.py prints both); the table fuses 16-bit calls from 256 tokens on (enough
        # 128-row tiles to fill the SMs) and leaves float32 (FMA dots, no tensor cores) to cuBLAS.
        if fuse_base is None:
            fuse = has_weight and dtype != torch.float32 and num_tokens >= 256
        else:
            fuse = bool(fuse_base) and has_weight
        block_kc = min(block_k, na)  # divides NA (both powers of two): C's tiles need no column mask
        if fuse:
            # A GEMM of K = d_in + E·BLOCK_R: 128 × 256 tiles over 8 warps on sm_90 (the float32 accumulator is 128
            # registers per thread, held by the wgmma instructions), so each program's L2 traffic per FLOP matches the
            # 128 × 256 tiles a vendor GEMM uses on this part: with 128 × 128 the operands re-read from L2 (1.8 GB at
            # T = 2048 for qkv_proj) outweigh the y round trip the fusion saves (gpu_model.py). sm_80's mma keeps
            # more fragments in registers (128 × 128 spilled 152 bytes there), so 128 × 64; float32 (FMA dots) at
            # 64 × 64, as in the rest of the table. Three stages of 128 × 64 and 64 × 256 tiles: 144 KiB.
            if dtype == torch.float32:
                bt, bn, warps, stages = 64, 64, NUM_WARPS, 2
            elif capability is None or tuple(capability) >= (9, 0):
                bt, bn, warps, stages = 128, 256, 8, 3
            else:
                bt, bn, warps, stages = 128, 64, 8, 2
            kb = block_k
        else:
            bn = 64
            bt, warps, kb = _block_rows(num_tokens, bn, acc_max), NUM_WARPS, block_k
            # The K loop over E·r runs 1-4 times: three stages of operand tiles spilled for nothing to overlap.
            stages = 1
        expand = DenseExpandPlan(bt, bn, block_ea, block_r, block_kc, fuse, kb, warps, stages)
        return Plan("dense", route=route, expand=expand)
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
        # (CHUNK, experts) one-hot tiles of a quarter of the accumulator budget (the chunks are unrolled): the full
        # budget spilled 24-28 bytes on sm_80, half of it 8.
        scatter_chunk=max(MIN_DOT, min(128, _pow2_floor(ACC_ELEMS_MAX // 4 // next_pow2(num_experts)))),
    )
    return Plan("grouped", route=route, grouped=grouped)


@functools.lru_cache(maxsize=8192)
def plan_for(spec: LayerSpec, num_tokens: int, has_scores: bool = False, has_weight: bool = True) -> Plan:
    """The table's plan for a layer and a call (cached: the one plan cache of the Triton path)."""
    s = spec
    return choose_plan(num_tokens, s.num_experts, s.rank, s.top_k, s.d_in, s.d_out, s.dtype, s.capability, s.num_sms,
                       has_scores, s.regime, s.split, s.fuse_base, has_weight, s.mix_weights)  # fmt: skip
