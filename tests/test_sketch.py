"""Sketches: cross-process determinism, JL distances, MI through shared projections."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mi_scale.mi import estimators
from mi_scale.mi.sketch import (Sketcher, as_tokens, random_projection, select_tokens,
                                token_fractions)

PROBE = ("import torch; from mi_scale.mi.sketch import random_projection, token_fractions; "
         "r = random_projection(3, 96, 16); u = token_fractions(3, 41, 8); "
         "print(float(r.double().sum()), float((r.double() ** 2).sum()), u.tolist())")


def test_deterministic_across_processes():
    outs = {subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = random_projection(3, 96, 16)
    u = token_fractions(3, 41, 8)
    assert outs == {f"{float(here.double().sum())} {float((here.double() ** 2).sum())} {u.tolist()}\n"}


def test_projection_depends_on_seed_and_width_only():
    assert torch.equal(random_projection(0, 64, 8), random_projection(0, 64, 8))
    assert not torch.equal(random_projection(0, 64, 8), random_projection(1, 64, 8))
    assert not torch.equal(random_projection(0, 64, 8)[:32], random_projection(0, 32, 8))


def test_pairwise_distances_within_jl_bound():
    # JL: k >= 4 ln(n) / (eps^2/2 - eps^3/3) keeps every squared distance
    # within (1 +- eps) with probability >= 1 - 1/n.
    n, d, eps = 40, 1024, 0.5
    k = math.ceil(4 * math.log(n) / (eps ** 2 / 2 - eps ** 3 / 3))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    r = random_projection(0, d, k)
    ratio = torch.pdist(x @ r) ** 2 / torch.pdist(x) ** 2
    assert ratio.min() > 1 - eps and ratio.max() < 1 + eps, (k, ratio.min(), ratio.max())
    # and the mean is unbiased: E ||R^T v||^2 = ||v||^2
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rho,k", [(0.5, 16), (0.8, 32)])
def test_shared_projection_keeps_analytic_mi(rho, k):
    """x, y = rho x + noise, width 256: sketched with the SAME matrix, MI is
    exactly -k/2 log(1 - rho^2)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 256, generator=g)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(4096, 256, generator=g)
    sk = Sketcher("random", k, seed=0)
    sx, sy = sk.project("a", x), sk.project("b", y)
    truth = -k / 2 * math.log(1 - rho ** 2)
    assert float(estimators.build("gaussian")(sx, sy)) == pytest.approx(truth, rel=0.05)


def test_identity_plus_noise_shows_high_mi_not_zero():
    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(2048, 512, generator=g)
    h1 = h0 + 0.1 * torch.randn(2048, 512, generator=g)
    sk = Sketcher("random", 32, seed=0)
    shared = float(estimators.build("gaussian")(sk.project("l0", h0), sk.project("l1", h1)))
    # analytic for the shared sketch: -k/2 log(1 - rho^2), rho = 1/sqrt(1.01)
    assert shared == pytest.approx(-16 * math.log(1 - 1 / 1.01), rel=0.05)
    # what independent projections would report: near zero
    indep = float(estimators.build("gaussian")(h0 @ random_projection(0, 512, 32),
                                               h1 @ random_projection(1, 512, 32)))
    assert shared > 50 and abs(indep) < 0.03 * shared


def test_token_selection_shapes_and_alignment():
    u = token_fractions(0, 5, 4)
    assert torch.all((u[1:] - u[:-1]) > 0) and 0 <= float(u[0]) and float(u[-1]) < 1
    h_NTD = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    rows = select_tokens(h_NTD, u)
    assert rows.shape == (8, 3)
    pos = (u * 16).floor().long()
    assert torch.equal(rows[:4], h_NTD[0, pos]) and torch.equal(rows[4:], h_NTD[1, pos])
    # one stratum per token: P = T takes every position exactly once
    assert sorted((token_fractions(0, 9, 16) * 16).floor().long().tolist()) == list(range(16))
    assert as_tokens(torch.zeros(2, 5)).shape == (2, 1, 5)
    assert as_tokens(torch.zeros(2, 6, 4, 4)).shape == (2, 16, 6)
    with pytest.raises(ValueError, match=r"cannot sketch an activation of shape \(2,\)"):
        as_tokens(torch.zeros(2))


def test_learned_sketch_starts_at_random_projection_and_trains():
    sk = Sketcher("learned", 8, seed=4)
    sk.add_layer("blocks.0", 32)
    x = torch.randn(10, 32)
    assert torch.allclose(sk.project("blocks.0", x), x @ random_projection(4, 32, 8), atol=1e-6)
    assert [p.shape for p in sk.parameters()] == [torch.Size([8, 32])]
