"""Estimators against analytic MI, invariances, monotonicity, degenerate input."""

from __future__ import annotations

import math

import pytest
import torch

from mi_scale.mi import estimators
from mi_scale.mi.synthetic import correlated_gaussians, random_gaussian_pair

N = 2048


@pytest.mark.parametrize("d", [1, 8, 32])
@pytest.mark.parametrize("mi", [0.5, 2.0, 8.0])
def test_gaussian_matches_analytic_mi(d, mi):
    x, y = correlated_gaussians(N, d, mi, seed=1)
    est = float(estimators.build("gaussian")(x, y))
    assert est == pytest.approx(mi, rel=0.05)


# KSG is accurate in low dimensions; at d=8 (16-dim joint space) and at MI
# close to log N it underestimates strongly, a known property of kNN
# estimators (Gao et al. 2015) that `mi-scale mi-check` reports. We test the
# regime where it is a valid reference.
@pytest.mark.parametrize("mi", [0.5, 2.0])
def test_ksg_matches_analytic_mi_in_low_dimension(mi):
    x, y = correlated_gaussians(N, 1, mi, seed=1)
    assert float(estimators.build("ksg")(x, y)) == pytest.approx(mi, rel=0.10)


def test_ksg_refuses_gradients():
    x, y = correlated_gaussians(64, 2, 1.0)
    x.requires_grad_(True)
    with pytest.raises(estimators.EstimatorError, match="ksg is not differentiable"):
        estimators.build("ksg")(x, y)


# InfoNCE is a lower bound <= log N: testable against the truth only where the
# truth is well below log N (0.5 log 2048 = 3.8 nats). Critics are trained on
# separate samples and evaluated on fresh ones. At d=32 a critic trained this
# briefly stays loose (see mi-check); we test d in {1, 8}.
@pytest.mark.parametrize("d", [1, 8])
@pytest.mark.parametrize("mi", [0.5, 2.0])
def test_trained_infonce_close_to_truth_below_half_log_n(d, mi):
    torch.manual_seed(0)
    xt, yt = correlated_gaussians(8 * N, d, mi, seed=11)
    critic = estimators.build("infonce", x_dim=d).fit(xt, yt, steps=600, batch=512)
    x, y = correlated_gaussians(N, d, mi, seed=1)
    with torch.no_grad():
        est = float(critic(x, y))
    assert est == pytest.approx(mi, rel=0.15)
    assert est <= math.log(N)


@pytest.mark.parametrize("d,mi", [(1, 8.0), (8, 8.0), (32, 8.0)])
def test_infonce_never_exceeds_log_n(d, mi):
    torch.manual_seed(0)
    n = 256
    xt, yt = correlated_gaussians(4 * n, d, mi, seed=11)
    critic = estimators.build("infonce", x_dim=d).fit(xt, yt, steps=200, batch=n)
    with torch.no_grad():
        for seed in range(3):
            x, y = correlated_gaussians(n, d, mi, seed=seed)
            assert float(critic(x, y)) <= math.log(n) + 1e-6
            # the bound holds for any critic, even on its own training pairs
            assert float(critic(xt[:n], yt[:n])) <= math.log(n) + 1e-6


def test_gaussian_non_isotropic_and_invariant_to_linear_maps():
    x, y, truth = random_gaussian_pair(N, 6, 10, seed=0)
    gauss = estimators.build("gaussian")
    est = float(gauss(x.double(), y.double()))
    assert est == pytest.approx(truth, rel=0.05)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(10, 10, generator=g, dtype=torch.float64) + 3 * torch.eye(10, dtype=torch.float64)
    mapped = float(gauss(x.double() @ a.T, y.double() @ b.T))
    assert abs(mapped - est) < 1e-4


@pytest.mark.parametrize("name", ["renyi2", "hsic"])
def test_proxies_near_zero_when_independent_and_increasing_in_rho(name):
    est = estimators.build(name)
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 4
    x = torch.randn(n, d, generator=g)
    y_indep = torch.randn(n, d, generator=g)
    values = []
    for rho in [0.0, 0.2, 0.4, 0.6, 0.8, 0.95]:
        y = rho * x + math.sqrt(1 - rho ** 2) * y_indep
        values.append(float(est(x, y)))
    assert abs(values[0]) < 0.02, values
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > 10 * abs(values[0]) + 0.05


DIFFERENTIABLE = ["gaussian", "renyi2", "infonce", "hsic"]


def degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 8, generator=g)
    return {
        "constant layer": (torch.ones(32, 8) * 3.0, base),
        "N < k": (torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)),
        "duplicated rows": (base[:4].repeat(8, 1), base[4:8].repeat(8, 1)),
        "rank deficient": (base[:, :2].repeat(1, 4), base),
        "identical": (base, base.clone()),
        "bf16": (base.bfloat16(), (base + 0.1 * torch.randn(32, 8, generator=g)).bfloat16()),
    }


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("case", list(degenerate_inputs()))
def test_degenerate_inputs_stay_finite(name, case):
    x, y = (t.clone().requires_grad_(True) for t in degenerate_inputs()[case])
    est = estimators.build(name, x_dim=8) if name == "infonce" else estimators.build(name)
    value = est(x, y)
    assert value.dim() == 0 and torch.isfinite(value), (case, value)
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), case
    if case == "constant layer" and name != "infonce":
        assert abs(float(value)) < 1e-6  # a constant carries no information


def test_registry_rejects_unknown_name_with_suggestion():
    with pytest.raises(estimators.EstimatorError) as e:
        estimators.build("gausian")
    assert str(e.value) == ("unknown estimator 'gausian' (did you mean 'gaussian'?); "
                            "choose one of gaussian, renyi2, infonce, hsic, ksg")
