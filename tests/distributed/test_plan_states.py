"""The planner's weights, gradient-buffer and optimizer bytes per rank (plan/states.py, from a meta-device build
in a fake world) equal the bytes of the tensors the trainer's own builders allocate on each rank, to the byte.

The reference walks real ranks: a gloo job builds the model (policy/model.py), wraps it in Megatron's DDP and
builds the optimizer (policy/optimizer.py) exactly as the Actor does, runs one optimizer step so Adam's state
exists, then sums the distinct storages of the parameters, of their ``main_grad`` buffers, and of everything the
optimizer holds that is neither (master copies, moments, step counts). At tp1, tp2, pp2 and tp2 x pp2, with
and without the distributed optimizer, tied and untied embeddings; and a tiny MoE model at ep2 and ep2 x pp2
(expert buffers with their own data-parallel group, here of one rank: exact).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

# Shapes that make every padding visible: a vocabulary that is not a multiple of the padding unit, buckets of
# several parameters, a shared-embedding bucket at pp2.
MODEL = TINY_MODEL + TINY_STEP + ["model.vocab_size=37", "model.add_qkv_bias=true", "optim.optimizer=adam"]
MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=16"]
LAYOUTS = {
    2: [(1, 1, True, 1), (2, 1, True, 1), (1, 2, True, 1), (1, 2, False, 1), (1, 1, False, 2)],
    4: [(2, 1, True, 1), (1, 2, True, 1), (2, 2, True, 1), (2, 2, False, 1), (1, 2, True, 2)],
}
"""world size -> (tp, pp, tied embeddings, ep) run at it, each with and without the distributed optimizer; ep > 1:
a tiny Qwen3-MoE-style model (4 experts, top 2) whose expert buffers have their own data-parallel group."""


def _overrides(tp: int, pp: int, tied: bool, ep: int, distributed: bool) -> list[str]:
    return MODEL + (MOE + [f"parallel.expert_model_parallel_size={ep}"] if ep > 1 else []) + [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"model.tie_word_embeddings={str(tied).lower()}",
        f"parallel.use_distributed_optimizer={str(distributed).lower()}"]


def _storages(tensors) -> dict:
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            out[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return out


def _torch_optimizers(opt) -> list:
    if hasattr(opt, "chained_optimizers"):
        return [o for c in opt.chained_optimizers for o in _torch_optimizers(c)]
    return [opt.optimizer]


def _walk(rank: int, world_size: int):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model
    from megatron_entcov.policy.optimizer import build_optimizer, optimizer_step, wrap_ddp, zero_grads
    from megatron_entcov.policy.pipeline import ModelInput, run_microbatches

    out = {}
    for tp, pp, tied, ep in LAYOUTS[world_size]:
        for distributed in (False, True):
            cfg = load_config(None, _overrides(tp, pp, tied, ep, distributed)).resolve(world_size)
            ps = init_parallel(cfg.parallel, seed=3)
            chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, ps), cfg)
            optimizer, _ = build_optimizer(chunks, cfg)
            ids = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(ps.dp_rank))
            batch = [ModelInput(input_ids=ids, position_ids=torch.arange(8).expand(2, 8).contiguous())]
            zero_grads(chunks, optimizer)
            run_microbatches(chunks, batch, lambda mb, logits: (logits.float().pow(2).mean(), {}), ps=ps,
                             forward_only=False)
            assert optimizer_step(optimizer)[0]
            params = [p for c in chunks for p in c.parameters()]
            weights = _storages(params)
            grads = _storages(p.main_grad for p in params)
            held = []
            for opt in _torch_optimizers(optimizer):
                held += [p for g in opt.param_groups for p in g["params"]]
                held += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
            held = {k: v for k, v in _storages(held).items() if k not in weights and k not in grads}
            out[(tp, pp, tied, ep, distributed)] = {
                "stage": ps.pp_rank, "dp_rank": ps.dp_rank, "params": sum(p.numel() for p in params),
                "weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": sum(held.values())}
    return out


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def walked(request):
    return request.param, run_workers(_walk, request.param, timeout=420)


def test_planned_state_bytes_equal_the_allocated_ones_on_every_rank(walked):
    from megatron_entcov.config import load_config
    from megatron_entcov.plan.states import rank_states

    world_size, ranks = walked
    for key in ranks[0]:
        tp, pp, tied, ep, distributed = key
        cfg = load_config(None, _overrides(tp, pp, tied, ep, distributed)).resolve(world_size)
        planned = rank_states(cfg.model, cfg.parallel, world_size=world_size, optimizer=cfg.optim.optimizer)
        assert len(planned) == pp
        for rank, got in enumerate(r[key] for r in ranks):
            plan = planned[got["stage"]]
            where = f"world {world_size}, tp{tp} pp{pp} ep{ep} tied={tied} distributed={distributed}, rank {rank}"
            assert plan.params == got["params"], where
            assert plan.weights_bytes == got["weights"], where
            assert plan.grads_bytes == got["grads"], where
            assert plan.optimizer_bytes_by_dp_rank[got["dp_rank"]] == got["optimizer"], where
