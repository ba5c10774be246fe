"""A plan as a person reads it (a short table in GiB) and as a program reads it (JSON, bytes).

JSON keys (stable; more may be added): ``layout`` {tp, pp, dp, cp, ep}, ``world_size``, ``gpu_memory_gib``,
``fits``, ``peak_bytes``, ``ranks`` [{stage, role, count, params, weights_bytes, grads_bytes, optimizer_bytes,
activations_bytes, servers_bytes, phases {rollout, old_logprob, train, sync, checkpoint}, peak_phase,
peak_bytes, fits, host_offload_bytes}], ``advice`` [{set: [...], why, fits, peak_bytes}], ``notes``.
"""

from __future__ import annotations

from megatron_entcov.plan.phases import PHASES
from megatron_entcov.plan.planner import Plan

__all__ = ["plan_json", "plan_table"]

GIB = float(1 << 30)


def plan_json(plan: Plan) -> dict:
    """The plan as a JSON-ready dict (bytes as integers)."""
    return {
        "layout": plan.layout,
        "world_size": plan.world_size,
        "gpus_per_node": plan.gpus_per_node,
        "gpu_memory_gib": round(plan.gpu_memory_bytes / GIB, 3),
        "attention": plan.attention,
        "fits": plan.fits,
        "peak_bytes": plan.peak_bytes,
        "ranks": [{
            "stage": r.stage, "role": r.role, "count": r.ranks, "params": r.state.params,
            "weights_bytes": r.state.weights_bytes, "grads_bytes": r.state.grads_bytes,
            "optimizer_bytes": r.state.optimizer_bytes, "activations_bytes": r.activations_bytes,
            "servers_bytes": r.servers_bytes, "phases": dict(r.phases), "peak_phase": r.peak_phase,
            "peak_bytes": r.peak_bytes, "fits": r.fits, "host_offload_bytes": r.host_offload_bytes,
        } for r in plan.roles],
        "advice": [{"set": list(a.change), "why": a.why, "fits": a.plan.fits, "peak_bytes": a.plan.peak_bytes}
                   for a in plan.advice],
        "notes": [*plan.engine.notes, *plan.activation_notes],
    }


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M" if n >= 10**5 else str(n)


def plan_table(plan: Plan, *, source: str = "") -> str:
    """A few lines: the layout and verdict, one row per rank role (GiB), the notes, the advice."""
    lay = plan.layout
    worst = max(plan.roles, key=lambda r: r.peak_bytes)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    head = (f"plan{' of ' + source if source else ''}: {plan.world_size // plan.gpus_per_node} node(s) x "
            f"{plan.gpus_per_node} GPUs of {plan.gpu_memory_bytes / GIB:.1f} GiB; tp {lay['tp']} pp {lay['pp']} "
            f"dp {lay['dp']} cp {lay['cp']} ep {lay['ep']}; {plan.attention} attention; {verdict}: peak "
            f"{_gib(worst.peak_bytes)} GiB (stage {worst.stage}, {worst.role}, {worst.peak_phase})")
    cols = ["stage", "role", "ranks", "params", "weights", "grads", "optim", "activ", "engine",
            *PHASES, "peak", "fits"]
    rows = [[str(r.stage), r.role, str(r.ranks), _count(r.state.params), _gib(r.state.weights_bytes),
             _gib(r.state.grads_bytes), _gib(r.state.optimizer_bytes), _gib(r.activations_bytes),
             _gib(r.servers_bytes), *(_gib(r.phases[p]) for p in PHASES), _gib(r.peak_bytes),
             "yes" if r.fits else "NO"] for r in plan.roles]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)   # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [head, "GiB per rank; phases include the runtime reserve "
           f"({plan.cfg.hardware.runtime_reserve_gib:g} GiB)", line(cols), *(line(r) for r in rows)]
    notes = [*plan.engine.notes]
    if notes:
        out += ["notes:", *(f"  - {n}" for n in notes)]
    if plan.advice:
        out.append("changes that fit, each planned again on these GPUs:" if any(a.plan.fits for a in plan.advice)
                   else "no single change fits; each planned again on these GPUs:")
        for a in plan.advice:
            sets = " ".join(f"--set {c}" for c in a.change)
            state = "fits" if a.plan.fits else "does not fit"
            out.append(f"  {sets}: {state}, peak {_gib(a.plan.peak_bytes)} GiB ({a.why})")
    return "\n".join(out)
