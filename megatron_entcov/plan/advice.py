"""When a plan does not fit: the changes that would make it fit, each planned again on the same GPUs.

Candidates, cheapest first (what each costs is in its ``why``): give the servers' memory back while training,
shard the optimizer state, recompute activations (selective, then full), halve the micro-batch token budget,
double tp, double pp, move the servers to nodes of their own. Each is applied alone and planned; the ones that
fit come first. When none fits alone, they are combined in that order, each kept only if it lowers the peak,
until the plan fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_entcov.config import RunConfig, apply_overrides, config_from_dict, config_to_dict
from megatron_entcov.plan.planner import Plan, StateCache, make_plan

__all__ = ["Advice", "plan_with_advice", "advise_changes", "candidate_changes"]


@dataclass(frozen=True)
class Advice:
    """One change to the config and the plan it gives."""

    change: tuple[str, ...]
    """``--set`` overrides, e.g. ('parallel.use_distributed_optimizer=true',)."""
    why: str
    """What it changes in memory (and what it costs)."""
    plan: Plan


def plan_with_advice(cfg: RunConfig, **gpus) -> Plan:
    """:func:`make_plan` (same keywords), with ``advice`` filled when it does not fit."""
    cache = gpus.pop("cache", None) or StateCache()
    plan = make_plan(cfg, cache=cache, **gpus)
    if not plan.fits:
        plan.advice.extend(advise_changes(plan, cache=cache))
    return plan


def candidate_changes(plan: Plan) -> list[tuple[tuple[str, ...], str]]:
    """(``--set`` overrides, why) for every change that applies to ``plan``'s config, cheapest first."""
    cfg, out = plan.cfg, []
    p, m, o, s = cfg.parallel, cfg.model, cfg.optim, cfg.rollout.sglang
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    colocated = plan.engine.where == "colocated servers"
    if colocated and not s.release_memory:
        out.append((("rollout.sglang.release_memory=true",),
                    "the servers give their static pool back while the trainer trains; the trainer's state waits "
                    "in pinned host memory while they generate (host RAM, a copy each way per step)"))
    if not p.use_distributed_optimizer and p.data_parallel_size > 1 and o.optimizer == "adam":
        out.append((("parallel.use_distributed_optimizer=true",),
                    f"Adam's state sharded over the {p.data_parallel_size} data-parallel ranks (a reduce-scatter "
                    "and an all-gather per step instead of an all-reduce)"))
    if m.recompute == "none":
        out.append((("model.recompute=selective",), "the attention's kept scores recomputed in the backward"))
    if m.recompute != "full":
        out.append((("model.recompute=full",), "each layer keeps only its input; about one more forward per step"))
    longest = cfg.rollout.max_prompt_len + cfg.sampling.max_new_tokens
    if o.max_tokens_per_micro_batch:
        half = o.max_tokens_per_micro_batch // 2 // tp * tp
        if half >= longest:
            out.append(((f"optim.max_tokens_per_micro_batch={half}",),
                        "half the tokens per packed micro-batch (more micro-batches per step)"))
    elif o.micro_batch_size > 1:
        out.append(((f"optim.micro_batch_size={o.micro_batch_size // 2}",), "half the rows per micro-batch"))
    world = plan.world_size
    if (m.num_attention_heads % (2 * tp) == 0 and m.num_query_groups % (2 * tp) == 0
            and 2 * tp <= plan.gpus_per_node and world % (2 * tp * pp) == 0):
        out.append(((f"parallel.tensor_model_parallel_size={2 * tp}",),
                    f"weights, gradients, optimizer state and most activations split over {2 * tp} GPUs "
                    f"(dp {world // (2 * tp * pp)})"))
    vpp = p.virtual_pipeline_model_parallel_size or 1
    if m.num_layers % (2 * pp * vpp) == 0 and world % (tp * 2 * pp) == 0:
        out.append(((f"parallel.pipeline_model_parallel_size={2 * pp}",),
                    f"layers split over {2 * pp} stages (dp {world // (tp * 2 * pp)}; a deeper pipeline bubble)"))
    if colocated:
        urls = ",".join(f"http://rollout-node-{i}:30000" for i in range(max(p.data_parallel_size, 1)))
        out.append(((f"rollout.sglang.server_urls=[{urls}]", "rollout.sglang.release_memory=false",
                     "rollout.sglang.sync_method=distributed"),
                    "the servers on nodes of their own (more nodes; weights broadcast over NCCL); replace the "
                    "example URLs with the servers' addresses"))
    return out


def _changed(cfg: RunConfig, overrides: tuple[str, ...]) -> RunConfig:
    data = config_to_dict(cfg)
    data["parallel"].pop("data_parallel_size", None)
    return config_from_dict(apply_overrides(data, list(overrides)))


def advise_changes(plan: Plan, *, cache: StateCache) -> list[Advice]:
    """The candidates of :func:`candidate_changes` planned on ``plan``'s GPUs; fitting ones first, then (when none
    fits alone) their greedy combination."""
    gpus = dict(nodes=plan.world_size // plan.gpus_per_node, gpus_per_node=plan.gpus_per_node,
                gpu_memory_gib=plan.gpu_memory_bytes / (1 << 30), attention=plan.attention, cache=cache)
    singles = []
    for overrides, why in candidate_changes(plan):
        try:
            singles.append(Advice(change=overrides, why=why, plan=make_plan(_changed(plan.cfg, overrides), **gpus)))
        except ValueError:
            continue                    # the change breaks another constraint (e.g. the batch split)
    singles.sort(key=lambda a: not a.plan.fits)
    if any(a.plan.fits for a in singles):
        return singles
    combined, best = (), plan
    for advice in singles:
        trial = combined + advice.change
        try:
            planned = make_plan(_changed(plan.cfg, trial), **gpus)
        except ValueError:
            continue
        if planned.peak_bytes < best.peak_bytes:
            combined, best = trial, planned
            if planned.fits:
                break
    if combined and len(combined) > 1 and best.fits:
        singles.insert(0, Advice(change=combined, why="together", plan=best))
    return singles

