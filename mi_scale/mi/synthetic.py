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
