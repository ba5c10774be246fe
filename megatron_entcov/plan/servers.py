"""What the rollout engine keeps on a trainer rank's GPU in each phase of an RL step.

Launched SGLang servers (``rollout.engine=sglang`` without ``server_urls``/``router_url``) sit on the GPUs of
their replica's generating rank and the ones after it (rollout/sglang/placement.py): ``num_servers`` servers of
``--tp-size`` GPUs each. SGLang takes ``--mem-fraction-static`` of a GPU's memory for its weights and KV cache
(the static pool) and needs some more around it (CUDA graphs, the forward's activations, its CUDA context):
:data:`SERVER_OVERHEAD_GIB` per GPU, an allowance. With ``rollout.sglang.release_memory`` the servers give the
static pool and their CUDA graphs back while the trainer trains (the CUDA context stays:
:data:`SERVER_CONTEXT_GIB`), take their weights back for the weight sync and everything back after it
(policy/colocation.py). Servers at URLs are on other machines: nothing here.

The embedded engine (``rollout.engine=local``) keeps a whole Hugging Face copy of the policy and the KV cache of
its replica's batch on the generating rank while it generates; it is freed after generation.

Example:
    usage = engine_usage(cfg, full_params=7_615_616_512, gpu_memory_bytes=80 << 30)
    usage.generating_bytes, usage.on_rank(rank)
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_entcov.config import RunConfig, server_tp
from megatron_entcov.config.dtypes import torch_dtype

__all__ = ["EngineUsage", "engine_usage", "mem_fraction_static", "SERVER_OVERHEAD_GIB", "SERVER_CONTEXT_GIB",
           "DEFAULT_MEM_FRACTION"]

GIB = 1 << 30
SERVER_OVERHEAD_GIB = 3.0
"""Per GPU of a generating SGLang server beyond its static pool: CUDA graphs, activations of its forward, its
CUDA context (an allowance; SGLang leaves 1 - mem_fraction_static of the GPU for these)."""
SERVER_CONTEXT_GIB = 1.0
"""Per GPU of a server that released its memory: its CUDA context and what its allocator keeps."""
DEFAULT_MEM_FRACTION = 0.88
"""What the plan assumes when server_args give no --mem-fraction-static (SGLang chooses by GPU and tp size;
about 0.88 on an 80 GB GPU): set it explicitly for colocated servers."""


def mem_fraction_static(server_args) -> float | None:
    """The ``--mem-fraction-static`` of ``rollout.sglang.server_args``; None when absent."""
    args = list(server_args)
    for i, a in enumerate(args):
        if a == "--mem-fraction-static" and i + 1 < len(args):
            return float(args[i + 1])
        if a.startswith("--mem-fraction-static="):
            return float(a.split("=", 1)[1])
    return None


@dataclass(frozen=True)
class EngineUsage:
    """Bytes the rollout engine keeps on one GPU per phase, and which trainer ranks' GPUs it is on."""

    where: str
    """'colocated servers', 'servers elsewhere', or 'embedded engine'."""
    generating_bytes: int
    """While it generates (the trainer's own state: see plan/phases.py)."""
    training_bytes: int
    """While the trainer computes log-probs and trains."""
    syncing_bytes: int
    """While the weights are pushed to it."""
    checkpoint_bytes: int
    """While the trainer saves a checkpoint."""
    ranks: frozenset[int]
    """Global trainer ranks whose GPU launched servers share (the embedded engine is the generating rank's own)."""
    notes: tuple[str, ...] = ()

    def on_rank(self, rank: int) -> bool:
        return rank in self.ranks

    def phase_bytes(self, phase: str) -> int:
        return {"rollout": self.generating_bytes, "old_logprob": self.training_bytes, "train": self.training_bytes,
                "sync": self.syncing_bytes, "checkpoint": self.checkpoint_bytes}[phase]


def engine_usage(cfg: RunConfig, *, world_size: int, gpus_per_node: int, full_params: int,
                 gpu_memory_bytes: int) -> EngineUsage:
    """The rollout engine's share of the GPUs for ``cfg`` laid out over ``world_size`` ranks, ``gpus_per_node`` a
    node. ``full_params``: the whole model's parameter count (the servers' and the embedded engine's copy)."""
    p, r = cfg.parallel, cfg.rollout
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp * p.context_parallel_size)
    # tp_rank 0 and cp_rank 0 of stage 0 of each replica (Megatron's order: tp fastest, then cp, then dp)
    generators = [d * tp * p.context_parallel_size for d in range(dp)]
    weight_bytes = full_params * torch_dtype(cfg.model.params_dtype, field="model.params_dtype").itemsize
    if r.engine == "local":
        kv = _embedded_kv_bytes(cfg, dp)
        return EngineUsage(
            where="embedded engine", generating_bytes=weight_bytes + kv, training_bytes=0, syncing_bytes=0,
            checkpoint_bytes=0, ranks=frozenset(),
            notes=(f"embedded engine: a whole copy of the policy ({weight_bytes / GIB:.1f} GiB) and its replica's "
                   f"KV cache ({kv / GIB:.1f} GiB) on each generating rank while it generates",))
    s = r.sglang
    cpu_servers = s.server_device == "cpu" or (s.server_device == "auto" and cfg.hardware.accelerator == "cpu")
    if s.server_urls or s.router_url or cpu_servers:
        return EngineUsage(where="servers on the host" if cpu_servers else "servers elsewhere", generating_bytes=0,
                           training_bytes=0, syncing_bytes=0, checkpoint_bytes=0, ranks=frozenset(),
                           notes=("CPU SGLang servers: host processes of their own, not counted here",)
                           if cpu_servers else ())
    per_server = server_tp(s.server_args)
    fraction = mem_fraction_static(s.server_args)
    notes = []
    if fraction is None:
        fraction = DEFAULT_MEM_FRACTION
        notes.append(f"rollout.sglang.server_args has no --mem-fraction-static: assumed {DEFAULT_MEM_FRACTION} "
                     "(SGLang's choice varies with the GPU); set it for colocated servers")
    gpus = s.num_servers * per_server
    hosts = frozenset(g + i for g in generators for i in range(gpus) if g + i < world_size)
    pool = int(fraction * gpu_memory_bytes)
    overhead, context = int(SERVER_OVERHEAD_GIB * GIB), int(SERVER_CONTEXT_GIB * GIB)
    server_weights = -(-weight_bytes // per_server)
    if s.release_memory:
        training, syncing, saving = context, server_weights + context, server_weights + context
    else:
        training = syncing = saving = pool + overhead
    notes.append(f"{s.num_servers} SGLang server(s) x tp {per_server} per replica on the GPUs of ranks "
                 f"{_ranges(hosts)}: static pool {fraction:g} x {gpu_memory_bytes / GIB:.1f} GiB + "
                 f"{SERVER_OVERHEAD_GIB:g} GiB of graphs/activations/context while generating"
                 + (f"; released to {SERVER_CONTEXT_GIB:g} GiB while training, weights "
                    f"({server_weights / GIB:.1f} GiB per GPU) back for the sync" if s.release_memory else
                    "; kept while training (rollout.sglang.release_memory=false)"))
    return EngineUsage(where="colocated servers", generating_bytes=pool + overhead, training_bytes=training,
                       syncing_bytes=syncing, checkpoint_bytes=saving, ranks=hosts, notes=tuple(notes))


def _embedded_kv_bytes(cfg: RunConfig, dp: int) -> int:
    """K and V of every layer for the replica's whole batch at full length, in the model's dtype."""
    m = cfg.model
    rows = -(-cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt // dp)
    length = cfg.rollout.max_prompt_len + cfg.sampling.max_new_tokens
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    itemsize = torch_dtype(m.params_dtype, field="model.params_dtype").itemsize
    return rows * length * m.num_layers * 2 * m.num_query_groups * head_dim * itemsize


def _ranges(ranks) -> str:
    """'0-3, 8-11' for {0, 1, 2, 3, 8, 9, 10, 11}."""
    out, run = [], []
    for r in sorted(ranks):
        if run and r != run[-1] + 1:
            out.append(run)
            run = []
        run.append(r)
    if run:
        out.append(run)
    return ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in out) or "none"
