"""Matched-gradient control for the MI term (`mi.control: deep_supervision`).

Question it answers: does raising inter-layer MI help because of *what* the
term asks of the layers, or merely because it injects extra gradient into
deep layers? The control injects gradient with no MI meaning, of the same
norm, into the same layers:

    aux = scale_t * mean_l CE(probe_l(h_l), y)          (deep supervision)
    scale_t = ||d R_t / d h|| / ||d CE_DS / d h||        (detached)

where h = (h_l) are the outputs of the hooked layers (mi.layers), R_t is the
MI term that a raise-MI arm with the same mi.weight would add at this step
on this network's current state (d/dh: total derivatives, through later
layers too), and probe_l is a per-layer linear probe to the labels (next
tokens for an LM).
The scale is re-measured on the first step and then every 10 steps (each
measurement costs two extra backward passes), so the gradient norm
delivered to the hooked layers tracks the raise-MI term's through training,
not just at the start. The MI term itself is measured (and logged) but
not added to the loss. Logged on re-measured steps: control_scale,
control_grad_norm and mi_grad_norm (equal by construction).

The scale needs two autograd.grad calls inside the forward; at ZeRO-3 those
would fire DeepSpeed's parameter gather/reduce hooks outside engine.backward,
so config validation refuses the control there (Config.validate).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class DeepSupervision(nn.Module):
    """Per-hooked-layer linear probes whose loss is scaled to the MI term's
    gradient norm. Call `attach(model)` once; each forward of
    the model then keeps the hooked layers' outputs for `loss`."""

    def __init__(self, widths: dict[str, int], num_classes: int, every: int = 10):
        super().__init__()
        self.every = every  # re-measure the matching scale every N steps (two extra backward passes)
        self.scale: float | None = None
        self.layer_names = list(widths)
        self.probes = nn.ModuleList(nn.Linear(w, num_classes) for w in widths.values())
        self._acts: dict[str, torch.Tensor] = {}
        self._handles = []

    @staticmethod
    @torch.no_grad()
    def widths(shape_model: nn.Module, layer_names: list[str], example: torch.Tensor) -> dict[str, int]:
        """Output width of each hooked layer, from one forward of a (meta) twin."""
        found: dict[str, int] = {}
        modules = dict(shape_model.named_modules())

        def hook(module, args, out, name):
            found.setdefault(name, _output(out).shape[-1])  # returns None: the output stays

        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in layer_names]
        try:
            shape_model(example)
        finally:
            for h in handles:
                h.remove()
        return {n: found[n] for n in layer_names}

    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name in self.layer_names:
            self._handles.append(modules[name].register_forward_hook(
                lambda m, a, o, name=name: self._acts.__setitem__(name, _output(o))))

    def probe_loss(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(mean over layers of the probes' cross-entropy, the hooked outputs)."""
        acts = [self._acts[n] for n in self.layer_names]
        self._acts = {}
        target = y.reshape(-1)
        losses = [F.cross_entropy(p(h.reshape(-1, h.shape[-1])).float(), target)
                  for p, h in zip(self.probes, acts)]
        return torch.stack(losses).mean(), acts

    def loss(self, y: torch.Tensor, mi_term: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scaled probe loss (to add to the task loss) and, on the steps
        that re-measure the scale (the first, then every `every`-th), what was
        matched: {"control_scale", "control_grad_norm", "mi_grad_norm"}.
        `mi_term` is the regularizer's loss (with graph) at this step; when
        it has no graph (a step without the MI term) the probes stay off."""
        ds, acts = self.probe_loss(y)
        if not mi_term.requires_grad:
            return ds * 0.0, {}
        if self.scale is not None and step % self.every != 0:
            return self.scale * ds, {}
        # retain_graph: these graphs share the network's forward with the task loss
        g_mi = torch.autograd.grad(mi_term, acts, retain_graph=True, allow_unused=True)
        g_ds = torch.autograd.grad(ds, acts, retain_graph=True, allow_unused=True)
        n_mi, n_ds = _norm(g_mi), _norm(g_ds)
        self.scale = float(n_mi / n_ds.clamp_min(1e-12))
        return self.scale * ds, {"control_scale": self.scale, "control_grad_norm": float(self.scale * n_ds),
                                 "mi_grad_norm": float(n_mi)}


def _norm(grads) -> torch.Tensor:
    sq = [g.double().pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64)
