"""The plan as people read it: a table per memory (parts x phases), the peak
against what a rank has, notes, and the advice."""

from __future__ import annotations

from mi_scale.plan.byte_model import KEYS, PHASE_NAMES, PHASES
from mi_scale.plan.planner import Plan
from mi_scale.plan.units import fmt_bytes


def _table(title: str, phases: dict, peak: str, all_keys: bool = True) -> list[str]:
    keys = [k for k in KEYS if any(phases[ph].get(k, 0) for ph in PHASES) or (all_keys and k in KEYS[:7])]
    heads = [PHASE_NAMES[ph] + (" *" if ph == peak else "") for ph in PHASES]
    lines = [f"  {title:<18}" + "".join(f"{h:>20}" for h in heads)]
    for k in keys:
        lines.append(f"  {k:<18}" + "".join(f"{fmt_bytes(phases[ph].get(k, 0)):>20}" for ph in PHASES))
    lines.append(f"  {'total':<18}" + "".join(f"{fmt_bytes(sum(phases[ph].values())):>20}" for ph in PHASES))
    return lines


def render(pl: Plan) -> str:
    c, t, m = pl.config, pl.target, pl.model
    offload = ", ".join(f"{k} {c[f'offload_{k}']}" for k in ("optimizer", "params") if c[f"offload_{k}"] != "none")
    lines = [
        f"model     {m.describe()}",
        f"run       {t.describe()}, ZeRO-{c['zero_stage']}, {c['precision']}, micro-batch {c['micro_batch']}, "
        f"activation checkpointing {'on' if c['activation_checkpointing'] else 'off'}"
        + (f", offload: {offload}" if offload else ""),
        "",
    ]
    where = "GPU memory" if t.device == "gpu" else "host memory"
    lines += _table(f"per rank, {where}", pl.phases, pl.peak_phase)
    peak, avail = pl.per_rank_peak_bytes, pl.memory_per_rank_bytes
    lines.append("")
    share = f"{100 * peak / avail:.0f}%"
    lines.append(f"peak      {fmt_bytes(peak)} per rank ({PHASE_NAMES[pl.peak_phase]}) of {fmt_bytes(avail)} "
                 f"{'per GPU' if t.device == 'gpu' else f'per rank ({fmt_bytes(t.host_memory)} / {t.ranks_per_node})'}: "
                 f"{'fits' if pl.device_fits else 'does NOT fit'} ({share})")
    if t.device == "gpu":
        hp = max(PHASES, key=lambda ph: sum(pl.host_phases[ph].values()))
        lines.append("")
        lines += _table("per rank, host", pl.host_phases, hp, all_keys=False)
        lines.append(f"host      {t.ranks_per_node} ranks x {fmt_bytes(pl.host_per_rank_bytes)} = "
                     f"{fmt_bytes(pl.host_per_node_bytes)} per node of {fmt_bytes(t.host_memory)}: "
                     f"{'fits' if pl.host_fits else 'does NOT fit'}")
    for n in pl.notes + t.notes:
        lines.append(f"note      {n}")
    if not pl.fits:
        lines.append("")
        if pl.advice:
            lines.append("to fit, in order (each step on top of the ones before, re-planned):")
            for i, a in enumerate(pl.advice, 1):
                verdict = "fits" if a["fits"] else "still too big"
                lines.append(f"  {i}. {a['change']:<62} -> {fmt_bytes(a['per_rank_peak_bytes'])} per rank: {verdict}")
            sets = [s for a in pl.advice for s in a["set"]]
            if sets:
                lines.append("  (--set " + " --set ".join(sets) + ")")
        else:
            lines.append("no change we know of makes it fit: use more memory per rank")
    return "\n".join(lines)
