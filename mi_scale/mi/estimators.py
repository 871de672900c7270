"""Mutual-information estimators behind one registry.

    est = build(name, **kwargs)     # a torch.nn.Module
    value = est(x_NK, y_NK)         # 0-dim float32 tensor

Shape legend: N rows (samples x sampled tokens), K sketch dims, M critic
embedding dims.

All differentiable estimators compute internally in float64 (the inputs are
small sketches, so this is cheap) and stay finite, with finite gradients, on
degenerate input: constant columns, rank-deficient batches, N < K, duplicated
rows, bf16 input.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn as nn

from mi_scale.errors import UserFixableError

_EPS = 1e-8


class EstimatorError(UserFixableError, ValueError):
    pass


def _standardize(x_NK: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance columns; constant columns become exactly 0."""
    x_NK = x_NK - x_NK.mean(0, keepdim=True)
    var_K = (x_NK * x_NK).mean(0, keepdim=True)
    return x_NK * torch.rsqrt(var_K + _EPS)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 in, float64 out; everything else (fp32, bf16, fp16) gives float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pair(x_NK: torch.Tensor, y_NK: torch.Tensor, finite: bool = True) -> None:
    """Shapes, and (finite=True) one finiteness check for both inputs. The
    check reads one flag back from the device: MIRegularizer turns it off
    (check_finite=False) and checks a whole step's sketches at once."""
    if x_NK.dim() != 2 or y_NK.dim() != 2:
        raise EstimatorError(f"estimators take 2-D (N, K) inputs, got {tuple(x_NK.shape)} and {tuple(y_NK.shape)}")
    if x_NK.shape[0] != y_NK.shape[0]:
        raise EstimatorError(f"x and y need the same number of rows, got {x_NK.shape[0]} and {y_NK.shape[0]}")
    if x_NK.shape[0] < 2:
        raise EstimatorError(f"need at least 2 rows to estimate MI, got {x_NK.shape[0]}")
    if finite and not bool(torch.isfinite(x_NK).all() & torch.isfinite(y_NK).all()):
        raise EstimatorError(f"input contains {_nonfinite_kinds(x_NK, y_NK)}: MI of non-finite values is "
                             "undefined; remove or replace them (e.g. torch.nan_to_num) before estimating")


def _nonfinite_kinds(x_NK: torch.Tensor, y_NK: torch.Tensor) -> str:
    """'NaN in x, Inf in y'-style description (called only on the error path)."""
    parts = []
    for name, t in (("x", x_NK), ("y", y_NK)):
        kinds = [k for k, bad in (("NaN", torch.isnan(t).any()), ("Inf", torch.isinf(t).any())) if bad]
        if kinds:
            parts.append(f"{' and '.join(kinds)} in {name}")
    return ", ".join(parts)


@functools.lru_cache(maxsize=4096)
def _gaussian_logdet_bias(d: int, n: int) -> float:
    """E[log det S] - log det Sigma for the sample covariance S of n Gaussian
    rows in d dims (Wishart with n-1 dof). Defined when n - 1 > d - 1.
    Cached: it is called for the same (d, n) every training step."""
    if n - d < 1 or d == 0:
        return 0.0
    dof = n - 1
    half = (dof - torch.arange(d, dtype=torch.float64)) / 2.0
    return d * math.log(2.0 / dof) + float(torch.special.digamma(half).sum())


class GaussianMI(nn.Module):
    """I = 1/2 (logdet Sx + logdet Sy - logdet Sxy) on standardized inputs.

    Exact for jointly Gaussian data; a lower bound-like proxy otherwise
    (the Gaussian with the same covariance has the least MI). `shrinkage`
    pulls the correlation matrix toward identity so the log-dets stay finite
    when N <= K or columns are constant. `bias_correction` removes the
    Wishart small-sample bias of each log-det (a constant, so gradients are
    unaffected); it switches off when N <= dx + dy.
    """

    differentiable = True
    check_finite = True
    unit = "nats"

    def __init__(self, shrinkage: float = 1e-8, bias_correction: bool = True):
        super().__init__()
        if not 0.0 < shrinkage < 1.0:
            raise EstimatorError(f"gaussian: shrinkage must be in (0, 1), got {shrinkage!r}")
        self.shrinkage = shrinkage
        self.bias_correction = bias_correction

    def forward(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        _check_pair(x_NK, y_NK, self.check_finite)
        n, dx, dy = x_NK.shape[0], x_NK.shape[1], y_NK.shape[1]
        z_ND = _standardize(torch.cat([x_NK, y_NK], 1).to(torch.float64))
        corr_DD = z_ND.T @ z_ND / n
        # Constant columns carry no information and add no sampling bias:
        # only varying ones (unit diagonal after standardizing) count below.
        varying = torch.diagonal(corr_DD).detach() > 0.5
        eye = torch.eye(dx + dy, dtype=corr_DD.dtype, device=corr_DD.device)
        corr_DD = (1 - self.shrinkage) * corr_DD + self.shrinkage * eye
        mi = 0.5 * (_logdet_spd(corr_DD[:dx, :dx]) + _logdet_spd(corr_DD[dx:, dx:]) - _logdet_spd(corr_DD))
        if self.bias_correction:
            mi = mi - self._bias(n, int(varying[:dx].sum()), int(varying[dx:].sum()))
        return mi.to(_out_dtype(x_NK))

    def _bias(self, n: int, ex: int, ey: int) -> float:
        """Wishart bias of 1/2 (logdet Sx + logdet Sy - logdet Sxy), ex, ey varying columns."""
        if n <= ex + ey + 1:
            return 0.0
        return 0.5 * (_gaussian_logdet_bias(ex, n) + _gaussian_logdet_bias(ey, n)
                      - _gaussian_logdet_bias(ex + ey, n))

    def chain_dtype(self, like: torch.Tensor) -> torch.dtype:
        """float64 for float64 input or shrinkage < 0.01; float32 otherwise.

        At shrinkage s every eigenvalue of the shrunk correlation is >= s, so
        for s >= 0.01 float32 Cholesky cannot fail on finite input and its
        rounding stays far below 1e-3 nats (measured: test_estimators.py,
        test_chain_float32_matches_float64). Training uses s = 0.1."""
        if like.dtype == torch.float64 or self.shrinkage < 0.01:
            return torch.float64
        return torch.float32

    def chain(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """MI of every adjacent pair of `layers` (L tensors, each (N, K), same
        K): a (L-1,) tensor, pair l = I(layers[l]; layers[l+1]), equal to
        `forward` on each pair.

        Cost, versus L-1 separate `forward` calls: each layer is standardized
        once; the L diagonal and L-1 off-diagonal covariance blocks come from
        two batched matmuls; each layer's (K, K) block is factorized once
        (shared by its two pairs). For joint = [[A, B], [B^T, C]],
        logdet joint = logdet A + logdet S with the Schur complement
        S = C - W^T W, W = chol(A)^-1 B, so
        I = 1/2 (logdet A + logdet C - logdet joint) = 1/2 (logdet C - logdet S):
        one batched triangular solve, one batched matmul and one batched
        (K, K) Cholesky for all pairs. Only (K, K) factorizations: on CPU a
        (2K, 2K) one costs ~7x a (K, K) one (measured, K=64). No host sync
        unless bias_correction (a host-side constant) is on.
        """
        if len(layers) < 2:
            raise EstimatorError(f"gaussian.chain needs at least 2 layers, got {len(layers)}")
        for a in layers[1:]:
            _check_pair(layers[0], a, finite=False)
            if a.shape[1] != layers[0].shape[1]:
                raise EstimatorError(f"gaussian.chain needs equal widths, got {[t.shape[1] for t in layers]}")
        return self.chain_concat(torch.cat(layers, 1), layers[0].shape[1])

    def chain_concat(self, cat_NC: torch.Tensor, k: int) -> torch.Tensor:
        """`chain` on the layers already side by side: (N, L*K), layer l in
        columns l*K:(l+1)*K (saves a copy when the caller holds them so)."""
        n, num = cat_NC.shape[0], cat_NC.shape[1] // k
        if self.check_finite:
            _check_pair(cat_NC, cat_NC[:, :0])
        dtype = self.chain_dtype(cat_NC)
        z_LNK = _standardize(cat_NC.to(dtype)).view(n, num, k).transpose(0, 1)
        s = self.shrinkage
        eye = torch.eye(k, dtype=dtype, device=z_LNK.device)
        zt_LKN = z_LNK.transpose(1, 2)
        diag_LKK = torch.baddbmm(eye, zt_LKN, z_LNK, beta=s, alpha=(1 - s) / n)  # shrunk correlations
        off_PKK = torch.bmm(zt_LKN[:-1], z_LNK[1:]) * ((1 - s) / n)
        chol_LKK, info_L = torch.linalg.cholesky_ex(diag_LKK)
        w_PKK = torch.linalg.solve_triangular(chol_LKK[:-1], off_PKK, upper=False)
        schur_PKK = torch.baddbmm(diag_LKK[1:], w_PKK.transpose(1, 2), w_PKK, alpha=-1.0)
        chol_s_PKK, info_P = torch.linalg.cholesky_ex(schur_PKK)
        ok_P = (info_L[:-1] == 0) & (info_L[1:] == 0) & (info_P == 0)
        # A failed factorization (only possible for tiny shrinkage) gives NaN
        # for its pairs, without a host check; log(1) keeps the graph finite.
        d_LK = torch.where((info_L == 0)[:, None], torch.diagonal(chol_LKK, dim1=1, dim2=2), 1.0)
        d_PK = torch.where((info_P == 0)[:, None], torch.diagonal(chol_s_PKK, dim1=1, dim2=2), 1.0)
        mi_P = d_LK[1:].log().sum(1) - d_PK.log().sum(1)  # halves of the log-dets
        mi_P = torch.where(ok_P, mi_P, float("nan"))
        if self.bias_correction:
            varying_LK = torch.diagonal(diag_LKK, dim1=1, dim2=2).detach() > s + (1 - s) * 0.5
            counts = varying_LK.sum(1).tolist()
            mi_P = mi_P - torch.tensor([self._bias(n, a, b) for a, b in zip(counts[:-1], counts[1:])],
                                       dtype=dtype, device=mi_P.device)
        return mi_P.to(_out_dtype(cat_NC))


def _logdet_spd(a_DD: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a_DD)
    if int(info) != 0:  # numerically indefinite: fall back to the symmetric eigen-solver
        return torch.linalg.eigvalsh(a_DD).clamp_min(1e-12).log().sum()
    return 2.0 * torch.diagonal(chol).log().sum()


def _gaussian_gram(z_NK: torch.Tensor, bandwidth: float | None) -> torch.Tensor:
    """Gaussian kernel Gram matrix; bandwidth by the median heuristic (detached)."""
    sq_NN = torch.cdist(z_NK, z_NK).pow(2)
    if bandwidth is None:
        off = sq_NN.detach()[~torch.eye(len(z_NK), dtype=torch.bool, device=z_NK.device)]
        sigma2 = off.median().clamp_min(1e-6) if off.numel() else torch.tensor(1.0, dtype=z_NK.dtype)
    else:
        sigma2 = torch.tensor(bandwidth ** 2, dtype=z_NK.dtype, device=z_NK.device)
    return torch.exp(-sq_NN / (2 * sigma2))


class Renyi2MI(nn.Module):
    """Matrix-based Renyi alpha=2 MI (Sanchez Giraldo et al. 2015).

    S2(A) = -log tr(A^2) = -log ||A||_F^2 for a unit-trace Gram matrix A, and
    I = S2(Ax) + S2(Ay) - S2(Ax o Ay / tr(Ax o Ay)). No eigendecomposition is
    needed for alpha=2. O(N^2) memory in the number of rows.
    """

    differentiable = True
    check_finite = True
    unit = "nats (Renyi-2)"

    def __init__(self, bandwidth: float | None = None):
        super().__init__()
        self.bandwidth = bandwidth

    @staticmethod
    def _s2(a_NN: torch.Tensor) -> torch.Tensor:
        a_NN = a_NN / torch.diagonal(a_NN).sum()
        return -torch.log(a_NN.pow(2).sum())

    def forward(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        _check_pair(x_NK, y_NK, self.check_finite)
        kx = _gaussian_gram(_standardize(x_NK.to(torch.float64)), self.bandwidth)
        ky = _gaussian_gram(_standardize(y_NK.to(torch.float64)), self.bandwidth)
        return (self._s2(kx) + self._s2(ky) - self._s2(kx * ky)).to(_out_dtype(x_NK))


def _double_center(k_NN: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/N, in O(N^2) instead of two N^3 matmuls."""
    return k_NN - k_NN.mean(0, keepdim=True) - k_NN.mean(1, keepdim=True) + k_NN.mean()


class HSICDependence(nn.Module):
    """Normalized HSIC (CKA) in [0, 1]: a dependence proxy, NOT MI in nats.

    kernel="gaussian" (median heuristic) sees nonlinear dependence;
    kernel="linear" is O(N K^2) and cheap for large N.
    """

    differentiable = True
    check_finite = True
    unit = "cka (not nats)"

    def __init__(self, kernel: str = "gaussian", bandwidth: float | None = None):
        super().__init__()
        if kernel not in ("gaussian", "linear"):
            raise EstimatorError(f"hsic: kernel must be 'gaussian' or 'linear', got {kernel!r}")
        self.kernel = kernel
        self.bandwidth = bandwidth

    def forward(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        _check_pair(x_NK, y_NK, self.check_finite)
        x = _standardize(x_NK.to(torch.float64))
        y = _standardize(y_NK.to(torch.float64))
        if self.kernel == "linear":
            # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centered features.
            xy = (y.T @ x).pow(2).sum()
            xx = (x.T @ x).pow(2).sum()
            yy = (y.T @ y).pow(2).sum()
        else:
            kx = _double_center(_gaussian_gram(x, self.bandwidth))
            ky = _double_center(_gaussian_gram(y, self.bandwidth))
            xy, xx, yy = (kx * ky).sum(), kx.pow(2).sum(), ky.pow(2).sum()
        return (xy / torch.sqrt(xx * yy + _EPS)).to(_out_dtype(x_NK))


class _CriticTower(nn.Module):
    """One side of the separable critic: a linear map plus an MLP residual.

    The linear path learns the bilinear x^T A y part of the optimal critic
    for Gaussian-like data quickly; the MLP captures what is left."""

    def __init__(self, d: int, hidden: int, embed: int):
        super().__init__()
        self.linear = nn.Linear(d, embed)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, embed))

    def forward(self, x_NK: torch.Tensor) -> torch.Tensor:
        return self.linear(x_NK) + self.mlp(x_NK)


class InfoNCE(nn.Module):
    """InfoNCE lower bound with a separable critic f(x, y) = g(x) . h(y).

    I >= mean_i [f(x_i, y_i) - logsumexp_j f(x_i, y_j)] + log N, so the value
    is bounded by log N (N = rows of the gathered global batch). The critic's
    parameters train with the model (the estimate is maximized over them);
    `fit()` trains it standalone for validation.
    """

    differentiable = True
    check_finite = True
    unit = "nats (lower bound, <= log N)"

    def __init__(self, x_dim: int, y_dim: int | None = None, hidden: int = 64, embed: int = 32):
        super().__init__()
        y_dim = x_dim if y_dim is None else y_dim

        self.g = _CriticTower(x_dim, hidden, embed)
        self.h = _CriticTower(y_dim, hidden, embed)
        self.x_dim, self.y_dim = x_dim, y_dim

    def forward(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        _check_pair(x_NK, y_NK, self.check_finite)
        if x_NK.shape[1] != self.x_dim or y_NK.shape[1] != self.y_dim:
            raise EstimatorError(f"infonce critic was built for dims ({self.x_dim}, {self.y_dim}), "
                                 f"got ({x_NK.shape[1]}, {y_NK.shape[1]})")
        w = self.g.linear.weight
        x = _standardize(x_NK.to(w.dtype))
        y = _standardize(y_NK.to(w.dtype))
        scores_NN = self.g(x) @ self.h(y).T
        n = scores_NN.shape[0]
        nce = torch.diagonal(scores_NN).mean() - torch.logsumexp(scores_NN, dim=1).mean() + math.log(n)
        return nce.to(_out_dtype(x_NK))

    def fit(self, x_NK: torch.Tensor, y_NK: torch.Tensor, steps: int = 300, lr: float = 1e-3,
            batch: int | None = None, seed: int = 0, val_fraction: float = 0.2, eval_every: int = 25,
            patience: int = 8) -> "InfoNCE":
        """Train the critic alone on a fixed sample (x, y), without overfitting.

        A `val_fraction` of the rows is held out; every `eval_every` steps the
        bound is evaluated on it, and training stops once `patience`
        evaluations in a row did not improve it. The critic with the best
        held-out bound is restored. Afterwards: `heldout_mi` (that bound, in
        nats; a valid lower bound on fresh data from the held-out rows'
        distribution), `best_step`, `steps_run`.

        Minibatches are drawn from the training rows, so the same pairs recur
        (a fixed sample), unlike MIRegularizer, whose critics see fresh
        sketches every step and cannot memorize them."""
        _check_pair(x_NK, y_NK, self.check_finite)
        if not 0.0 < val_fraction < 1.0:
            raise EstimatorError(f"infonce.fit: val_fraction must be in (0, 1), got {val_fraction!r}")
        gen = torch.Generator().manual_seed(seed)
        n = len(x_NK)
        perm = torch.randperm(n, generator=gen)
        n_val = max(2, int(round(val_fraction * n)))
        if n - n_val < 2:
            raise EstimatorError(f"infonce.fit: {n} rows leave fewer than 2 for training after holding "
                                 f"out {n_val}; pass more rows or a smaller val_fraction")
        val, train = perm[:n_val], perm[n_val:]
        xv, yv, xt, yt = x_NK[val], y_NK[val], x_NK[train], y_NK[train]
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        best, best_step, best_state, bad = -math.inf, 0, copy.deepcopy(self.state_dict()), 0
        step = 0
        for step in range(1, steps + 1):
            idx = torch.randperm(len(xt), generator=gen)[: batch or len(xt)]
            loss = -self(xt[idx], yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    value = float(self(xv, yv))
                if value > best:
                    best, best_step, best_state, bad = value, step, copy.deepcopy(self.state_dict()), 0
                else:
                    bad += 1
                    if bad >= patience:
                        break
        self.load_state_dict(best_state)
        if best_step == 0:  # no evaluation ran (steps == 0): score the untrained critic
            with torch.no_grad():
                best = float(self(xv, yv))
        self.heldout_mi, self.best_step, self.steps_run = best, best_step, step
        return self


def _rank_transform(x_NK: torch.Tensor) -> torch.Tensor:
    """Each column replaced by its ranks (the empirical copula): invariant to
    any strictly increasing map of a coordinate, and free of heavy tails."""
    cols_KN = x_NK.T.contiguous()
    sorted_KN = cols_KN.sort(1).values
    lo = torch.searchsorted(sorted_KN, cols_KN)
    hi = torch.searchsorted(sorted_KN, cols_KN, right=True)
    return ((lo + hi - 1).to(torch.float64) / 2).T  # mid-ranks: ties (constant columns) stay tied


class KSG(nn.Module):
    """Kraskov-Stoegbauer-Grassberger estimator (algorithm 1).

    metric: the norm within X and within Y ("euclidean" or "max"); the joint
    distance is the max of the two, as in KSG. transform="rank" replaces each
    coordinate by its ranks first, so the estimate is invariant to monotone
    maps of each coordinate (MI is) and robust to heavy tails. Defaults
    (euclidean, rank) were picked from `mi-scale mi-check` (README).

    Not differentiable: for monitoring and validation only. O(N^2) memory.
    Known to underestimate strongly dependent variables (large MI relative to
    log N); see Gao et al. 2015.
    """

    differentiable = False
    check_finite = True
    unit = "nats"

    def __init__(self, k: int = 3, metric: str = "euclidean", transform: str = "rank"):
        super().__init__()
        if metric not in ("euclidean", "max"):
            raise EstimatorError(f"ksg: metric must be 'euclidean' or 'max', got {metric!r}")
        if transform not in ("none", "rank"):
            raise EstimatorError(f"ksg: transform must be 'none' or 'rank', got {transform!r}")
        if not (isinstance(k, int) and k >= 1):
            raise EstimatorError(f"ksg: k must be an integer >= 1, got {k!r}")
        self.k, self.metric, self.transform = k, metric, transform

    @torch.no_grad()
    def _estimate(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        x, y = x_NK.to(torch.float64), y_NK.to(torch.float64)
        if self.transform == "rank":
            x, y = _rank_transform(x), _rank_transform(y)
        # Tiny fixed noise breaks ties (duplicated rows, constant columns),
        # which kNN counts assume away (Kraskov et al. 2004 do the same).
        g = torch.Generator(device=x.device).manual_seed(0)
        x = _standardize(x) + 1e-10 * torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        y = _standardize(y) + 1e-10 * torch.randn(y.shape, generator=g, dtype=y.dtype, device=y.device)
        n = len(x)
        k = min(self.k, n - 1)
        p = 2.0 if self.metric == "euclidean" else float("inf")
        dx = torch.cdist(x, x, p=p)
        dy = torch.cdist(y, y, p=p)
        dz = torch.maximum(dx, dy)
        dz.fill_diagonal_(float("inf"))
        eps_N = dz.kthvalue(k, dim=1).values
        nx = (dx < eps_N[:, None]).sum(1) - 1  # minus the point itself
        ny = (dy < eps_N[:, None]).sum(1) - 1
        dg = torch.special.digamma
        f64 = lambda v: torch.tensor(float(v), dtype=torch.float64)
        mi = dg(f64(k)) + dg(f64(n)) - (dg(nx.double() + 1) + dg(ny.double() + 1)).mean()
        return mi.clamp_min(0.0).to(torch.float32)

    def forward(self, x_NK: torch.Tensor, y_NK: torch.Tensor) -> torch.Tensor:
        _check_pair(x_NK, y_NK, self.check_finite)
        if torch.is_grad_enabled() and (x_NK.requires_grad or y_NK.requires_grad):
            raise EstimatorError(
                "ksg is not differentiable: use it for monitoring only (mi.weight=0, or call it under "
                "torch.no_grad()), or pick a differentiable estimator: gaussian, renyi2, infonce, hsic")
        return self._estimate(x_NK, y_NK)


REGISTRY: dict[str, type[nn.Module]] = {
    "gaussian": GaussianMI,
    "renyi2": Renyi2MI,
    "infonce": InfoNCE,
    "hsic": HSICDependence,
    "ksg": KSG,
}


def build(name: str, **kwargs) -> nn.Module:
    """Build an estimator by name. `infonce` needs `x_dim` (and optionally `y_dim`)."""
    if name not in REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EstimatorError(f"unknown estimator {name!r}{hint}; choose one of {', '.join(REGISTRY)}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as e:
        raise EstimatorError(f"estimator {name!r}: bad arguments {kwargs}: {e}") from None


def gaussian_ceiling(k: int, shrinkage: float) -> float:
    """Largest value GaussianMI(shrinkage, bias_correction=False) can report
    for two k-dim sketches: y a copy of x with uncorrelated columns. Each of
    the k dims then has the shrunk 2x2 correlation [[1, 1-s], [1-s, 1]] with
    determinant s(2-s), so I = -k/2 log(s(2-s)) (13.29 nats for k=16, s=0.1).
    A logged MI near it says the estimator is saturated, not the layers."""
    if not 0.0 < shrinkage < 1.0:
        raise EstimatorError(f"gaussian_ceiling: shrinkage must be in (0, 1), got {shrinkage!r}")
    return -0.5 * k * math.log(shrinkage * (2.0 - shrinkage))
