"""Cost model of the Triton path on an H100 / H200: DRAM and L2 bytes, FLOPs, serial ALU work, dependent load rounds
and launches per kernel, and the patched / base time ratios they predict. Its role is to be checked against the first
device run (RESULTS_gpu.md prints measured and predicted side by side), not to stand in for one.

    python -m benchmarks.gpu_model [--device h100|h200] [--json out.json] [--cases]     # from the repository root
    python -m benchmarks.gpu_model --markdown     # the table of docs/design.md (H100 with its range, and H200)

The kernels of a call and their grids are the ones the dispatch table really launches (recorded with
``triton_kernels.launch.recording`` on meta tensors); the base is one cuBLAS GEMM modelled the same way. A kernel
costs

    LAUNCH_GAP + Σ rounds · latency + max(DRAM bytes / (BW · occupancy), FLOPs / (peak · occupancy),
                                          L2 bytes / L2_BW, serial ALU ops / per-SM ALU rate)

- occupancy = min(1, programs / SMs): a grid smaller than the GPU cannot pull its bandwidth;
- L2 bytes are what the programs load from L2 in total, re-reads included: a GEMM-shaped kernel re-reads its A
  operand once per column block and its B operand once per row block (the route pass re-reads all prototype pieces and
  A once per token block). cuBLAS is charged none: it reaches the sustained efficiency by assumption, with split-K
  for small T and operand tiles shared across a cluster on sm_90, which our tl.dot kernels do not do;
- serial ALU ops: the scatter's counting sort in its largest program (program 0 also writes every block's expert);
- the grouped expand's atomics are read-modify-writes at L2: twice their bytes of L2 traffic;
- at decode the route and shrink kernels run on a side stream beside the base GEMM: that part costs
  max(base, route + shrink, all their DRAM bytes / BW), then the expand follows.

Two more columns: ``floor`` (every kernel's DRAM bytes and FLOPs at peak, no launch, latency or L2 term: the design's
limit), and ``eager`` (CUDA graphs off: each launch also costs HOST_LAUNCH on the host, which the GPU cannot hide when
kernels are short).

Peak numbers (dense, no sparsity), from NVIDIA's H100 and H200 datasheets: 132 SMs (SXM), bf16 tensor 989 TFLOP/s,
fp32 (non-tensor) 67 TFLOP/s, HBM 3.35 TB/s (H100 SXM, 80 GB) and 4.8 TB/s (H200, 141 GB). Everything in
:data:`NOMINAL` is an assumption, not a measurement; :func:`ratio_range` re-prices every case at the LOW and HIGH
corners to show how far the assumptions move each ratio.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace

import torch

from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

# The table the targets are stated on: Phi-3-mini's qkv_proj, bf16, k = 3.
TABLE_MODULE = "qkv_proj"
TABLE_EXPERTS = (10, 64, 256)
TABLE_RANKS = (8, 16)
TABLE_TOKENS = (1, 16, 2048)


def target(t: int, e: int) -> float | None:
    """The design's predicted-ratio target for a table cell (None: no target stated)."""
    if t <= 16:
        return 1.10 if e <= 64 else 1.20
    return {10: 1.10, 256: 1.30}.get(e)


@dataclass(frozen=True)
class Assumptions:
    """The model's free parameters (see the module docstring)."""

    launch_gap: float = 1.5e-6  # between dependent kernels replayed from a CUDA graph (launch + previous tail)
    dram_latency: float = 0.7e-6  # issuing a load that misses L2 to using it
    l2_latency: float = 0.3e-6  # the same for an L2 hit
    efficiency: float = 0.8  # sustained fraction of peak DRAM bandwidth and FLOPs, every kernel (cancels in ratios)
    l2_bw: float = 10e12  # L2 → SM bandwidth, whole chip
    alu_per_sm_per_s: float = 128 * 1.755e9  # 32-bit integer / float ops per SM per second
    gemm_rel: float = 1.0  # our tl.dot GEMMs' sustained FLOP rate relative to cuBLAS at the same L2 traffic
    host_launch: float = 4e-6  # host time per launch in eager mode (Python binder + driver)


NOMINAL = Assumptions()
# Corners for the uncertainty range: LOW favours ours (short gaps, fast L2), HIGH disfavours it.
LOW = Assumptions(launch_gap=0.8e-6, dram_latency=0.5e-6, l2_latency=0.2e-6, l2_bw=12e12, gemm_rel=1.0)
HIGH = Assumptions(launch_gap=2.5e-6, dram_latency=1.0e-6, l2_latency=0.5e-6, l2_bw=7e12, gemm_rel=0.85)


@dataclass(frozen=True)
class Device:
    """Peak numbers of one GPU (see the module docstring for the source)."""

    name: str
    num_sms: int
    capability: tuple[int, int]
    hbm_bytes_per_s: float
    bf16_flops: float
    fp32_flops: float
    l2_bytes: int


DEVICES = {
    "h100": Device("H100 SXM", 132, (9, 0), 3.35e12, 989e12, 67e12, 50 * 2**20),
    "h200": Device("H200 SXM", 132, (9, 0), 4.8e12, 989e12, 67e12, 50 * 2**20),
}


@dataclass
class KernelCost:
    """One launch: its traffic and work, and the resulting times."""

    name: str
    grid: tuple[int, ...]
    dram_bytes: float
    flops: float
    rounds_dram: int
    rounds_l2: int = 0
    l2_bytes: float = 0.0
    serial_alu: float = 0.0
    stream: str = "main"  # "side": beside the base GEMM (the decode kernels)
    ours_gemm: bool = False  # a tl.dot GEMM of ours (scaled by gemm_rel)
    fills_gpu: bool = False  # sizes its own grid to the GPU whatever the shape (cuBLAS picks split-K for small T)
    time_s: float = 0.0
    floor_s: float = 0.0

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def price(self, dev: Device, a: Assumptions = NOMINAL) -> KernelCost:
        """Fill in ``time_s`` (the model) and ``floor_s`` (DRAM bytes and FLOPs at peak only)."""
        occ = 1.0 if self.fills_gpu else min(1.0, self.programs / dev.num_sms)
        bw, fl = dev.hbm_bytes_per_s * a.efficiency, dev.bf16_flops * a.efficiency
        if self.ours_gemm:
            fl *= a.gemm_rel
        work = max(self.dram_bytes / (bw * occ), self.flops / (fl * occ), self.l2_bytes / a.l2_bw,
                   self.serial_alu / a.alu_per_sm_per_s)  # fmt: skip
        self.floor_s = max(self.dram_bytes / dev.hbm_bytes_per_s, self.flops / dev.bf16_flops)
        self.time_s = a.launch_gap + self.rounds_dram * a.dram_latency + self.rounds_l2 * a.l2_latency + work
        return self


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def base_gemm(t: int, d_in: int, d_out: int, elt: int = 2) -> KernelCost:
    """cuBLAS ``y = x Wᵀ``: W, x and y once from DRAM, at the sustained efficiency whatever the shape (it picks
    split-K for small T and shares operand tiles across a cluster on sm_90, so no L2 term is charged to it)."""
    return KernelCost("cublas_gemm", (1,), (d_out * d_in + t * d_in + t * d_out) * elt, 2.0 * t * d_in * d_out, 1,
                      fills_gpu=True)  # fmt: skip


def distinct_experts(t: int, e: int, k: int) -> float:
    """Expected distinct experts among T tokens' k choices when each token picks k of E uniformly (an assumption:
    real routing is skewed, which lowers it)."""
    return e * (1.0 - (1.0 - k / e) ** t)


def kernel_costs(
    t: int, d_in: int, d_out: int, e: int, r: int, k: int, dev: Device, fuse_base: bool | None = None
) -> list[KernelCost]:
    """The kernels the table launches for one bf16 call with a base weight (base GEMM first, unless fused)."""
    from genknowsub_fast.triton_kernels import launch
    from genknowsub_fast.triton_kernels.dispatch import LayerSpec, cdiv
    from genknowsub_fast.triton_kernels.linear import PreparedExperts, routed_linear

    dt, elt = torch.bfloat16, 2
    spec = LayerSpec(e, r, k, d_in, d_out, dt, dev.capability, dev.num_sms, None, None, fuse_base)
    layer = PreparedExperts.on_meta(spec)
    plan = layer.plan(t)
    new = lambda *s, dtype=dt: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    with launch.recording() as rec:
        routed_linear(layer, new(t, d_in), new(d_out, d_in), None, beside=True)
    costs = [] if plan.fuses_base else [base_gemm(t, d_in, d_out)]
    x_b, y_b = t * d_in * elt, t * d_out * elt
    sel = distinct_experts(t, e, k)  # the decode kernels read these experts' rows
    for ln in rec:
        c = ln.constexprs
        if ln.name == "_decode_route_kernel":
            d = plan.decode
            iters = _cdiv(d.route_k_per_split, d.route_block_k)
            p_bytes = e * d_in * 4
            costs.append(KernelCost(ln.name, ln.grid, p_bytes + x_b + d.route_splits * t * d.route_cols * 4,
                                    2.0 * 16 * d_in * d.block_e, 1 + _cdiv(iters, d.route_stages),
                                    l2_bytes=p_bytes + d.route_e_blocks * x_b, stream="side"))  # fmt: skip
        elif ln.name == "_decode_shrink_kernel":
            d = plan.decode
            iters = _cdiv(d.shrink_k_per_split, d.shrink_block_k)
            partials = t * d.shrink_splits * max(1, d.route_splits) * d.block_e * 4
            a_rows = t * k * r * d_in * elt
            costs.append(KernelCost(ln.name, ln.grid, sel * r * d_in * elt + x_b + d.shrink_splits * t * d.block_kr * 4,
                                    2.0 * a_rows / elt, iters, rounds_l2=1, l2_bytes=partials + a_rows + x_b,
                                    stream="side"))  # fmt: skip
        elif ln.name == "_decode_expand_kernel":
            # Into a float32 delta buffer on the side stream; y += delta follows the join (priced below).
            d = plan.decode
            n_blocks = ln.grid[0]
            b_rows = t * k * r * d_out * elt
            reads = t * n_blocks * (d.shrink_splits * d.block_kr * 4 + 2 * k * 4)
            costs.append(KernelCost(ln.name, ln.grid, sel * r * d_out * elt + t * d_out * 4, 2.0 * b_rows / elt, 1,
                                    rounds_l2=1, l2_bytes=reads + b_rows, stream="side"))  # fmt: skip
        elif ln.name == "_route_shrink_kernel":
            ro = plan.route
            phase, na = c["PHASE"], ro.na
            n_tblocks = cdiv(t, ro.block_t)
            ws = ro.split_k * t * (ro.block_e + na) * 4
            out = t * (na * elt + 2 * k * 4)
            if phase == 2:
                costs.append(KernelCost(ln.name, ln.grid, out, 0.0, 0, rounds_l2=1 + _cdiv(ro.split_k, ro.split_chunk),
                                        l2_bytes=ws))  # fmt: skip
            else:
                weights = (ro.pieces * e + e * r * (na > 0)) * d_in * elt
                cols = ro.block_e * ro.pieces + na
                costs.append(KernelCost(ln.name, ln.grid, x_b + weights + (ws if phase == 1 else out),
                                        2.0 * n_tblocks * ro.block_t * d_in * cols, 2,
                                        l2_bytes=x_b + n_tblocks * weights, ours_gemm=True))  # fmt: skip
        elif ln.name == "_expand_dense_kernel":
            ex = plan.expand
            kc = e * ex.block_r  # the experts' K range (C columns up to E·BLOCK_R)
            n_t, n_n = ln.grid
            b_bytes = e * r * d_out * elt
            c_bytes = t * kc * elt
            if c["FUSE_BASE"]:
                k_all = d_in + kc
                costs.append(KernelCost(ln.name, ln.grid, d_out * d_in * elt + x_b + c_bytes + b_bytes + y_b,
                                        2.0 * t * d_out * k_all, 1,
                                        l2_bytes=n_n * t * k_all * elt + n_t * k_all * d_out * elt,
                                        ours_gemm=True))  # fmt: skip
            else:
                costs.append(KernelCost(ln.name, ln.grid, c_bytes + b_bytes + 2 * y_b, 2.0 * t * d_out * kc, 2,
                                        l2_bytes=n_n * c_bytes + n_t * kc * d_out * elt + 2 * y_b,
                                        ours_gemm=True))  # fmt: skip
        elif ln.name == "_scatter_kernel":
            n_tb = ln.grid[0]
            be, bm, num_blocks = c["BLOCK_E"], c["BLOCK_M"], ln.args[6]
            ppt = c["PAIRS_PER_TBLOCK"]
            # Program 0: sums of the counts, the one-hot cumsums of its pairs, and every block's expert and padding.
            alu = 2 * n_tb * be + 4 * ppt * be + 3 * num_blocks * (be + bm)
            rounds = _cdiv(n_tb, c["TB_CHUNK"]) + 1
            costs.append(KernelCost(ln.name, ln.grid, t * k * 4 * 2 + num_blocks * (bm + 1) * 4, 0.0, 0,
                                    rounds_l2=rounds, l2_bytes=n_tb * n_tb * be * 4, serial_alu=alu))  # fmt: skip
        elif ln.name == "_grouped_shrink_kernel":
            g = plan.grouped
            nb = ln.grid[0]
            costs.append(KernelCost(ln.name, ln.grid, x_b + e * r * d_in * elt + t * k * (r + 1) * 4,
                                    2.0 * nb * g.block_m * d_in * g.block_r, 2,
                                    l2_bytes=nb * (g.block_m + g.block_r) * d_in * elt, ours_gemm=True))  # fmt: skip
        elif ln.name == "_grouped_expand_kernel":
            g = plan.grouped
            nb = ln.grid[0]
            atomics = t * k * d_out * elt
            costs.append(KernelCost(ln.name, ln.grid, e * r * d_out * elt + 2 * y_b,
                                    2.0 * nb * g.block_m * g.block_r * d_out, 3,
                                    l2_bytes=nb * g.block_r * d_out * elt + 2 * atomics, ours_gemm=True))  # fmt: skip
        else:
            raise ValueError(f"no cost model for {ln.name}")
    if plan.regime == "decode":
        # y += delta after the join (a PyTorch elementwise kernel: y read and written, the float32 delta read).
        costs.append(KernelCost("add_delta", (_cdiv(t * d_out, 1024),), 2 * y_b + t * d_out * 4, 0.0, 1,
                                fills_gpu=True))  # fmt: skip
    return costs


@dataclass
class Prediction:
    """Predicted times of one case (CUDA graphs unless ``eager``)."""

    case: str
    base_s: float
    ours_s: float
    ratio: float
    floor_ratio: float
    eager_ratio: float
    launches: int
    kernels: list[dict] = field(default_factory=list)


def _total(costs: list[KernelCost], dev: Device, a: Assumptions) -> float:
    """The call's time: the side-stream kernels overlap the base GEMM (decode); the rest follow one another."""
    for cst in costs:
        cst.price(dev, a)
    side = [cst for cst in costs if cst.stream == "side"]
    main = [cst for cst in costs if cst.stream == "main"]
    if side and main and main[0].name == "cublas_gemm":
        base = main.pop(0)
        bw = dev.hbm_bytes_per_s * a.efficiency
        shared = (base.dram_bytes + sum(cst.dram_bytes for cst in side)) / bw
        overlap = max(base.time_s, sum(cst.time_s for cst in side), a.launch_gap + shared)
        return overlap + sum(cst.time_s for cst in main)
    return sum(cst.time_s for cst in costs)


def predict(module: str, lib: str, t: int, dev: Device, fuse_base: bool | None = None,
            a: Assumptions = NOMINAL) -> Prediction:  # fmt: skip
    """Prediction for one op benchmark case (``benchmarks/bench_gpu.py``: bf16, k = TOP_K)."""
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = LIBRARIES[lib]
    tag = " fused" if fuse_base else ""
    return predict_shape(f"{module} {lib} T={t}{tag}", t, d_in, d_out, e, r, dev, fuse_base, a)


def plan_label(t: int, d_in: int, d_out: int, e: int, r: int, k: int, dev: Device,
               fuse_base: bool | None = None) -> str:  # fmt: skip
    """The dispatch table's choice that :func:`kernel_costs` prices: the regime, and "dense fused" when the base GEMM
    runs inside the dense expand."""
    from genknowsub_fast.triton_kernels.dispatch import LayerSpec
    from genknowsub_fast.triton_kernels.linear import PreparedExperts

    spec = LayerSpec(e, r, k, d_in, d_out, torch.bfloat16, dev.capability, dev.num_sms, None, None, fuse_base)
    plan = PreparedExperts.on_meta(spec).plan(t)
    return plan.regime + (" fused" if plan.fuses_base else "")


def predict_shape(case: str, t: int, d_in: int, d_out: int, e: int, r: int, dev: Device,
                  fuse_base: bool | None = None, a: Assumptions = NOMINAL, k: int = TOP_K) -> Prediction:  # fmt: skip
    """Prediction for one shape (bf16, with a base weight)."""
    base = base_gemm(t, d_in, d_out).price(dev, a)
    costs = kernel_costs(t, d_in, d_out, e, r, k, dev, fuse_base)
    ours = _total(costs, dev, a)
    bw, fl = dev.hbm_bytes_per_s, dev.bf16_flops
    floor_ours = max(sum(cst.dram_bytes for cst in costs) / bw, sum(cst.flops for cst in costs) / fl)
    floor_base = max(base.dram_bytes / bw, base.flops / fl)
    eager_ours = max(ours, len(costs) * a.host_launch)
    eager_base = max(base.time_s, a.host_launch)
    return Prediction(case, base.time_s, ours, ours / base.time_s, floor_ours / floor_base, eager_ours / eager_base,
                      len(costs), [asdict(cst) for cst in costs])  # fmt: skip


def ratio_range(t: int, d_in: int, d_out: int, e: int, r: int, dev: Device) -> tuple[float, float]:
    """The ratio at the LOW and HIGH corners of the assumptions."""
    return tuple(predict_shape("", t, d_in, d_out, e, r, dev, None, a).ratio for a in (LOW, HIGH))


def target_table(dev: Device) -> list[dict]:
    """The design's table: qkv_proj, decode T = 1 and 16, prefill T = 2048, E in {10, 64, 256}, r in {8, 16}."""
    d_in, d_out = PHI3_MINI_SHAPES[TABLE_MODULE]
    rows = []
    for t in TABLE_TOKENS:
        for e in TABLE_EXPERTS:
            for r in TABLE_RANKS:
                p = predict_shape(f"{TABLE_MODULE} T={t} E={e} r={r}", t, d_in, d_out, e, r, dev)
                lo, hi = ratio_range(t, d_in, d_out, e, r, dev)
                goal = target(t, e)
                rows.append(dict(case=p.case, tokens=t, experts=e, rank=r, ratio=p.ratio, low=lo, high=hi,
                                 regime=plan_label(t, d_in, d_out, e, r, TOP_K, dev),
                                 floor=p.floor_ratio, eager=p.eager_ratio, target=goal,
                                 met=None if goal is None else p.ratio <= goal,
                                 floor_met=None if goal is None else p.floor_ratio <= goal,
                                 kernels=[kc["name"] for kc in p.kernels]))  # fmt: skip
    return rows


def _verdict(row: dict) -> str:
    if row["target"] is None:
        return "none stated"
    goal = f"≤ {row['target']:.2f}"
    if row["met"]:
        return f"{goal} met"
    return f"{goal} missed" + ("" if row["floor_met"] else " (floor)")


def markdown_table(devices: tuple[str, str] = ("h100", "h200")) -> str:
    """The table of docs/design.md: the first device's ratio, range, floor, regime and verdict, the second device's
    ratio (the verdicts are the first device's)."""
    first, second = (target_table(DEVICES[d]) for d in devices)
    names = [DEVICES[d].name.split()[0] for d in devices]
    lines = [f"| case | regime | {names[0]} | range | floor | target | {names[1]} |",
             "|---|---|---:|---|---:|---|---:|"]  # fmt: skip
    for row, other in zip(first, second):
        case = row["case"].removeprefix(f"{TABLE_MODULE} ")
        lines.append(f"| {case} | {row['regime']} | {row['ratio']:.3f} | {row['low']:.3f}–{row['high']:.3f} | "
                     f"{row['floor']:.3f} | {_verdict(row)} | {other['ratio']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def table(dev: Device, tokens=(1, 16, 256, 4096)) -> list[Prediction]:
    """Predictions for every op benchmark case, plus the fused-base variant of the dense ones at T >= 256."""
    out = []
    for module in PHI3_MINI_SHAPES:
        for lib in LIBRARIES:
            for t in tokens:
                out.append(predict(module, lib, t, dev))
                if lib == "E10_r4" and t >= 256:
                    out.append(predict(module, lib, t, dev, fuse_base=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--json", help="also write the predictions here")
    parser.add_argument("--cases", action="store_true", help="also every op benchmark case of bench_gpu.py")
    parser.add_argument("--markdown", action="store_true", help="print only docs/design.md's table (H100 and H200)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    dev = DEVICES[args.device]
    rows = target_table(dev)
    print(f"{dev.name}: predicted patched / base, {TABLE_MODULE} {PHI3_MINI_SHAPES[TABLE_MODULE]}, bf16, k={TOP_K}, "
          "CUDA graphs")  # fmt: skip
    print("ratio: nominal assumptions [LOW, HIGH corners]; floor: DRAM bytes and FLOPs only; eager: no graphs")
    print(f"{'case':28s} {'regime':12s} {'ratio':>6s} {'range':>15s} {'floor':>6s} {'eager':>6s} {'target':>7s}  "
          "verdict")  # fmt: skip
    for row in rows:
        goal = "" if row["target"] is None else f"≤{row['target']:.2f}"
        if row["target"] is None:
            verdict = ""
        elif row["met"]:
            verdict = "met"
        else:
            verdict = "missed" + ("" if row["floor_met"] else " (the floor itself is above the target)")
        print(f"{row['case']:28s} {row['regime']:12s} {row['ratio']:6.3f} [{row['low']:5.3f}, {row['high']:5.3f}] "
              f"{row['floor']:6.3f} {row['eager']:6.2f} {goal:>7s}  {verdict}")  # fmt: skip
    preds = table(dev) if args.cases else []
    if preds:
        print(f"\n{'benchmark case':40s} {'base µs':>9s} {'ours µs':>9s} {'ratio':>7s} {'floor':>7s} launches")
        for p in preds:
            print(f"{p.case:40s} {p.base_s * 1e6:9.1f} {p.ours_s * 1e6:9.1f} {p.ratio:7.3f} {p.floor_ratio:7.3f} "
                  f"{p.launches}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": asdict(dev), "assumptions": {"nominal": asdict(NOMINAL), "low": asdict(LOW),
                       "high": asdict(HIGH)}, "table": rows, "predictions": [asdict(p) for p in preds]}, f, indent=1)
    return 0


__all__ = ["DEVICES", "NOMINAL", "LOW", "HIGH", "Assumptions", "Device", "KernelCost", "Prediction",
           "markdown_table", "plan_label", "predict", "predict_shape", "ratio_range", "replace", "table", "target",
           "target_table"]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
