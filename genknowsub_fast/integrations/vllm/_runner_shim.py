"""Private stand-in for the prepared per-layer runner (``genknowsub_fast.ops.prepare``) until it lands on main.

Same interface as the runner agreed for the package (``add_delta_``, ``route_scores``, ``route`` and the shape
attributes), built only from what exists today: ``pack_experts`` and the torch backend's ``add_routed_delta_``
(which calls the compiled CPU kernel for float32 CPU tensors). Routing on caller-given ``scores`` (the tensor-parallel
case) runs a dense torch regime here. To be removed once the real runner exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genknowsub_fast import ops
from genknowsub_fast.backends import torch_ops
from genknowsub_fast.backends.packing import check_mixing, pack_experts
from genknowsub_fast.library import ModuleExperts


class RoutedLinear:
    """One module's experts, packed once for a device and dtype, with the routing options fixed."""

    def __init__(
        self,
        experts: ModuleExperts,
        top_k: int,
        temperature: float,
        mixing: str,
        backend: str,
        device: torch.device,
        dtype: torch.dtype,
    ):
        ops._check_routing_args(top_k, temperature, int(experts.a.shape[0]))
        check_mixing(mixing, experts.scaling, experts.ranks)
        self.backend = ops.resolve_backend(backend, device)
        self.packed = pack_experts(
            experts.a,
            experts.b,
            experts.scaling,
            experts.prototypes,
            mixing,
            experts.ranks,
            dtype=dtype,
            device=device,
        )
        self.prototypes32 = experts.prototypes.to(device=device, dtype=torch.float32).contiguous()
        self.top_k, self.temperature, self.mixing = int(top_k), float(temperature), mixing
        self.num_experts, self.rank = self.packed.num_experts, self.packed.rank
        self.d_in, self.d_out = self.packed.d_in, self.packed.d_out

    def route_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 signed x·p."""
        return F.linear(x.to(torch.float32), self.prototypes32)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (T, k) float32 and indices (T, k) int64."""
        return torch_ops.topk_softmax(self.route_scores(x).abs(), self.top_k, self.temperature)

    def add_delta_(self, y: torch.Tensor, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``y += delta`` in place for x (T, d_in), y (T, d_out); ``scores`` (T, E) replaces the routing logits."""
        if x.shape[0] == 0:
            return y
        if scores is None:
            return torch_ops.add_routed_delta_(y, x, self.packed, self.top_k, self.temperature)
        w, idx = torch_ops.topk_softmax(scores.abs(), self.top_k, self.temperature)
        t, e, r = x.shape[0], self.num_experts, self.rank
        h = F.linear(x, self.packed.a.reshape(e * r, -1)).view(t, e, r)
        h = torch.gather(h, 1, idx.unsqueeze(-1).expand(t, self.top_k, r))
        g = torch_ops._mix_coefficients(h, w, self.mixing)
        coef = torch.zeros(t, e, r, dtype=h.dtype, device=h.device).scatter_add_(
            1, idx.unsqueeze(-1).expand(t, self.top_k, r), g
        )
        return y.addmm_(coef.view(t, e * r), self.packed.b_flat)


def prepare(
    experts: ModuleExperts,
    top_k: int = 3,
    temperature: float = 1.0,
    mixing: str = "output",
    backend: str = "auto",
    device=None,
    dtype=None,
) -> RoutedLinear:
    """Validate and pack ``experts`` once (see the module docstring)."""
    device = torch.device(device) if device is not None else experts.a.device
    return RoutedLinear(experts, top_k, temperature, mixing, backend, device, dtype or experts.a.dtype)
