"""Cost model of the Triton path on an H100 / H200: bytes, FLOPs, launches and dependent load rounds per kernel, and
the patched / base time ratios they predict for the GPU benchmark cases.

    python -m benchmarks.gpu_model [--device h200|h100] [--json out.json]     # from the repository root

Every kernel is modelled as ``launch gap + rounds · DRAM latency + max(bytes / bandwidth, FLOPs / peak)``: the first
two terms are the latency floor of a kernel that reads what it needs in ``rounds`` dependent steps, the last the
throughput floor. The kernels of a call, and their grids, are the ones the dispatch table really launches (recorded
with ``triton_kernels.launch.recording`` on meta tensors); the base is one cuBLAS GEMM modelled the same way. Two
ratios per case: ``model`` (all terms) and ``floor`` (bytes and FLOPs only, no launch or latency term): the
target of a case is reachable by this design only if the floor is under it.

Peak numbers (dense, no sparsity), from NVIDIA's H100 and H200 datasheets: 132 SMs (SXM), bf16 tensor 989 TFLOP/s,
fp32 (non-tensor) 67 TFLOP/s, HBM 3.35 TB/s (H100 SXM, 80 GB) and 4.8 TB/s (H200, 141 GB). Assumptions, not
measurements (the first GPU run calibrates them: RESULTS_gpu.md lists measured and predicted side by side):

- ``LAUNCH_GAP``: 2.0 µs between dependent kernels replayed from a CUDA graph (launch + the tail of the previous
  kernel);
- ``DRAM_LATENCY``: 0.7 µs from issuing a load that misses L2 to using it;
- ``EFFICIENCY``: sustained fraction of peak bandwidth and FLOPs for every kernel, ours and cuBLAS alike (0.8), so it
  cancels in throughput-bound ratios;
- ``L2_BYTES_PER_CLOCK``: 64 bytes per SM per clock read from L2 at 1.755 GHz (re-reads of small tiles, e.g. the
  decode expand's partial sums, are charged at that rate on the reading SM, not at HBM bandwidth).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

LAUNCH_GAP = 2.0e-6
DRAM_LATENCY = 0.7e-6
EFFICIENCY = 0.8
L2_BYTES_PER_CLOCK = 64
SM_CLOCK = 1.755e9


@dataclass(frozen=True)
class Device:
    """Peak numbers of one GPU (see the module docstring for the source)."""

    name: str
    num_sms: int
    capability: tuple[int, int]
    hbm_bytes_per_s: float
    bf16_flops: float
    fp32_flops: float


DEVICES = {
    "h100": Device("H100 SXM", 132, (9, 0), 3.35e12, 989e12, 67e12),
    "h200": Device("H200 SXM", 132, (9, 0), 4.8e12, 989e12, 67e12),
}


@dataclass
class KernelCost:
    """One launch: DRAM bytes, FLOPs, dependent load rounds, L2 bytes re-read per CTA, and the resulting times."""

    name: str
    grid: tuple[int, ...]
    dram_bytes: float
    flops: float
    rounds: int
    l2_bytes_per_cta: float = 0.0
    launches: int = 1
    time_s: float = 0.0
    floor_s: float = 0.0

    def price(self, dev: Device) -> KernelCost:
        """Fill in ``time_s`` (the model) and ``floor_s`` (throughput only) on ``dev``."""
        bw, flops = dev.hbm_bytes_per_s * EFFICIENCY, dev.bf16_flops * EFFICIENCY
        throughput = max(self.dram_bytes / bw, self.flops / flops)
        l2 = self.l2_bytes_per_cta / (L2_BYTES_PER_CLOCK * SM_CLOCK)
        self.floor_s = throughput
        self.time_s = self.launches * LAUNCH_GAP + self.rounds * DRAM_LATENCY + max(throughput, l2)
        return self


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def base_gemm(t: int, d_in: int, d_out: int, elt: int = 2) -> KernelCost:
    """cuBLAS ``y = x Wᵀ``: W, x and y once; one round (the GEMM streams, its first tile is the latency)."""
    return KernelCost("cublas_gemm", (1,), (d_out * d_in + t * d_in + t * d_out) * elt, 2.0 * t * d_in * d_out, 1)


def kernel_costs(
    t: int, d_in: int, d_out: int, e: int, r: int, k: int, dev: Device, fuse_base: bool | None = None
) -> list[KernelCost]:
    """The kernels the table launches for one call (base GEMM first, unless fused), each with its cost."""
    from genknowsub_fast.triton_kernels import launch
    from genknowsub_fast.triton_kernels.dispatch import choose_plan
    from genknowsub_fast.triton_kernels.linear import add_delta_

    dt, elt = torch.bfloat16, 2
    plan = choose_plan(t, e, r, k, d_in, d_out, dt, dev.capability, dev.num_sms, False, None, None, fuse_base)
    meta = torch.device("meta")
    new = lambda *s, dtype=dt: torch.empty(*s, device=meta, dtype=dtype)  # noqa: E731
    with launch.recording() as rec:
        tensors = (new(e, d_in, dtype=torch.float32), new(e, 3 * d_in), 1.0, new(e * r, d_in), new(e, r, d_out))
        add_delta_(new(t, d_out), new(t, d_in), *tensors, k, 1.0, False, plan, True, None, new(d_out, d_in), None)
    fused = plan.expand is not None and plan.expand.fuse_base
    costs = [] if fused else [base_gemm(t, d_in, d_out)]
    x_b, y_b = t * d_in * elt, t * d_out * elt
    for ln in rec:
        c = ln.constexprs
        if ln.name == "_decode_shrink_kernel":
            d = plan.decode
            ws = d.k_splits * t * d.ws_cols * 4
            rows_p = 0 if d.n_p_blocks == 0 else e * d_in * 4
            rounds = _cdiv(d.k_per_split, d.shrink_block_k) + 1
            flops = 2.0 * 16 * d_in * d.ws_cols
            costs.append(KernelCost(ln.name, ln.grid, x_b + rows_p + e * r * d_in * elt + ws, flops, rounds))
        elif ln.name == "_decode_expand_kernel":
            d = plan.decode
            chunks = _cdiv(d.k_splits, d.split_chunk)
            per_cta = d.k_splits * d.block_t * (d.block_e + d.block_kk * d.block_r) * 4
            b_rows = min(t * k, e) * r * d_out * elt
            costs.append(KernelCost(ln.name, ln.grid, b_rows + 2 * y_b, 2.0 * t * k * r * d_out, 2 * chunks + 2,
                                    per_cta))  # fmt: skip
        elif ln.name == "_route_shrink_kernel":
            ro = plan.route
            na = ro.block_ea * ro.block_r if ro.mode == 0 else 0
            cols = ro.block_e * ro.pieces + na
            phase = c["PHASE"]
            ws = ro.split_k * t * (ro.block_e + na) * 4
            if phase == 2:
                rounds = _cdiv(ro.split_k, ro.split_chunk) + 1
                costs.append(KernelCost(ln.name, ln.grid, ws + t * (k * r + 2 * k) * 4, 0.0, rounds))
            else:
                out = ws if phase == 1 else t * (k * r + 2 * k) * 4
                weights = (ro.pieces * e + (e * r if ro.mode == 0 else 0)) * d_in * elt
                costs.append(KernelCost(ln.name, ln.grid, x_b + weights + out, 2.0 * t * d_in * cols, 2))
        elif ln.name == "_expand_dense_kernel":
            ex = plan.expand
            b = e * r * d_out * elt
            flops = 2.0 * t * d_out * ex.block_ea * ex.block_r
            if c["FUSE_BASE"]:
                costs.append(KernelCost(ln.name, ln.grid, d_out * d_in * elt + x_b + b + y_b,
                                        flops + 2.0 * t * d_in * d_out, 1))  # fmt: skip
            else:
                costs.append(KernelCost(ln.name, ln.grid, b + 2 * y_b + t * k * (r + 1) * 4, flops, 2))
        elif ln.name == "_align_kernel":
            # One program: two passes over the T·k experts in CHUNK pieces and one over the blocks, each step a
            # dependent load round.
            n, blocks = t * k, ln.args[5]
            rounds = 2 * _cdiv(n, c["CHUNK"]) + _cdiv(blocks, c["BLOCK_B"])
            costs.append(KernelCost(ln.name, ln.grid, n * 4 * 3 + blocks * (c["BLOCK_M"] + 1) * 4, 0.0, rounds))
        elif ln.name == "_grouped_shrink_kernel":
            g = plan.grouped
            costs.append(KernelCost(ln.name, ln.grid, x_b + e * r * d_in * elt + t * k * (r + 1) * 4,
                                    2.0 * ln.grid[0] * g.block_m * d_in * g.block_r, 2))  # fmt: skip
        elif ln.name == "_grouped_expand_kernel":
            g = plan.grouped
            # k atomic read-modify-writes of every y element (at L2, but y does not fit there at prefill sizes).
            costs.append(KernelCost(ln.name, ln.grid, e * r * d_out * elt + 2 * k * y_b,
                                    2.0 * ln.grid[0] * g.block_m * g.block_r * d_out, 2))  # fmt: skip
        else:
            raise ValueError(f"no cost model for {ln.name}")
    return [c.price(dev) for c in costs]


@dataclass
class Prediction:
    """Predicted times of one benchmark case."""

    case: str
    base_s: float
    ours_s: float
    ratio: float
    floor_ratio: float
    launches: int
    kernels: list[dict]


def predict(module: str, lib: str, t: int, dev: Device, fuse_base: bool | None = None) -> Prediction:
    """Prediction for one op benchmark case (``benchmarks/bench_gpu.py``: bf16, k = TOP_K)."""
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = LIBRARIES[lib]
    base = base_gemm(t, d_in, d_out).price(dev)
    costs = kernel_costs(t, d_in, d_out, e, r, TOP_K, dev, fuse_base)
    ours = sum(c.time_s for c in costs)
    floor = sum(c.floor_s for c in costs)
    tag = " fused" if fuse_base else ""
    return Prediction(
        f"{module} {lib} T={t}{tag}", base.time_s, ours, ours / base.time_s, floor / base.floor_s,
        sum(c.launches for c in costs), [asdict(c) for c in costs],
    )  # fmt: skip


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
    parser.add_argument("--device", choices=sorted(DEVICES), default="h200")
    parser.add_argument("--json", help="also write the predictions here")
    args = parser.parse_args(argv)
    dev = DEVICES[args.device]
    preds = table(dev)
    print(f"{dev.name}: predicted patched / base (bf16, k={TOP_K}); 'floor' leaves out launches and latency")
    print(f"{'case':40s} {'base µs':>9s} {'ours µs':>9s} {'ratio':>7s} {'floor':>7s} launches")
    for p in preds:
        print(f"{p.case:40s} {p.base_s * 1e6:9.1f} {p.ours_s * 1e6:9.1f} {p.ratio:7.3f} {p.floor_ratio:7.3f} "
              f"{p.launches}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": asdict(dev), "predictions": [asdict(p) for p in preds]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
