"""Dominant singular subspaces of a weight matrix, and projections onto their orthogonal complement.

For W = U S V^T (m x n) and a frozen rank k, the frozen part is W_h = U_h S_h V_h^T with U_h = U[:, :k],
V_h = V^T[:k, :]. A change D of W leaves W_h untouched when it has no component in either frozen
subspace: U_h^T D = 0 and D V_h^T = 0, i.e. D = (I - U_h U_h^T) D (I - V_h^T V_h). The split itself is
PEFT's (peft.tuners.osf.utils.decompose_weight_matrix: fp32 SVD, top-k kept as the frozen part).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.osf.utils import decompose_weight_matrix


def frozen_rank(shape: torch.Size | tuple[int, ...], ratio: float) -> int:
    """How many singular directions of a matrix of `shape` are frozen at `ratio`: floor(ratio * min(m, n)),
    as PEFT's OSF resolves a fractional effective_rank."""
    return int(math.floor(ratio * min(shape) + 1e-9))


class FrozenSubspace:
    """The top-k singular subspace of one weight matrix, taken when created, and the projections that
    keep later changes of the matrix out of it."""

    def __init__(self, weight: torch.Tensor, k: int) -> None:
        self.k = k
        split = decompose_weight_matrix(weight.detach().float(), top_k=k)  # SVD in fp32
        self.u = split["U_high"]  # m x k
        self.s = split["S_high"]  # k
        self.v = split["V_high"]  # k x n (rows: right singular vectors)

    def to(self, device: torch.device) -> None:
        if self.u.device != device:
            self.u, self.s, self.v = self.u.to(device), self.s.to(device), self.v.to(device)

    def project_out(self, delta: torch.Tensor) -> torch.Tensor:
        """(I - U_h U_h^T) delta (I - V_h^T V_h), computed in fp32 in two one-sided steps (4mnk flops)."""
        d = delta.float()
        d = d - self.u @ (self.u.T @ d)
        return d - (d @ self.v.T) @ self.v

    def constrain_(self, weight: torch.Tensor) -> None:
        """weight <- W_h + (I - U_h U_h^T) weight (I - V_h^T V_h), in place: the frozen part restored and
        whatever the optimizer moved into the frozen subspace (Adam's per-element scaling, weight decay)
        removed."""
        # With E = W - W_h: W_h + P E Q = W - U_h a - b V_h, where a = U_h^T E and b = (E - U_h a) V_h^T;
        # U_h^T W_h = S_h V_h and W_h V_h^T = U_h S_h, so W_h itself is never built (8mnk, one m x n GEMM).
        w = weight.float()
        a = self.u.T @ w - self.s[:, None] * self.v
        b = w @ self.v.T - self.u * self.s - self.u @ (a @ self.v.T)
        fixed = torch.addmm(w, torch.cat([self.u, b], dim=1), torch.cat([a, self.v], dim=0), alpha=-1.0)
        weight.copy_(fixed.to(weight.dtype))

    def leak(self, delta: torch.Tensor) -> float:
        """The share of a change's norm that lies in the frozen subspaces (0 when it respects them)."""
        d = delta.float()
        inside = d - self.project_out(d)
        return float(inside.norm() / d.norm().clamp(min=torch.finfo(torch.float32).tiny))
