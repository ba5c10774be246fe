"""ops.vocab_parallel.logprobs_and_entropy over tp in {1, 2, 4} gloo ranks == single-process float64 reference.

One spawn of 4 CPU ranks runs every case (a launch costs ~10 s of imports on 2 cores): the ranks form tp
groups of size 1 ([0] [1] [2] [3]), 2 ([0 1] [2 3]) and 4 ([0 1 2 3]); in each, rank r holds the vocab shard
[r * V/tp, (r + 1) * V/tp) of the same global logits (Megatron's VocabParallelEmbedding layout). Every rank
compares its log-probs and entropies (which must be the global ones) and its gradient shard with the float64
reference on the full vocab, for fp32 and bf16 inputs and three kinds of logits: normal, extreme
(uniform in [-1e4, 1e4]) and -inf vocab padding (including rows where whole shards are -inf). Labels fall in
every shard. It also counts collectives: forward = one all-reduce(MAX) + one all-reduce(SUM) when tp > 1,
none when tp = 1; backward = none. The parent enforces a deadline and terminates the ranks (dist_utils).

Tolerances (|ours - ref| <= atol + rtol * |ref|), as in tests/unit/test_vocab_parallel.py:
  * values: rtol 1e-5, atol 1e-5 (fp32 compute, a few ulps over V terms; relative because |logp| <= 2e4);
  * gradients: fp32 rtol 1e-4, atol 1e-6; bf16 rtol 2**-8 (the gradient is rounded once to bf16), atol 1e-6.
The shard split changes only the fp32 summation order, which these tolerances absorb.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers

WORLD = 4
TP_SIZES = (1, 2, 4)
SHAPE = (2, 6)  # [B, T]: 12 rows
VOCAB = 256  # 64 per rank at tp = 4
PAD = 40  # -inf padding columns at the end of the vocab in the "padded" case
DTYPES = ("float32", "bfloat16")
KINDS = ("normal", "extreme", "padded")
VALUE_TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {"float32": {"rtol": 1e-4, "atol": 1e-6}, "bfloat16": {"rtol": 2**-8, "atol": 1e-6}}


def _global_case(kind: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = SHAPE[0] * SHAPE[1]
    if kind == "extreme":
        logits = (torch.rand(rows, VOCAB, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    else:
        logits = torch.randn(rows, VOCAB, generator=g, dtype=torch.float64) * 3
    # Labels in every tp=4 shard: row i draws from shard i % 4 (so also from both tp=2 shards).
    shard = VOCAB // 4
    labels = (torch.arange(rows) % 4) * shard + torch.randint(0, shard, (rows,), generator=g)
    if kind == "padded":
        logits[:, VOCAB - PAD :] = float("-inf")
        labels = torch.where(labels >= VOCAB - PAD, labels - PAD, labels)
        logits[0, 3 * shard :] = float("-inf")  # the whole last shard (tp = 4) of this row is -inf
        logits[5, :] = float("-inf")  # one finite logit: three tp=4 shards of this row are all -inf
        logits[5, 70] = 1.0
        labels[5] = 70
    logits = logits.to(dtype)
    g_lp = torch.randn(rows, generator=g)
    g_h = torch.randn(rows, generator=g)
    return logits.view(*SHAPE, VOCAB), labels.view(SHAPE), g_lp.view(SHAPE), g_h.view(SHAPE)


def _reference(logits, labels, g_lp, g_h):
    z = logits.detach().double().requires_grad_()
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    (grad,) = torch.autograd.grad((logp * g_lp.double()).sum() + (entropy * g_h.double()).sum(), z)
    return logp.detach(), entropy.detach(), grad


def _check(failures, name, ours, ref, tol):
    try:
        torch.testing.assert_close(ours.double(), ref, **tol)
    except AssertionError as exc:
        failures.append(f"{name}: {exc}")


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_entcov.ops.vocab_parallel import logprobs_and_entropy

    # Every rank creates every group, in the same order (a gloo requirement).
    my_group = {}
    for tp in TP_SIZES:
        for first in range(0, world_size, tp):
            ranks = list(range(first, first + tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                my_group[tp] = group

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(op)
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce  # the op calls dist.all_reduce through the module attribute
    failures = {tp: [] for tp in TP_SIZES}
    try:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for kind in KINDS:
                logits, labels, g_lp, g_h = _global_case(kind, dtype)
                ref_logp, ref_entropy, ref_grad = _reference(logits, labels, g_lp, g_h)
                for tp in TP_SIZES:
                    tp_rank = rank % tp
                    vocab_local = VOCAB // tp
                    cols = slice(tp_rank * vocab_local, (tp_rank + 1) * vocab_local)
                    for chunk_size, inplace in ((5, False), (None, True)):
                        name = f"tp={tp} rank={rank} {dtype_name} {kind} chunk={chunk_size} inplace={inplace}"
                        shard = logits[..., cols].clone().requires_grad_()
                        calls.clear()
                        logp, entropy = logprobs_and_entropy(
                            shard, labels, my_group[tp], chunk_size=chunk_size, inplace_backward=inplace
                        )
                        expected = [dist.ReduceOp.MAX, dist.ReduceOp.SUM] if tp > 1 else []
                        if calls != expected:
                            failures[tp].append(f"{name}: forward collectives {calls}, expected {expected}")
                        calls.clear()
                        (grad,) = torch.autograd.grad(
                            (logp * g_lp).sum() + (entropy * g_h).sum(), shard
                        )
                        if calls:
                            failures[tp].append(f"{name}: backward ran collectives {calls}")
                        if grad.dtype != dtype or (inplace and grad.data_ptr() != shard.data_ptr()):
                            failures[tp].append(f"{name}: gradient dtype {grad.dtype} / not in place")
                        if not torch.isfinite(grad).all():
                            failures[tp].append(f"{name}: non-finite gradient")
                        _check(failures[tp], f"{name} logprobs", logp, ref_logp, VALUE_TOL)
                        _check(failures[tp], f"{name} entropy", entropy, ref_entropy, VALUE_TOL)
                        _check(failures[tp], f"{name} grad", grad, ref_grad[..., cols], GRAD_TOL[dtype_name])
    finally:
        dist.all_reduce = real_all_reduce
    return failures


@pytest.fixture(scope="module")
def rank_results():
    return run_workers(_worker, world_size=WORLD, timeout=180.0)


@pytest.mark.distributed
@pytest.mark.parametrize("tp", TP_SIZES)
def test_sharded_matches_float64_reference(rank_results, tp):
    failures = [f for per_rank in rank_results for f in per_rank[tp]]
    assert not failures, "\n".join(failures[:10]) + f"\n({len(failures)} failures)"
