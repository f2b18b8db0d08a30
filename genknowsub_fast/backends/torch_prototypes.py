"""Arrow prototypes in plain PyTorch: the exact r×r method (the compiled extension's fallback) and PEFT's power
iteration (kept to reproduce PEFT's approximate prototypes)."""

from __future__ import annotations

import torch

POWER_ITERS = 15


def exact_prototypes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vectors of every ``B_e A_e`` without forming ΔW, batched, float64 inside.

    With ``A_eᵀ = Q R`` (thin QR), ``ΔWᵀΔW = Q (R BᵀB Rᵀ) Qᵀ``, so the top eigenvector v of the r×r matrix
    ``R BᵀB Rᵀ`` gives ``p = Q v``. Returns (prototypes in A's dtype with a canonical sign, zero mask (E,) bool):
    experts whose ΔW is zero (or numerically zero) get a zero row and a True in the mask.
    """
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    q, rr = torch.linalg.qr(a64.transpose(1, 2))  # (E, d_in, r), (E, r, r)
    gram_b = b64.transpose(1, 2) @ b64  # (E, r, r)
    m = rr @ gram_b @ rr.transpose(1, 2)
    m = 0.5 * (m + m.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(m)  # ascending
    p = (q @ evecs[..., -1:]).squeeze(-1)  # (E, d_in)
    # ΔW counts as zero when its top singular value squared is below rounding of the factor norms.
    scale = a64.square().sum((1, 2)) * b64.square().sum((1, 2))
    zero = evals[:, -1] <= (64 * torch.finfo(torch.float64).eps) ** 2 * scale
    zero |= scale == 0
    p = torch.where(zero[:, None], torch.zeros_like(p), p)
    return largest_entry_positive(p).to(a.dtype), zero


def power_prototypes(
    a: torch.Tensor, b: torch.Tensor, iters: int = POWER_ITERS, rng_seed: int | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """PEFT's approximation: ``iters`` steps of power iteration on ``Aᵀ(BᵀB)A`` per expert.

    Like PEFT, each expert starts from ``randn(d_in)`` drawn from a generator seeded with ``rng_seed`` (the same start
    for every expert), iterates in float32 and casts back to A's dtype.
    """
    rows = []
    for i in range(a.shape[0]):
        a32 = a[i].to(torch.float32)
        b32 = b[i].to(torch.float32)
        c = b32.T @ b32
        gen = None
        if rng_seed is not None:
            gen = torch.Generator(device=a32.device.type)
            gen.manual_seed(int(rng_seed))
        v = torch.randn(a32.shape[1], dtype=torch.float32, device=a32.device, generator=gen)
        v = v / (v.norm() + eps)
        for _ in range(iters):
            w = a32.T @ (c @ (a32 @ v))
            v = w / (w.norm() + eps)
        rows.append(v)
    if not rows:
        return a.new_zeros(0, a.shape[2])
    return torch.stack(rows).to(a.dtype)


def largest_entry_positive(p: torch.Tensor) -> torch.Tensor:
    """Each row times the sign of its largest-magnitude entry (prototypes are defined up to sign; zero rows stay)."""
    if p.numel() == 0:
        return p
    pivot = torch.gather(p, -1, p.abs().argmax(dim=-1, keepdim=True))
    return p * torch.where(pivot < 0, -1.0, 1.0).to(p.dtype)


__all__ = ["exact_prototypes", "power_prototypes", "largest_entry_positive", "POWER_ITERS"]
