"""MIRegularizer in a plain training loop: layer matching, schedule, hooks,
and the direction of the effect on measured MI."""

from __future__ import annotations

import math

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


# -- non-finite activations: mi.on_nonfinite -------------------------------------------


class Probe(nn.Module):
    """Identity whose output, on its `poison_at`-th training forward, holds
    one non-finite entry. Hooked (blocks.*.probe) but not on the loss path:
    the task loss stays finite, so only the MI term could carry the NaN."""

    def __init__(self, value: float, poison_at: int):
        super().__init__()
        self.value, self.poison_at, self.calls = value, poison_at, 0

    def forward(self, h):
        if self.training and torch.is_grad_enabled() and h.device.type != "meta":
            self.calls += 1
            if self.calls == self.poison_at:
                h = h.clone()
                h[0, 0] = self.value
        return h


class ProbedBlock(nn.Module):
    def __init__(self, block: nn.Module, probe: nn.Module):
        super().__init__()
        self.block, self.probe = block, probe

    def forward(self, h):
        out = self.block(h)
        self.probe(out)  # observed by the MI hook only
        return out


def probed_mlp(value: float, poison_at: int, poisoned_block: int = 2, **mlp_kw) -> DeepMLP:
    m = DeepMLP(**mlp_kw)
    for i, b in enumerate(m.blocks):
        m.blocks[i] = ProbedBlock(b, Probe(value, poison_at if i == poisoned_block else 0))
    return m


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_layer_error_names_pair_and_step(value):
    torch.manual_seed(0)
    m = probed_mlp(value, 2, in_dim=8, num_classes=3, depth=4, width=16)
    reg = MIRegularizer(m, ["blocks.*.probe"], sketch_dim=4)
    m(torch.randn(32, 8))
    reg.loss(1)  # first step: finite
    m(torch.randn(32, 8))
    with pytest.raises(RegularizerError) as e:
        reg.loss(2)
    assert str(e.value) == (
        "mi: non-finite (NaN/Inf) activations in layer pair blocks.1.probe->blocks.2.probe (layer "
        "'blocks.2.probe') at step 2; fix the model's numerics, or set mi.on_nonfinite=skip to drop the MI "
        "term on such steps")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("estimator", ["gaussian", "hsic", "infonce"])
def test_non_finite_layer_skip_drops_term_and_keeps_gradients_finite(value, estimator):
    torch.manual_seed(0)
    m = probed_mlp(value, 2, in_dim=8, num_classes=3, depth=4, width=16)
    reg = MIRegularizer(m, ["blocks.*.probe"], estimator=estimator, sketch_dim=4, weight=0.5,
                        on_nonfinite="skip")
    reg.discover(torch.randn(2, 8))
    opt = torch.optim.SGD(list(m.parameters()) + list(reg.parameters()), lr=0.1)
    for step in (1, 2, 3):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        loss = F.cross_entropy(m(x), y)
        reg_loss, mi = reg.loss(step)
        assert (mi == {}) == (step == 2) and reg.skipped_nonfinite == (1 if step >= 2 else 0)
        if step == 2:
            assert reg_loss.item() == 0.0
        opt.zero_grad()
        (loss + reg_loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        assert all(torch.isfinite(p).all() for p in list(m.parameters()) + list(reg.parameters()))


def test_on_nonfinite_rejects_unknown_mode():
    with pytest.raises(RegularizerError, match="mi.on_nonfinite: invalid value 'ignore'; use 'error' or 'skip'"):
        MIRegularizer(mlp(), ["blocks.*"], on_nonfinite="ignore")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_worker_non_finite_layer_under_both_modes(tmp_path, monkeypatch, mode):
    """The real worker (DeepSpeed, 1 rank): a hooked layer produces NaN on
    its 3rd training forward. error: the run stops naming pair and step;
    skip: metrics.jsonl counts the dropped term and the weights stay finite."""
    import json

    import mi_scale.models
    from mi_scale import config as config_mod
    from mi_scale.train.worker import run_worker

    built = []

    def build(model_cfg, *, input_dim=None, num_classes=None, device=None, **kw):
        with torch.device(device) if device is not None else torch.device("cpu"):
            m = probed_mlp(float("nan"), 3, in_dim=input_dim, num_classes=num_classes,
                           depth=model_cfg.depth, width=model_cfg.width)
        built.append(m)
        return m

    monkeypatch.setattr(mi_scale.models, "build_model", build)
    cfg = config_mod.load(None, [
        f"run.output_dir={tmp_path}", "run.name=nan", "model.depth=4", "model.width=32", "data.batch_size=16",
        "mi.sketch_dim=4", "mi.weight=0.5", "mi.layers=[blocks.*.probe]", f"mi.on_nonfinite={mode}",
        "train.steps=5", "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=100",
        "tracking.wandb=disabled", "tracking.heatmap_every=100"])
    if mode == "error":
        with pytest.raises(RegularizerError) as e:
            run_worker(cfg)
        assert str(e.value).startswith("mi: non-finite (NaN/Inf) activations in layer pair "
                                       "blocks.1.probe->blocks.2.probe (layer 'blocks.2.probe') at step 3;")
        return
    run_worker(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["mi_skipped_nonfinite"] for r in train] == [0, 0, 1, 1, 1]
    assert ["mi_mean" in r for r in train] == [True, True, False, True, True]
    assert all(math.isfinite(r["loss"]) for r in train)
    model = built[-1]  # the real (not meta) model the engine trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
