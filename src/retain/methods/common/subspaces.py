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


def top_left_directions(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `rank` left singular vectors of `matrix` (columns) and their singular values, fp32 SVD."""
    u, s, _ = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :rank], s[:rank]


class FrequentDirections:
    """A Frequent Directions sketch (Liberty, 2013; Ghashami et al., 2016) of the column space of a stream
    of matrices A_1, A_2, ... (each d x n_t), kept as B (d x ell) with B B^T ~ sum_t A_t A_t^T.

    Each update appends the new columns, takes the SVD of [B, A_t] and shrinks every squared singular value
    by the (ell + 1)-th one, which keeps 0 <= A A^T - B B^T and ||A A^T - B B^T||_2 <= ||A - A_k||_F^2 /
    (ell - k) for every k < ell (A: all the columns seen). `add` takes A_t already reduced to its top
    directions (U_r S_r, as CoSO feeds it) or whole.
    """

    def __init__(self, dim: int, ell: int) -> None:
        self.ell = min(ell, dim)
        self.sketch = torch.zeros(dim, 0)

    def add(self, columns: torch.Tensor) -> None:
        stacked = torch.cat([self.sketch.to(columns.device), columns.float()], dim=1)
        u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
        if s.numel() > self.ell:
            shrink = s[self.ell] ** 2
            s = torch.sqrt(torch.clamp(s[: self.ell] ** 2 - shrink, min=0.0))
            u = u[:, : self.ell]
        self.sketch = u * s

    def directions(self, energy: float) -> torch.Tensor:
        """The sketch's leading left singular vectors that hold less than `energy` of its squared mass:
        U[:, :k] with k = #{i : sum_{j <= i} s_j^2 / sum_j s_j^2 < energy} (GPM's and CoSO's rule)."""
        u, s, _ = torch.linalg.svd(self.sketch, full_matrices=False)
        mass = s**2
        total = mass.sum()
        if total <= 0:
            return u[:, :0]
        k = int((torch.cumsum(mass, dim=0) / total < energy).sum())
        return u[:, :k]


def extend_orthonormal_basis(
    basis: torch.Tensor, directions: torch.Tensor, tol: float = 1e-3
) -> torch.Tensor:
    """[basis, Q]: `directions` with their part in span(basis) removed, orthonormalised (QR), and those left
    with less than `tol` of their length dropped (already covered by the basis)."""
    basis = basis.to(directions.device).float()
    if directions.shape[1] == 0:
        return basis
    rest = directions.float()
    if basis.shape[1]:
        rest = rest - basis @ (basis.T @ rest)
    q, r = torch.linalg.qr(rest)
    keep = r.diagonal().abs() > tol
    return torch.cat([basis, q[:, keep]], dim=1)
