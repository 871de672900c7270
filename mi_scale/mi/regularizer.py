"""MIRegularizer: the inter-layer MI term, usable in any torch training loop.

    reg = MIRegularizer(model, layers=["blocks.*"], estimator="gaussian",
                        sketch_dim=64, tokens_per_sample=8, weight=0.1, seed=0)
    reg.set_step(step)                      # optional: hooks keep only the P sampled tokens
    out = model(x)                          # hooks sketch the hooked layers
    reg_loss, mi_by_pair = reg.loss(step)   # scaled for data parallelism
    (task_loss + reg_loss).backward()

Objective: R = -weight * sum_l w_l * I(s_l(h_l); s_{l+1}(h_{l+1})) over the
adjacent pairs of hooked layers in forward-execution order.

Sharding contract (data parallel, W ranks): each rank sketches its local
batch, sketches are all-gathered (autograd-aware), each rank estimates only
the pairs it owns and scales its share by W. When the W ranks' gradients are
averaged (DDP / DeepSpeed), the result equals the gradient of R computed in
one process on the concatenated global batch. Logged values are global,
identical on every rank.

Shape legend: n local rows, N global rows, T tokens, D features, K sketch dims.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from mi_scale.errors import UserFixableError
from mi_scale.mi import estimators
from mi_scale.mi.distributed import all_reduce_sum, assign_pairs, gather_rows, world
from mi_scale.mi.sketch import Sketcher, as_tokens, select_tokens, token_fractions


class RegularizerError(UserFixableError, ValueError):
    pass


def _glob_to_regex(pattern: str) -> re.Pattern:
    # '*' matches one name component ("blocks.*" matches blocks.3, not blocks.3.fc).
    parts = [".*" if c == "**" else fnmatch.translate(c)[4:-3].replace(".*", "[^.]*") for c in pattern.split(".")]
    return re.compile(r"\A" + r"\.".join(parts) + r"\Z")


def match_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module names matching any pattern (exact names or globs)."""
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pat in patterns:
        rx = _glob_to_regex(pat)
        hits = [n for n in names if rx.match(n)]
        if not hits:
            import difflib
            close = difflib.get_close_matches(pat, names, n=3)
            hint = f"close names: {', '.join(close)}" if close else "see model.named_modules()"
            raise RegularizerError(f"mi.layers: pattern {pat!r} matches no module ({hint})")
        found += [h for h in hits if h not in found]
    if len(found) < 2:
        raise RegularizerError(f"mi.layers: {patterns!r} matches {len(found)} module(s) {found}; "
                               "the MI term needs at least two layers to form a pair")
    return found


@dataclass
class Schedule:
    """When the term is computed and with which weight.

    weight(step) ramps linearly from 0 to `weight` over `warmup_steps`. The
    term takes part in the loss on steps divisible by `every`; on other steps
    divisible by `log_every` MI is only measured (no gradient)."""
    weight: float = 0.1
    every: int = 1
    log_every: int = 1
    warmup_steps: int = 0

    def weight_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)

    def mode(self, step: int) -> str:
        """'train' (with gradient), 'measure' (no gradient) or 'skip'."""
        if self.weight != 0 and step % self.every == 0:
            return "train"
        if step % self.log_every == 0 or (self.weight != 0 and step % self.every == 0):
            return "measure"
        return "skip"


# Training defaults that differ from the estimators' measurement defaults.
# With shrinkage 1e-8 (accurate for validation) the gaussian estimate of a
# pair can grow to k/2 log(1e8) ~ 9 nats per sketch dim as layers become
# linearly dependent, and its gradient grows like 1/shrinkage: training then
# collapses the layers instead of learning the task (measured on MNIST-1D).
# A shrinkage of 0.1 bounds each pair by k/2 log 10 and keeps gradients
# tame. The Wishart bias correction is exact only without shrinkage; with
# it the corrected value can go negative, and a negative weight then pushes
# "MI" below zero, so it is off here (the estimate stays >= 0). Pass
# estimator_kwargs to override either.
TRAINING_ESTIMATOR_DEFAULTS = {"gaussian": {"shrinkage": 0.1, "bias_correction": False}}


class MIRegularizer(nn.Module):
    """Hooks `layers` of `model` and turns their sketches into the MI term.

    Trainable parts (learned sketches, infonce critics) are this module's
    parameters: call `discover(example_input)` once, then give
    `reg.parameters()` to the optimizer together with the model's (or wrap
    both in one nn.Module). Random sketches and the gaussian, renyi2, hsic
    and ksg estimators have no parameters.
    """

    def __init__(self, model: nn.Module, layers: list[str], estimator: str = "gaussian",
                 sketch: str = "random", sketch_dim: int = 64, tokens_per_sample: int = 8,
                 weight: float = 0.1, seed: int = 0, every: int = 1, log_every: int | None = None,
                 warmup_steps: int = 0, pair_weights: list[float] | None = None,
                 estimator_kwargs: dict | None = None, group=None, on_nonfinite: str = "error"):
        super().__init__()
        if on_nonfinite not in ("error", "skip"):
            raise RegularizerError(f"mi.on_nonfinite: invalid value {on_nonfinite!r}; use 'error' or 'skip'")
        self.on_nonfinite = on_nonfinite
        self.skipped_nonfinite = 0  # steps (micro-batches) whose MI term was dropped (on_nonfinite=skip)
        self.layer_names = match_layers(model, list(layers))
        self.estimator_name = estimator
        self.estimator_kwargs = {**TRAINING_ESTIMATOR_DEFAULTS.get(estimator, {}), **(estimator_kwargs or {})}
        if estimator == "ksg" and weight != 0:
            raise RegularizerError("mi.estimator: invalid value 'ksg': ksg is not differentiable; "
                                   "use it with weight 0 (monitoring) or pick gaussian")
        self.sketcher = Sketcher(sketch, sketch_dim, seed)
        self.k, self.tokens_per_sample, self.seed = sketch_dim, tokens_per_sample, seed
        self.schedule = Schedule(weight, every, log_every or every, warmup_steps)
        self.pair_weights = pair_weights
        self.group = group
        # Estimators with parameters (infonce) need one instance per pair; the
        # rest are stateless and shared.
        self.critics = nn.ModuleDict()
        self._shared_estimator = None if estimator == "infonce" else estimators.build(estimator, **self.estimator_kwargs)
        if self._shared_estimator is not None:
            self._shared_estimator.check_finite = False  # loss() checks a whole step at once
        self._order: list[str] | None = None  # hooked layers in forward-execution order
        self._sketches: dict[str, torch.Tensor] = {}
        self._capture_step: int | None = None  # set_step(): select tokens in the hook
        self._capture_fractions: torch.Tensor | None = None  # that step's token positions
        self._armed = False
        self._fired: list[str] = []
        self._model = [model]  # a list, so the model is not registered as a submodule
        self._handles = [model.register_forward_pre_hook(self._arm),
                         model.register_forward_hook(self._disarm)]
        modules = dict(model.named_modules())
        for name in self.layer_names:
            self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))

    # -- hooks -------------------------------------------------------------
    # The root pre-hook arms capture for one forward pass; the root post-hook
    # disarms it. Hooks that re-fire outside that window (activation
    # checkpointing recomputes blocks during backward) still compute the
    # projection, so checkpointing sees the same saved tensors, but store
    # nothing: no double counting.

    def _arm(self, module, args):
        self._armed = True
        self._sketches = {}
        self._fired: list[str] = []

    def _disarm(self, module, args, output):
        self._armed = False

    def _make_hook(self, name: str):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            if not torch.is_tensor(h):
                raise RegularizerError(f"layer {name!r} returned {type(h).__name__}; hook a module "
                                       "whose output is a tensor")
            step = self._capture_step
            mode = "train" if step is None else self.schedule.mode(step)
            if mode == "skip":
                return  # nothing to sketch this step
            # A measure-only step builds no graph: a branch off a block's output
            # that the loss never reaches breaks ZeRO-3's backward under
            # activation checkpointing (the block's parameters are not fetched
            # again for the recompute).
            with torch.set_grad_enabled(torch.is_grad_enabled() and mode == "train"):
                h_NTD = as_tokens(h)
                if step is not None:  # keep P tokens: O(batch x P x k) per layer
                    h_NTD = select_tokens(h_NTD, self._capture_fractions)
                s_NTK = self.sketcher.project(name, h_NTD)
            if self._armed and name not in self._sketches:
                self._sketches[name] = s_NTK  # the sketch, never the full activation
                self._fired.append(name)
        return hook

    def set_step(self, step: int) -> None:
        """Announce the step of the next forward pass, so that the hooks
        select its P token positions before projecting: captured sketches
        are then (n, P, k) instead of (n, T, k), and the projection costs P/T
        as much. Optional; once called, call it before every forward, since
        `loss(step)` must be called with the announced step."""
        self._capture_step = step
        self._capture_fractions = token_fractions(self.seed, step, self.tokens_per_sample)  # once, not per hook

    def remove(self) -> None:
        """Remove every hook this regularizer registered."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- set-up ------------------------------------------------------------

    @property
    def pair_names(self) -> list[str]:
        order = self._order or self.layer_names
        return [f"{a}->{b}" for a, b in zip(order[:-1], order[1:])]

    @torch.no_grad()
    def discover(self, *example_args, shape_model: nn.Module | None = None, **example_kwargs) -> list[str]:
        """Run one forward to learn the execution order and widths of the
        hooked layers and create trainable parts (learned sketches, critics).
        Call before building the optimizer when those are used.

        `shape_model`: run that forward on a model with the same module names
        instead, e.g. a meta-device twin (with meta example inputs) when the
        real model is ZeRO-3 partitioned and cannot run outside its engine."""
        real = self._model[0]
        model = shape_model if shape_model is not None else real
        widths: dict[str, int] = {}
        handles = []
        modules = dict(model.named_modules())
        for name in self.layer_names:
            def cap(module, args, output, name=name):
                h = output[0] if isinstance(output, (tuple, list)) else output
                if name not in widths:
                    widths[name] = as_tokens(h).shape[-1]
            handles.append(modules[name].register_forward_hook(cap))
        was_training = model.training
        saved = self.sketcher.kind
        self.sketcher.kind = "random"  # learned projections do not exist yet
        try:
            model.eval()
            model(*example_args, **example_kwargs)
        finally:
            model.train(was_training)
            self.sketcher.kind = saved
            for h in handles:
                h.remove()
        self._set_order(list(widths))  # dicts keep insertion order: the firing order
        device = next(real.parameters()).device
        for name in self._order:
            self.sketcher.add_layer(name, widths[name], device=device)
        if self.estimator_name == "infonce":
            for key in self._pair_keys():
                if key not in self.critics:
                    self.critics[key] = estimators.build("infonce", x_dim=self.k, **self.estimator_kwargs).to(device)
                    self.critics[key].check_finite = False  # loss() checks a whole step at once
        self._sketches = {}
        return self.pair_names

    def _set_order(self, fired: list[str]) -> None:
        missing = [n for n in self.layer_names if n not in fired]
        if missing:
            raise RegularizerError(f"hooked layers {missing} did not fire in the last forward pass; "
                                   "hook modules that run in forward() (check mi.layers)")
        if self._order is None:
            self._order = list(fired)
            if self.pair_weights is not None and len(self.pair_weights) != len(self._order) - 1:
                raise RegularizerError(
                    f"mi.pair_weights: has {len(self.pair_weights)} entries but there are "
                    f"{len(self._order) - 1} adjacent pairs ({', '.join(self.pair_names)})")

    def _pair_keys(self) -> list[str]:
        return [p.replace(".", "__").replace("->", "--") for p in self.pair_names]

    def _estimator_for(self, pair: int):
        if self._shared_estimator is not None:
            return self._shared_estimator
        key = self._pair_keys()[pair]
        if key not in self.critics:
            raise RegularizerError("infonce critics were not created: call "
                                   "MIRegularizer.discover(example_input) before building the optimizer")
        return self.critics[key]

    # -- the term ------------------------------------------------------------

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """MI term for the last forward pass and the global MI of every pair.

        Returns (reg_loss, {"<a>-><b>": nats}). reg_loss is already scaled by
        the world size for gradient averaging (see module docstring); it is a
        zero that still depends on the gathered sketches on ranks that own no
        pair, so that every rank joins the backward collective. Returns
        (0, {}) on steps the schedule skips. Releases the captured sketches.
        """
        mode = self.schedule.mode(step)
        sketches, fired = self._sketches, self._fired
        selected = self._capture_step is not None
        if selected and self._capture_step != step:
            raise RegularizerError(f"loss(step={step}) after set_step({self._capture_step}): the hooks "
                                   "sampled the token positions of another step")
        # _capture_step stays: activation checkpointing re-runs the hooks in
        # backward, and they must select the same tokens as in forward
        self._sketches, self._fired = {}, []
        device = next(iter(sketches.values())).device if sketches else torch.device("cpu")
        if mode == "skip":
            return torch.zeros((), device=device), {}
        self._set_order(fired)
        rank, size = world(self.group)
        grad = mode == "train" and torch.is_grad_enabled()

        # One all-gather for all layers: (n, L K) -> (N, L K). float64 sketches
        # (a float64 model) stay float64; everything else computes in float32.
        if selected:
            local = torch.cat([sketches[name] for name in self._order], 1)
        else:
            fractions = token_fractions(self.seed, step, self.tokens_per_sample)
            local = torch.cat([select_tokens(sketches[name], fractions) for name in self._order], 1)
        if local.dtype != torch.float64:
            local = local.float()
        if not grad:
            local = local.detach()
        gathered = gather_rows(local, self.group, differentiable=grad)
        num_layers = len(self._order)
        if self.estimator_name == "gaussian" and len(gathered) <= 2 * self.k + 1:
            # Fewer rows than joint dims: the covariance is singular and the
            # estimate measures the shrinkage, not the layers.
            raise RegularizerError(
                f"mi.sketch_dim={self.k}: the gaussian estimator needs more than 2*sketch_dim+1="
                f"{2 * self.k + 1} sketched rows per step, got {len(gathered)} (global batch x tokens per "
                f"sample); lower mi.sketch_dim or raise data.batch_size or mi.tokens_per_sample")
        # Non-finite sketches: one device-side flag per layer, read back with
        # the MI values below (no extra host sync). Until then the estimators
        # see zeros in their place, so neither the value nor any gradient
        # (torch.where passes none to the masked branch) carries a NaN.
        # Column sums are non-finite iff a column holds NaN/Inf (or values so
        # large that the covariance would overflow anyway): cheaper than
        # isfinite on every entry.
        finite_L = torch.isfinite(gathered.detach().sum(0)).view(num_layers, self.k).all(1)
        all_finite = finite_L.all()
        gathered = torch.where(all_finite, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))
        per_layer = gathered.split(self.k, dim=1)

        owners = assign_pairs(num_layers - 1, size)
        values = torch.zeros(len(owners) + num_layers, dtype=torch.float32, device=device)
        weight = self.schedule.weight_at(step)
        reg = gathered.sum() * 0.0  # keeps every rank in the backward collective
        mine = [p for p, owner in enumerate(owners) if owner == rank]  # contiguous (assign_pairs)
        if self.critics:
            for p in range(len(owners)):
                with torch.set_grad_enabled(grad):
                    mi = self._estimator_for(p)(per_layer[p], per_layer[p + 1]) if p in mine else \
                        self._estimator_for(p)(per_layer[p][:2], per_layer[p + 1][:2])
                if p not in mine:
                    # Critics of pairs owned elsewhere get an exact zero
                    # gradient here, so every rank reduces the same set of
                    # gradients. A module call (not p.sum()) so that ZeRO-3
                    # gathers the partitioned parameters first and sees the
                    # same sequence of module calls on every rank.
                    reg = reg + 0.0 * mi
                    continue
                values[p] = mi.detach()
                if grad:
                    reg = reg - weight * (self.pair_weights[p] if self.pair_weights else 1.0) * size * mi
        elif mine:
            lo, hi = mine[0], mine[-1] + 1
            est = self._shared_estimator
            with torch.set_grad_enabled(grad):
                # Parameter-free estimators are not called as modules: ranks
                # own different numbers of pairs, and ZeRO-3 requires the same
                # sequence of module calls on every rank.
                if isinstance(est, estimators.GaussianMI):  # all my pairs in one batch
                    mi_P = est.chain_concat(gathered[:, lo * self.k:(hi + 1) * self.k], self.k)
                else:
                    mi_P = torch.stack([est.forward(per_layer[p], per_layer[p + 1]) for p in mine])
            values[lo:hi] = mi_P.detach().float()
            if grad:
                if self.pair_weights is None:
                    reg = reg - (weight * size) * mi_P.sum()
                else:
                    w_P = torch.tensor(self.pair_weights[lo:hi], dtype=mi_P.dtype, device=mi_P.device)
                    reg = reg - (weight * size) * (w_P * mi_P).sum()
        if rank == 0:
            values[len(owners):] = (~finite_L).float()  # the same on every rank: counted once
        reg = torch.where(all_finite, reg, torch.zeros((), dtype=reg.dtype, device=reg.device))
        values = all_reduce_sum(values, self.group).tolist()
        bad_layers = [self._order[i] for i, v in enumerate(values[len(owners):]) if v > 0]
        if bad_layers:
            if self.on_nonfinite == "error":
                first = self._order.index(bad_layers[0])
                pair = self.pair_names[max(first - 1, 0)]
                raise RegularizerError(
                    f"mi: non-finite (NaN/Inf) activations in layer pair {pair} (layer {bad_layers[0]!r}) "
                    f"at step {step}; fix the model's numerics, or set mi.on_nonfinite=skip to drop the MI "
                    "term on such steps")
            self.skipped_nonfinite += 1
            return reg, {}
        return reg, dict(zip(self.pair_names, values[:len(owners)]))
