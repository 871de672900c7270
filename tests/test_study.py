"""The study behind docs/paper-report: the matched-gradient control, the
estimator's ceiling, steps-to-threshold / saturation numbers recomputed from
metrics.jsonl, and a micro depth grid through `sweep` rendering every plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mi_scale.config import ConfigError, load
from mi_scale.mi import MIRegularizer
from mi_scale.mi.estimators import GaussianMI, gaussian_ceiling
from mi_scale.models.mlp import DeepMLP
from mi_scale.train.control import DeepSupervision

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hooked_outputs(model, names):
    acts = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o)) for n in names]
    return acts, handles


def _grad_norm(loss, tensors) -> float:
    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


@pytest.mark.parametrize("weight", [0.01, 1.0])
def test_control_gradient_norm_matches_the_mi_term(weight):
    """The probes' gradient at the hooked layers has the MI term's norm
    (within 10%), measured here independently of the control's own numbers."""
    torch.manual_seed(0)
    model = DeepMLP(in_dim=40, num_classes=10, depth=6, width=32, activation="tanh")
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    reg = MIRegularizer(model, ["blocks.*"], sketch_dim=8, tokens_per_sample=1, weight=weight, seed=0)
    reg.discover(x[:2])
    widths = DeepSupervision.widths(model, reg.layer_names, x[:2])
    control = DeepSupervision(widths, num_classes=10)
    control.attach(model)
    acts, handles = _hooked_outputs(model, reg.layer_names)
    for step in (1, 2):
        reg.set_step(step)
        model(x)
        mi_term, _ = reg.loss(step)
        target = _grad_norm(mi_term, list(acts.values()))  # what the raise-MI arm delivers
        aux, info = control.loss(y, mi_term)
        got = _grad_norm(aux, list(acts.values()))
        assert target > 0
        assert abs(got - target) <= 0.1 * target, (got, target)
        assert info["mi_grad_norm"] == pytest.approx(target, rel=1e-6)
        # the probes really are trained by it
        aux.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in control.probes.parameters())
        control.zero_grad()
    for h in handles:
        h.remove()


def test_control_is_refused_at_zero3_and_without_a_weight():
    with pytest.raises(ConfigError, match=r"^mi\.control: invalid value 'deep_supervision': the matched-gradient "
                                          r"control cannot run at deepspeed\.zero_stage=3"):
        load(None, ["mi.control=deep_supervision", "mi.weight=0.1", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"^mi\.weight: invalid value 0\.0: mi\.control=deep_supervision"):
        load(None, ["mi.control=deep_supervision", "mi.weight=0"])
    with pytest.raises(ConfigError, match=r"mi\.control: invalid value 'deep'"):
        load(None, ["mi.control=deep"])


def test_gaussian_ceiling_is_the_estimators_maximum():
    assert gaussian_ceiling(16, 0.1) == pytest.approx(13.2858, abs=1e-4)
    x = torch.randn(20000, 16, dtype=torch.float64)
    est = GaussianMI(shrinkage=0.1, bias_correction=False)
    assert float(est(x, x)) == pytest.approx(gaussian_ceiling(16, 0.1), rel=2e-3)
    # any other dependence reports less
    assert float(est(x, x + 0.3 * torch.randn_like(x))) < gaussian_ceiling(16, 0.1)
