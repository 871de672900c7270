"""Data with known mutual information, for validating estimators.

Shape legend: N samples, D dims.
"""

from __future__ import annotations

import math

import torch


def rho_for(total_mi: float, d: int) -> float:
    """Per-coordinate correlation giving `total_mi` nats over d independent pairs:
    I = -d/2 log(1 - rho^2)."""
    return math.sqrt(1.0 - math.exp(-2.0 * total_mi / d))


def correlated_gaussians(n: int, d: int, total_mi: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y in R^d with y_i = rho x_i + sqrt(1 - rho^2) e_i; true MI = total_mi."""
    g = torch.Generator().manual_seed(seed)
    rho = rho_for(total_mi, d)
    x_ND = torch.randn(n, d, generator=g)
    y_ND = rho * x_ND + math.sqrt(1 - rho * rho) * torch.randn(n, d, generator=g)
    return x_ND, y_ND


def random_gaussian_pair(n: int, dx: int, dy: int, seed: int = 0,
                         cov_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A non-isotropic jointly Gaussian pair with a random covariance (drawn
    from cov_seed, default seed; samples from seed).

    Returns x, y and the analytic MI 1/2 (logdet Sxx + logdet Syy - logdet S)."""
    d = dx + dy
    a_DD = torch.randn(d, d, generator=torch.Generator().manual_seed(seed if cov_seed is None else cov_seed),
                       dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    cov_DD = a_DD @ a_DD.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov_DD)
    z_ND = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T
    mi = 0.5 * (torch.logdet(cov_DD[:dx, :dx]) + torch.logdet(cov_DD[dx:, dx:]) - torch.logdet(cov_DD))
    return z_ND[:, :dx].float(), z_ND[:, dx:].float(), float(mi)


def multinormal(n: int, cov_DD: torch.Tensor, dx: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x = first dx coordinates, y = the rest, of N(0, cov); returns x, y and
    the analytic MI 1/2 (logdet Sxx + logdet Syy - logdet S)."""
    cov_DD = cov_DD.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    z_ND = torch.randn(n, len(cov_DD), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_DD).T
    mi = 0.5 * (torch.logdet(cov_DD[:dx, :dx]) + torch.logdet(cov_DD[dx:, dx:]) - torch.logdet(cov_DD))
    return z_ND[:, :dx].float(), z_ND[:, dx:].float(), float(mi)


def dense_gaussian(n: int, d: int, rho: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """d x d 'dense' multinormal: every pair of the 2d coordinates has
    correlation rho (1.29 nats at d=25, 1.62 at d=50 for rho=0.5)."""
    cov = (1 - rho) * torch.eye(2 * d, dtype=torch.float64) + rho
    return multinormal(n, cov, d, seed)


def sparse_gaussian(n: int, d: int, interacting: int = 2, rho: float = 0.8,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """d x d 'sparse' multinormal: only x_i, y_i for i < interacting are
    correlated (rho); MI = -interacting/2 log(1 - rho^2)."""
    cov = torch.eye(2 * d, dtype=torch.float64)
    for i in range(interacting):
        cov[i, d + i] = cov[d + i, i] = rho
    return multinormal(n, cov, d, seed)


def student_t(n: int, d: int, dof: int, rho: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multivariate Student-t in 2d dims (x_i, y_i correlated rho in the
    dispersion, shared chi-square scale: heavy tails, dependence even at
    rho=0). MI = Gaussian MI of the dispersion + a dof term (Arellano-Valle,
    Contreras-Reyes and Genton 2013)."""
    cov = torch.eye(2 * d, dtype=torch.float64)
    for i in range(d):
        cov[i, d + i] = cov[d + i, i] = rho
    x, y, gauss_mi = multinormal(n, cov, d, seed)
    g = torch.Generator().manual_seed(seed + 7)
    w_N1 = torch.randn(n, dof, generator=g, dtype=torch.float64).pow(2).sum(1, keepdim=True)  # chi2(dof)
    scale = torch.sqrt(dof / w_N1).float()
    lg, dg = math.lgamma, lambda v: float(torch.special.digamma(torch.tensor(v, dtype=torch.float64)))
    h = lambda k: (dof + k) / 2
    term = (lg(h(0)) + lg(h(2 * d)) - 2 * lg(h(d))
            + 2 * h(d) * dg(h(d)) - h(0) * dg(h(0)) - h(2 * d) * dg(h(2 * d)))
    return x * scale, y * scale, gauss_mi + term
