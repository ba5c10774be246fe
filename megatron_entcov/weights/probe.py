"""The check after every weight sync: each server's log-probs on a probe prompt equal the trainer's.

After the sync every server (``engine.probe``; one sample per server, no failover) samples
``weight_sync.probe_tokens`` tokens from a fixed probe prompt, and the trainer recomputes the log-probs of
exactly those tokens with its own (just synced) weights. A tensor not loaded, loaded into the wrong place, or a
server left on older weights shows up as a gap far above float rounding; the run stops with the servers and
gaps named, before a rollout uses the wrong weights. ``sync/probe_gap`` is logged every step either way.
Collective over the world: every rank calls ``verify_sync``; generating ranks query their engines, each
replica's model-parallel group recomputes the log-probs, and every rank raises or returns the same verdict.

Example:
    stats = verify_sync(engine, policy, ps, cfg, version=7)    # {'sync/probe_gap': 2e-7, ...} or raises

Design notes (why a probe, what it cannot tell): docs/design/weights.md
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_entcov.config import SYNC_PROBE_PROMPT_LEN
from megatron_entcov.distributed import collectives
from megatron_entcov.distributed.parallel import fail_together
from megatron_entcov.policy.batch import rows_from_samples
from megatron_entcov.rollout.types import Sample, SamplingParams

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.distributed.parallel import ParallelState
    from megatron_entcov.policy.forward import PolicyForward

logger = logging.getLogger(__name__)

__all__ = ["probe_prompt", "verify_sync", "SyncVerificationError"]

PROBE_PROMPT_LEN = SYNC_PROBE_PROMPT_LEN


class SyncVerificationError(RuntimeError):
    """A server's log-probs after a weight sync do not match the trainer's."""


def probe_prompt(vocab_limit: int, length: int = PROBE_PROMPT_LEN, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt of token ids in [0, vocab_limit) (any ids are valid model input)."""
    g = torch.Generator().manual_seed(1_234_567 + seed)
    return torch.randint(0, vocab_limit, (length,), generator=g).tolist()


def _query(engine, cfg: "RunConfig", version: int, vocab_limit: int) -> list[tuple[str, Sample]]:
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=1.0, top_k=-1,
                            max_new_tokens=cfg.weight_sync.probe_tokens, seed=version)
    return engine.probe(probe_prompt(vocab_limit, seed=cfg.seed), params)


def verify_sync(engine, policy: "PolicyForward", ps: "ParallelState", cfg: "RunConfig", *, version: int,
                vocab_limit: int) -> dict[str, float]:
    """Probe every server after the sync to ``version``; raises SyncVerificationError on every rank when a
    server's gap exceeds ``cfg.weight_sync.verify_tol`` or it reports another version.

    Args:
        engine: this rank's engine (None on ranks that do not generate).
        policy: the trainer's forward (same temperature as the rollouts).
        vocab_limit: probe token ids stay below this (the tokenizer's size).
    Returns:
        {'sync/probe_gap': largest |server - trainer| log-prob over all servers and probe tokens,
         'sync/probe_tokens': probe tokens compared (all replicas)}
    """
    tol = cfg.weight_sync.verify_tol
    payload: list = [None]
    with fail_together(f"the weight-sync probe at version {version}"):
        if engine is not None:
            payload[0] = [(url, s.to_dict()) for url, s in _query(engine, cfg, version, vocab_limit)]
    mp_size = dist.get_world_size(ps.mp_group) if ps.mp_group is not None and dist.is_initialized() else 1
    if mp_size > 1:
        collectives.broadcast_object_list(payload, src=dist.get_global_rank(ps.mp_group, 0), group=ps.mp_group)
    probes = [(url, Sample.from_dict(d)) for url, d in payload[0]]
    samples = [s for _, s in probes]
    n = len(samples)
    # One row per micro-batch, repeated until the pipeline has as many micro-batches as stages (an interleaved
    # schedule needs at least that many); gaps are read off the first n rows.
    reps = -(-ps.pp_size // n) if ps.pp_size > 1 else 1
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    batch = rows_from_samples(samples * reps, torch.zeros(n * reps), pad_id=0, sample_ids=list(range(n * reps)),
                              key_stride=longest + ps.tp_size, multiple_of=ps.tp_size, device=ps.device)
    lp, _ = policy.forward(batch, micro_batch_size=1 if ps.pp_size > 1 else n)
    gaps = torch.zeros(n, dtype=torch.float64)
    if ps.is_last_stage:
        diff = ((batch.rollout_logprobs - lp).abs() * batch.loss_mask).double()[:n]
        gaps = diff.amax(dim=1).cpu() if diff.numel() else gaps
    if mp_size > 1:
        gaps = collectives.reduce_values(gaps, op="max", group=ps.mp_group)
    wrong_version = [url for url, s in probes if s.weight_version != version]
    tokens = float(batch.loss_mask[:n].sum())
    verdict = torch.tensor([float(gaps.max()) if n else 0.0, float(bool(wrong_version)), tokens],
                           dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Agree on the verdict (MAX) and count tokens: every rank raises or none does.
        worst = collectives.reduce_values(verdict[:2], op="max")
        count = collectives.reduce_values(verdict[2:] if ps.is_generator else [0.0])
        verdict = torch.cat([worst, count])
    gap, bad_version, tokens = float(verdict[0]), bool(verdict[1]), float(verdict[2])
    if gap > tol or bad_version:
        if engine is not None:
            detail = "; ".join(f"{url}: gap {float(g):.3g} over {len(s.response_ids)} tokens, version "
                               f"{s.weight_version}" for (url, s), g in zip(probes, gaps))
        else:
            detail = "see the generating rank's error for the servers"
        raise SyncVerificationError(
            f"weight sync to version {version} failed its probe: largest |server - trainer| log-prob gap {gap:.3g} "
            f"(weight_sync.verify_tol={tol:g}){', a server reports another version' if bad_version else ''} "
            f"[{detail}]. The servers do not compute with the trainer's weights: a tensor not loaded or loaded "
            "into the wrong place, a stale server, or a dtype mismatch (bf16 servers need a larger "
            "weight_sync.verify_tol, see configs/README.md)")
    if tokens == 0:
        logger.warning("weight sync probe: every probe response was empty (end-of-sequence at once); nothing "
                       "compared at version %d", version)
    return {"sync/probe_gap": gap, "sync/probe_tokens": tokens}
