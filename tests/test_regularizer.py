"""MIRegularizer in a plain training loop: layer matching, schedule, hooks,
and the direction of the effect on measured MI."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mi_scale.mi import MIRegularizer, RegularizerError
from mi_scale.models import DeepMLP


def mlp(depth=4, width=16):
    torch.manual_seed(0)
    return DeepMLP(8, 3, depth=depth, width=width, activation="tanh")


def test_layer_patterns_match_one_component_and_follow_forward_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(4, 4)
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))  # a runs first although defined second

    m = Reordered()
    reg = MIRegularizer(m, ["b", "a"], sketch_dim=2, weight=0.0)
    m(torch.randn(16, 4))
    _, mi = reg.loss(0)
    assert list(mi) == ["a->b"]
    reg2 = MIRegularizer(mlp(), ["blocks.*"], sketch_dim=2)
    assert reg2.layer_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # not blocks.0.fc


def test_unknown_pattern_and_unfired_hooks_are_clear_errors():
    with pytest.raises(RegularizerError) as e:
        MIRegularizer(mlp(), ["block.*"])
    assert str(e.value).startswith("mi.layers: pattern 'block.*' matches no module (close names: ")
    with pytest.raises(RegularizerError, match=r"matches 1 module\(s\) \['head'\]"):
        MIRegularizer(mlp(), ["head"])

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused, self.last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.last(self.used(x))

    m = Skips()
    reg = MIRegularizer(m, ["used", "unused", "last"], sketch_dim=2)
    m(torch.randn(8, 4))
    with pytest.raises(RegularizerError) as e:
        reg.loss(0)
    assert str(e.value) == ("hooked layers ['unused'] did not fire in the last forward pass; "
                            "hook modules that run in forward() (check mi.layers)")


def test_schedule_warmup_every_and_measure_only_steps():
    m = mlp()
    reg = MIRegularizer(m, ["blocks.*"], sketch_dim=4, weight=0.2, every=2, log_every=3, warmup_steps=4)
    x = torch.randn(64, 8)
    seen = {}
    for step in range(7):
        m(x)
        loss, mi = reg.loss(step)
        seen[step] = (loss.requires_grad, bool(mi))
    # every=2 -> gradient at 0, 2, 4, 6; log_every=3 -> measured without gradient at 3
    assert seen == {0: (True, True), 1: (False, False), 2: (True, True), 3: (False, True),
                    4: (True, True), 5: (False, False), 6: (True, True)}
    assert reg.schedule.weight_at(0) == 0.0 and reg.schedule.weight_at(2) == pytest.approx(0.1)
    assert reg.schedule.weight_at(10) == pytest.approx(0.2)


def test_reg_loss_equals_minus_weighted_sum_and_pair_weights():
    m = mlp()
    reg = MIRegularizer(m, ["blocks.*"], sketch_dim=4, weight=0.5, pair_weights=[1.0, 0.0, 2.0])
    m(torch.randn(128, 8))
    loss, mi = reg.loss(0)
    v = list(mi.values())
    assert float(loss) == pytest.approx(-0.5 * (v[0] + 2 * v[2]), rel=1e-5)
    with pytest.raises(RegularizerError, match="mi.pair_weights: has 2 entries but there are 3 adjacent pairs"):
        bad = MIRegularizer(mlp(), ["blocks.*"], sketch_dim=4, pair_weights=[1.0, 1.0])
        bad.discover(torch.randn(4, 8))


def test_hooks_removable_and_sketches_released():
    m = mlp()
    reg = MIRegularizer(m, ["blocks.*"], sketch_dim=4)
    m(torch.randn(32, 8))
    assert set(reg._sketches) == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    assert all(s.shape == (32, 1, 4) for s in reg._sketches.values())  # the sketch, not the activation
    reg.loss(0)
    assert reg._sketches == {}
    reg.remove()
    m(torch.randn(32, 8))
    assert reg._sketches == {}
    assert not any(mod._forward_hooks for mod in m.modules())


def train_and_measure(weight: float, steps: int = 300) -> float:
    torch.manual_seed(0)
    m = DeepMLP(8, 3, depth=4, width=32, activation="tanh")
    reg = MIRegularizer(m, ["blocks.*"], sketch_dim=8, weight=weight, seed=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    w_true = torch.randn(8, 3, generator=g)
    for step in range(steps):
        x = torch.randn(128, 8, generator=g)
        y = (x @ w_true).argmax(1)
        loss = F.cross_entropy(m(x), y)
        reg_loss, _ = reg.loss(step)
        opt.zero_grad()
        (loss + reg_loss).backward()
        opt.step()
    # measure on a fixed held-out batch
    with torch.no_grad():
        m(torch.randn(2048, 8, generator=torch.Generator().manual_seed(9)))
        _, mi = reg.loss(steps)
    return sum(mi.values()) / len(mi)


def test_weight_sign_moves_measured_mi_in_its_direction():
    base = train_and_measure(0.0)
    up = train_and_measure(0.05)
    down = train_and_measure(-0.05)
    assert up > base + 0.5, (base, up)
    assert down < base - 0.5, (base, down)
