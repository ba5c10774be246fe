"""The plan of one config on one set of GPUs: every rank role's phases (plan/phases.py) and whether each fits
(what would fit instead: plan/advice.py).

Example:
    plan = make_plan(cfg, nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    plan.fits, [(r.stage, r.role, r.peak_bytes) for r in plan.roles]
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from megatron_entcov.config import ParallelConfig, RunConfig
from megatron_entcov.plan.activations import estimate_activations
from megatron_entcov.plan.phases import RankPlan, plan_role
from megatron_entcov.plan.servers import EngineUsage, engine_usage
from megatron_entcov.plan.states import RankState, rank_states

__all__ = ["Plan", "make_plan", "attention_kind", "StateCache"]

GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """What every rank role of one config holds in each phase on the given GPUs."""

    cfg: RunConfig
    world_size: int
    gpus_per_node: int
    gpu_memory_bytes: int
    attention: str
    roles: list[RankPlan]
    engine: EngineUsage
    activation_notes: tuple[str, ...] = ()
    advice: list = field(default_factory=list)
    """plan/advice.py ``Advice`` entries: the changes planned when this plan does not fit (filled by
    ``plan_with_advice``)."""

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.roles)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.roles)

    @property
    def layout(self) -> dict[str, int]:
        p = self.cfg.parallel
        return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                "dp": p.data_parallel_size, "cp": p.context_parallel_size, "ep": p.expert_model_parallel_size}


class StateCache:
    """Rank states per (model, layout, world size, optimizer): re-plans that keep the layout reuse the builds."""

    def __init__(self):
        self._states: dict = {}

    def states(self, cfg: RunConfig, world_size: int) -> list[RankState]:
        p = cfg.parallel
        key = (repr(dataclasses.replace(cfg.model, hf_dir=None, recompute="none", transformer_impl="local")),
               p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
               p.context_parallel_size, p.expert_model_parallel_size, p.use_distributed_optimizer, world_size,
               cfg.optim.optimizer)
        if key not in self._states:
            self._states[key] = rank_states(cfg.model, cfg.parallel, world_size=world_size,
                                            optimizer=cfg.optim.optimizer)
        return self._states[key]

    def full_params(self, cfg: RunConfig) -> int:
        """The whole model's parameters (a tp1/pp1 build): what a server or the embedded engine holds."""
        single = copy.deepcopy(cfg)
        single.parallel = ParallelConfig(backend=cfg.parallel.backend)
        single.optim.optimizer = "sgd"
        return self.states(single, 1)[0].params


def attention_kind(cfg: RunConfig, *, te_usable: bool | None = None) -> str:
    """'local' for Megatron's local spec (model.transformer_impl=local, CPU ranks, or auto where Transformer Engine is known
    not to be usable), 'fused' for Transformer Engine's fused attention (the GPU nodes' default)."""
    impl = cfg.model.transformer_impl
    if impl == "local" or cfg.hardware.accelerator == "cpu" or (impl == "auto" and te_usable is False):
        return "local"
    return "fused"


def make_plan(cfg: RunConfig, *, nodes: int | None = None, gpus_per_node: int | None = None,
              gpu_memory_gib: float | None = None, attention: str | None = None,
              cache: StateCache | None = None) -> Plan:
    """Plan ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_memory_gib`` (each defaults to the config's
    ``hardware`` section). ``attention``: 'fused' or 'local' (default: :func:`attention_kind`). ``cache``: rank
    states already built (re-plans). Raises ValueError when the layout does not fit
    the world (the config's own message)."""
    hw = cfg.hardware
    nodes = nodes or hw.nodes
    gpus_per_node = gpus_per_node or hw.gpus_per_node
    gpu_memory = int((gpu_memory_gib or hw.gpu_memory_gib) * GIB)
    world_size = nodes * gpus_per_node
    cfg = copy.deepcopy(cfg).resolve(world_size)
    attention = attention or attention_kind(cfg)
    cache = cache or StateCache()
    states = cache.states(cfg, world_size)
    engine = engine_usage(cfg, world_size=world_size, gpus_per_node=gpus_per_node,
                          full_params=cache.full_params(cfg), gpu_memory_bytes=gpu_memory)
    roles, notes = [], []
    p = cfg.parallel
    per_stage = world_size // p.pipeline_model_parallel_size
    from megatron_entcov.policy.model import sequence_extent

    extent = sequence_extent(cfg)
    for state in states:
        acts = estimate_activations(cfg.model, p, micro_batch_tokens=extent["micro_batch_tokens"],
                                    max_seq_len=extent["max_seq_len"],
                                    packed=bool(cfg.optim.max_tokens_per_micro_batch), attention=attention,
                                    stage=state.stage, device="cpu" if cfg.hardware.accelerator == "cpu" else "cuda")
        if state.stage in (0, p.pipeline_model_parallel_size - 1):
            notes.extend(f"stage {state.stage}: {line}" for line in acts.derivation)
        groups: dict[tuple[bool, bool], int] = {}
        for rank in range(state.stage * per_stage, (state.stage + 1) * per_stage):
            generator = state.stage == 0 and rank % (p.tensor_model_parallel_size * p.context_parallel_size) == 0
            key = (generator, engine.on_rank(rank))
            groups[key] = groups.get(key, 0) + 1
        for (generator, hosts), count in sorted(groups.items(), reverse=True):
            role = {(True, True): "generating rank + server GPU", (True, False): "generating rank",
                    (False, True): "server GPU", (False, False): "other ranks"}[(generator, hosts)]
            roles.append(plan_role(cfg, state, acts, engine, role=role, ranks=count, generator=generator,
                                   hosts_server=hosts, gpu_memory_bytes=gpu_memory))
    return Plan(cfg=cfg, world_size=world_size, gpus_per_node=gpus_per_node, gpu_memory_bytes=gpu_memory,
                attention=attention, roles=roles, engine=engine, activation_notes=tuple(notes))
