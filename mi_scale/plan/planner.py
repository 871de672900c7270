"""A plan: the byte model applied to a config on a target cluster, and the
advice when it does not fit (each change re-planned on top of the ones before)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

from mi_scale import config as config_mod
from mi_scale.config import Config, ConfigError
from mi_scale.errors import UserError
from mi_scale.plan.byte_model import (DS_REDUCE_BUCKET, PHASES, offload_device, precision_bytes, rank_memory,
                                      zero_section)
from mi_scale.plan.facts import ModelFacts, model_facts
from mi_scale.plan.target import Target, resolve_target


@dataclass
class Plan:
    config: dict  # what was planned: path, overrides, stage, precision, offload, ...
    model: ModelFacts
    target: Target
    params: int
    world_size: int
    p: int
    phases: dict  # phase -> {key: bytes} on the limiting memory (GPU memory on GPUs)
    host_phases: dict  # GPU only: phase -> {key: bytes} of host memory per rank
    notes: list
    advice: list = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda ph: sum(self.phases[ph].values()))

    @property
    def breakdown(self) -> dict:
        return dict(self.phases[self.peak_phase])

    @property
    def per_rank_peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def memory_per_rank_bytes(self) -> int:
        return self.target.memory_per_rank

    @property
    def host_per_rank_bytes(self) -> int:
        if self.target.device == "cpu":
            return self.per_rank_peak_bytes
        return max(sum(v.values()) for v in self.host_phases.values())

    @property
    def host_per_node_bytes(self) -> int:
        return self.host_per_rank_bytes * self.target.ranks_per_node

    @property
    def device_fits(self) -> bool:
        return self.per_rank_peak_bytes <= self.memory_per_rank_bytes

    @property
    def host_fits(self) -> bool:
        return self.host_per_node_bytes <= self.target.host_memory

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits

    def to_json(self) -> dict:
        t = self.target
        out = {
            **self.config,
            "model": {"kind": self.model.kind, "params": self.params, "layers": self.model.n_layer,
                      "width": self.model.width, "vocab": self.model.vocab, "seq_len": self.model.seq_len,
                      "hooked_layers": len(self.model.hooked)},
            "params": self.params,
            "world_size": self.world_size,
            "device": t.device,
            "nodes": t.nodes,
            "ranks_per_node": t.ranks_per_node,
            "bytes_per_param_value": self.p,
            "per_rank_peak_bytes": self.per_rank_peak_bytes,
            "peak_phase": self.peak_phase,
            "memory_per_rank_bytes": self.memory_per_rank_bytes,
            "fits": self.fits,
            "breakdown": self.breakdown,
            "phases": {ph: dict(v) for ph, v in self.phases.items()},
            "host": {"per_rank_bytes": self.host_per_rank_bytes, "per_node_bytes": self.host_per_node_bytes,
                     "memory_per_node_bytes": t.host_memory, "fits": self.host_fits},
            "advice": self.advice,
            "notes": self.notes + t.notes,
        }
        if t.device == "gpu":
            out["host"]["breakdown"] = dict(max(self.host_phases.values(), key=lambda v: sum(v.values())))
            out["host"]["phases"] = {ph: dict(v) for ph, v in self.host_phases.items()}
        return out


def plan(cfg: Config, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
         gpu_memory_gb: Optional[float] = None, host_memory_gb: Optional[float] = None,
         advise: bool = True, *, target: Optional[Target] = None, facts: Optional[ModelFacts] = None,
         meta: Optional[dict] = None) -> Plan:
    """Predict the peak memory of one rank of `cfg` on the target cluster."""
    from mi_scale.train.engine import deepspeed_config
    from mi_scale.train.memory import ModelShape

    target = target or resolve_target(cfg, nodes, gpus_per_node, gpu_memory_gb, host_memory_gb)
    m = facts or model_facts(cfg)
    W = target.world_size
    shape = ModelShape(params=m.params, largest_param=m.largest_param)
    # deepspeed_config sizes buckets from memory_bytes // (ranks on this machine);
    # hand it the target's host memory per rank times the ranks it divides by here.
    import torch
    on_node_here = max(1, min(W, torch.cuda.device_count() or W))
    ds = deepspeed_config(cfg, W, shape, (target.host_memory // target.ranks_per_node) * on_node_here)
    zc = zero_section(ds)
    p = precision_bytes(cfg, ds, target.device)
    phases, host_phases, notes = rank_memory(cfg, target, m, ds, p)
    info = {"zero_stage": int(zc.get("stage", 0)), "precision": "bf16" if p == 2 else "fp32",
            "offload_optimizer": offload_device(zc, "offload_optimizer"), "offload_params": offload_device(zc, "offload_param"),
            "micro_batch": cfg.data.batch_size, "activation_checkpointing": cfg.train.activation_checkpointing,
            "reduce_bucket_elements": int(zc.get("reduce_bucket_size", DS_REDUCE_BUCKET)), **(meta or {})}
    result = Plan(config=info, model=m, target=target, params=m.params, world_size=W, p=p,
                  phases=phases, host_phases=host_phases, notes=notes)
    if advise and not result.fits:
        result.advice = advice(cfg, result)
    return result


# -- advice -----------------------------------------------------------------------

def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return config_mod.from_dict(config_mod.apply_overrides(copy.deepcopy(cfg.to_dict()), overrides))


def advice(cfg: Config, base: Plan) -> list[dict]:
    """What to change, in order, until the run fits: ZeRO-3, optimizer offload,
    activation checkpointing, parameter offload, a smaller micro-batch, more
    GPUs / nodes. The changes are applied one on top of the other and each
    step is re-planned; a change that turns out unnecessary once the later
    ones are in (ZeRO-3 alone may not help while activations dominate, and
    help a lot with checkpointing) is dropped again."""
    gpu = base.target.device == "gpu"
    ds = cfg.deepspeed
    Change = tuple  # (overrides, text, target or None)

    def evaluate(changes: list) -> Optional[Plan]:
        sets = [o for c in changes for o in c[0]]
        target = next((c[2] for c in reversed(changes) if c[2] is not None), base.target)
        try:
            return plan(with_overrides(cfg, sets), advise=False, target=copy.deepcopy(target), facts=base.model)
        except (ConfigError, UserError):
            return None

    candidates: list[Change] = []
    if ds.zero_stage < 3 and base.world_size > 1:
        two = ds.zero_stage < 2 and (evaluate([(["deepspeed.zero_stage=2"], "", None)]) or base).fits
        s = 2 if two else 3
        candidates.append(([f"deepspeed.zero_stage={s}"], f"use deepspeed.zero_stage={s}", None))
    if gpu and ds.offload_optimizer == "none":
        candidates.append((["deepspeed.offload_optimizer=cpu"], "set deepspeed.offload_optimizer=cpu", None))
    if ds.offload_optimizer != "nvme" and (not gpu or not base.host_fits):
        candidates.append((["deepspeed.offload_optimizer=nvme"],
                           "set deepspeed.offload_optimizer=nvme (needs libaio and a fast local disk)", None))
    if not cfg.train.activation_checkpointing and cfg.model.kind != "mlp":
        candidates.append((["train.activation_checkpointing=true"], "set train.activation_checkpointing=true", None))
    if gpu and ds.offload_params == "none":
        candidates.append((["deepspeed.offload_params=cpu"], "set deepspeed.offload_params=cpu", None))

    chain: list[Change] = []
    current = base
    for cand in candidates:
        new = evaluate(chain + [cand])
        if new is None or need(new) > need(current) * 1.02:
            continue
        chain.append(cand)
        current = new
        if current.fits:
            break
    if not current.fits and cfg.data.batch_size > 1:
        b, best = cfg.data.batch_size, None
        while b > 1:
            b //= 2
            trial = evaluate(chain + [([f"data.batch_size={b}"], "", None)])
            if trial is None:
                break
            best = (b, trial)
            if trial.fits:
                break
        if best is not None and need(best[1]) < need(current):
            b = best[0]
            accum = cfg.train.grad_accum * math.ceil(cfg.data.batch_size / b)
            chain.append(([f"data.batch_size={b}"],
                          f"lower data.batch_size to {b} (train.grad_accum={accum} keeps the global batch)", None))
            current = best[1]
    if not current.fits and current.config["zero_stage"] >= 1:
        tgt = copy.deepcopy(current.target)
        for _ in range(12):  # up to 4096x the nodes
            tgt.nodes *= 2
            if gpu or tgt.ranks_per_node == 1:
                tgt.world_size = tgt.nodes * tgt.ranks_per_node
            else:
                tgt.ranks_per_node = math.ceil(tgt.world_size / tgt.nodes)
            sets = [f"cluster.num_workers={tgt.world_size}"] if tgt.world_size != base.world_size else []
            trial = evaluate(chain + [(sets, "", copy.deepcopy(tgt))])
            if trial is not None and trial.fits:
                what = (f"use {tgt.world_size} GPUs ({tgt.nodes} nodes x {tgt.ranks_per_node})" if gpu else
                        f"use {tgt.world_size} ranks on {tgt.nodes} nodes ({tgt.ranks_per_node} per node)")
                chain.append((sets, what, copy.deepcopy(tgt)))
                current = trial
                break
    # drop what the later changes made unnecessary
    for cand in list(chain[:-1]):
        rest = [c for c in chain if c is not cand]
        trial = evaluate(rest)
        if trial is not None and (trial.fits if current.fits else need(trial) <= need(current) * 1.02):
            chain, current = rest, trial
    steps = []
    for i in range(len(chain)):
        pl = evaluate(chain[: i + 1])
        steps.append({"set": list(chain[i][0]), "change": chain[i][1], "per_rank_peak_bytes": pl.per_rank_peak_bytes,
                      "host_per_node_bytes": pl.host_per_node_bytes, "fits": pl.fits})
    return steps


def need(p: Plan) -> float:
    """How far over its memory a plan is (the worse of device and host)."""
    return max(p.per_rank_peak_bytes / p.memory_per_rank_bytes, p.host_per_node_bytes / p.target.host_memory)
