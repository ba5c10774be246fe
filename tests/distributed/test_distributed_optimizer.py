"""The distributed optimizer (``parallel.use_distributed_optimizer=true``) on CPU with gloo at dp=2, checked
against Megatron's plain optimizer: same initial weights, same per-rank batches, same Adam steps (with active
gradient clipping and weight decay) -> the same parameters on every rank after every step; its state really is
sharded; a non-finite gradient on one rank skips the step on both; and its Adam state round-trips through a
checkpoint, so a resumed run continues exactly like an uninterrupted one.

The reference is independent of what is under test: the plain optimizer all-reduces whole gradients and
updates every parameter on every rank, while the distributed one reduce-scatters the gradients, updates only
this rank's shard of each bucket, and all-gathers the parameters back after the step. A missing all-gather
leaves half of every bucket stale on each rank; a wrong reduce-scatter or clip changes the update.

One spawn of 2 ranks runs everything (each launch costs ~6 s of imports).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

SEED = 11
STEPS = 3          # the checkpoint is saved after step 1; steps 2 and 3 run twice (uninterrupted / resumed)
B, T = 2, 8        # rows per micro-batch, tokens per row; 2 micro-batches per step
RTOL, ATOL = 1e-5, 1e-6

# A tiny model; Adam with a clip below the gradient norm (~0.2) so clipping with the global norm is exercised.
TINY = TINY_MODEL + TINY_STEP + [
    "model.add_qkv_bias=true", "optim.optimizer=adam", "optim.lr=1e-2", "optim.weight_decay=0.01",
    "optim.clip_grad=0.05",
]


def _setup(distributed: bool, world_size: int):
    """Same seed, same layout: the model starts from the same weights whichever optimizer is used."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model
    from megatron_entcov.policy.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(None, TINY + [f"parallel.use_distributed_optimizer={str(distributed).lower()}"])
    cfg = cfg.resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=SEED)
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, ps), cfg)
    optimizer, _ = build_optimizer(chunks, cfg)
    return ps, chunks, optimizer


def _micro_batches(step: int, dp_rank: int) -> list:
    """This data-parallel rank's batch of ``step``: different on each rank, identical across runs."""
    from megatron_entcov.policy.pipeline import ModelInput

    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    ids = torch.randint(0, 32, (2 * B, T), generator=g)
    pos = torch.arange(T).expand(B, T).contiguous()
    return [ModelInput(input_ids=ids[i * B:(i + 1) * B], position_ids=pos) for i in range(2)]


def _train_step(ps, chunks, optimizer, step: int, *, poison: bool = False) -> tuple[bool, float]:
    """Forward/backward over this rank's micro-batches, then our optimizer_step; ``poison`` makes this rank's
    loss (and so its gradients) NaN."""
    from megatron_entcov.policy.optimizer import optimizer_step, zero_grads
    from megatron_entcov.policy.pipeline import run_microbatches

    def loss_fn(batch, logits):
        loss = logits.float().pow(2).mean() / 2
        return (loss * float("nan") if poison else loss), {}

    zero_grads(chunks, optimizer)
    run_microbatches(chunks, _micro_batches(step, ps.dp_rank), loss_fn, ps=ps, forward_only=False)
    return optimizer_step(optimizer)


def _params(chunks) -> dict:
    """Every parameter as a numpy copy (tensors sent back to the parent would be shared-memory handles that
    die with the rank)."""
    return {n: p.detach().numpy().copy() for c in chunks for n, p in c.named_parameters()}


def _adam_state(optimizer) -> list[dict[str, torch.Tensor]]:
    """The inner torch optimizer's state per parameter it holds (this rank's shards with the distributed
    optimizer), in parameter-group order."""
    out = []
    for part in optimizer.chained_optimizers:
        inner = part.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                out.append({k: torch.as_tensor(v).detach().numpy().copy() for k, v in inner.state[p].items()})
    return out


def _held_numel(optimizer) -> int:
    return sum(p.numel() for part in optimizer.chained_optimizers for p in part.get_parameters())


def _worker(rank, world_size, tmp):
    from megatron_entcov.run.checkpoint import Checkpointer

    res: dict = {"ref": [], "dist": [], "resumed": []}
    # Reference: Megatron's plain optimizer (whole gradients all-reduced, every parameter updated everywhere).
    ps, chunks, opt = _setup(False, world_size)
    res["init_ref"] = _params(chunks)
    res["total_numel"] = sum(p.numel() for c in chunks for p in c.parameters())
    for step in range(1, STEPS + 1):
        res["ref"].append((_train_step(ps, chunks, opt, step), _params(chunks)))

    # Under test: the distributed optimizer; a checkpoint after step 1.
    ps, chunks, opt = _setup(True, world_size)
    res["init_dist"] = _params(chunks)
    res["held_numel"] = _held_numel(opt)
    ckpt = Checkpointer(f"{tmp}/checkpoints", ps)
    for step in range(1, STEPS + 1):
        res["dist"].append((_train_step(ps, chunks, opt, step), _params(chunks)))
        if step == 1:
            res["state_saved"] = _adam_state(opt)
            ckpt.save(step, chunks, optimizer=opt)
    # A non-finite gradient on rank 1 only: both ranks skip, nothing changes anywhere.
    before = _params(chunks)
    res["poisoned"] = _train_step(ps, chunks, opt, STEPS + 1, poison=rank == 1)
    res["poison_changed"] = [n for n, p in _params(chunks).items() if not (p == before[n]).all()]

    # Resume: a fresh model and optimizer (initial weights, no Adam state) load step 1 and redo steps 2..3.
    ps, chunks, opt = _setup(True, world_size)
    ckpt = Checkpointer(f"{tmp}/checkpoints", ps)
    ckpt.load(ckpt.find_latest(), chunks, optimizer=opt)
    res["params_loaded"] = _params(chunks)
    res["state_loaded"] = _adam_state(opt)
    for step in range(2, STEPS + 1):
        res["resumed"].append((_train_step(ps, chunks, opt, step), _params(chunks)))
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed_optimizer")
    return run_workers(_worker, 2, args=(str(tmp),), timeout=240)


def _assert_params_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameter names differ"
    for name in expected:
        torch.testing.assert_close(torch.from_numpy(actual[name]), torch.from_numpy(expected[name]), rtol=RTOL,
                                   atol=ATOL, msg=lambda m, name=name: f"{what}: {name}: {m}")


def test_same_initial_weights(results):
    for rank, res in enumerate(results):
        _assert_params_close(res["init_dist"], res["init_ref"], f"rank {rank} initial weights")


def test_adam_steps_match_the_plain_optimizer_on_every_rank(results):
    """Every parameter, after every step, on every rank: the reduce-scattered gradients, the global-norm clip of
    the shards and the all-gather of the updated shards reproduce the plain optimizer's update."""
    for rank, res in enumerate(results):
        for step, ((ref_ok, ref_norm), ref), ((ok, norm), got) in zip(range(1, STEPS + 1), res["ref"], res["dist"]):
            assert ref_ok and ok, f"rank {rank} step {step}: a step was skipped"
            assert norm == pytest.approx(ref_norm, rel=RTOL), f"rank {rank} step {step}: grad norm"
            assert norm > 0.05, f"step {step}: grad norm {norm} does not exceed optim.clip_grad; clip not exercised"
            _assert_params_close(got, ref, f"rank {rank} after step {step}")
        changed = [n for n, p in res["dist"][0][1].items() if not (p == res["init_dist"][n]).all()]
        assert len(changed) == len(res["init_dist"]), "the first step left parameters unchanged"


def test_optimizer_state_is_sharded_over_data_parallel_ranks(results):
    """Each rank's optimizer holds a disjoint shard: together exactly the model, each well under it."""
    total = results[0]["total_numel"]
    held = [res["held_numel"] for res in results]
    assert sum(held) == total, f"shards {held} do not add up to the {total} model parameters"
    assert all(0 < h < total for h in held), held


def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(results):
    for rank, res in enumerate(results):
        applied, norm = res["poisoned"]
        assert not applied and norm != norm, f"rank {rank}: applied={applied}, grad norm {norm}"
        assert res["poison_changed"] == [], f"rank {rank}: a skipped step changed {res['poison_changed']}"


def test_checkpoint_round_trips_adam_state(results):
    for rank, res in enumerate(results):
        _assert_params_close(res["params_loaded"], res["dist"][0][1], f"rank {rank} loaded weights")
        saved, loaded = res["state_saved"], res["state_loaded"]
        assert len(saved) == len(loaded) > 0
        for i, (s, g) in enumerate(zip(saved, loaded)):
            assert s.keys() == g.keys() and {"exp_avg", "exp_avg_sq"} <= s.keys(), (s.keys(), g.keys())
            for key in s:
                torch.testing.assert_close(torch.from_numpy(g[key]), torch.from_numpy(s[key]), rtol=0, atol=0,
                                           msg=lambda m, i=i, key=key: f"rank {rank} state {i} {key}: {m}")


def test_resumed_steps_equal_uninterrupted_ones(results):
    for rank, res in enumerate(results):
        for step, ((ok, norm), got), ((_, ref_norm), ref) in zip(range(2, STEPS + 1), res["resumed"], res["dist"][1:]):
            assert ok and norm == pytest.approx(ref_norm, rel=RTOL)
            _assert_params_close(got, ref, f"rank {rank} resumed step {step}")


def test_allocated_adam_state_is_what_adams_first_step_creates():
    """compat.distrib_optimizer allocates torch Adam's state at build time (so a fresh optimizer's state dict
    exists for a checkpoint load): the first update and the state after it are bit-identical to the lazy ones."""
    from types import SimpleNamespace

    from megatron_entcov.compat.distrib_optimizer import allocate_adam_state

    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    params = [torch.nn.Parameter(weight.clone()) for _ in range(2)]
    lazy, eager = (torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) for p in params)
    allocate_adam_state(SimpleNamespace(optimizer=eager))
    assert set(eager.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"} and not lazy.state
    for p in params:
        p.grad = grad.clone()
    lazy.step()
    eager.step()
    assert torch.equal(params[0], params[1])
    for key, value in lazy.state[params[0]].items():
        other = eager.state[params[1]][key]
        assert other.dtype == value.dtype and other.device == value.device and torch.equal(other, value), key
