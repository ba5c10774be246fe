"""The check after every weight sync: each server's log-probs on a probe prompt equal the trainer's.

After the sync every server (``engine.probe``; one request per server, no failover) decodes
``weight_sync.probe_tokens`` tokens greedily (sampled at a sampling temperature other than 1) from a fixed probe
prompt, and the trainer recomputes the log-probs of exactly those tokens with its own (just synced) weights.
The check compares each server's MEDIAN |server - trainer| gap over its tokens with ``weight_sync.verify_tol``:
a tensor not loaded, loaded into the wrong place, or a server on older weights moves most tokens far above
float rounding, while bf16 rounding on one token cannot trip it. The run stops with the servers and gaps
named; ``sync/probe_gap`` (the largest single-token gap) is logged every step either way. Collective over
the world: every rank calls ``verify_sync`` and raises or returns the same verdict.

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

__all__ = ["probe_prompt", "probe_params", "gap_statistics", "verify_sync", "SyncVerificationError"]

PROBE_PROMPT_LEN = SYNC_PROBE_PROMPT_LEN


class SyncVerificationError(RuntimeError):
    """A server's log-probs after a weight sync do not match the trainer's."""


def probe_prompt(vocab_limit: int, length: int = PROBE_PROMPT_LEN, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt of token ids in [0, vocab_limit) (any ids are valid model input)."""
    g = torch.Generator().manual_seed(1_234_567 + seed)
    return torch.randint(0, vocab_limit, (length,), generator=g).tolist()


def probe_params(cfg: "RunConfig", version: int) -> SamplingParams:
    """Greedy decoding (top_k=1) at sampling temperature 1: the probe's tokens are then the likely ones, whose
    log-probs bf16 rounding moves least. At another temperature the tokens are sampled at it instead (SGLang
    reports greedy log-probs without the temperature, which the trainer applies)."""
    greedy = cfg.sampling.temperature == 1.0
    return SamplingParams(temperature=cfg.sampling.temperature, top_p=1.0, top_k=1 if greedy else -1,
                          max_new_tokens=cfg.weight_sync.probe_tokens, seed=version)


def _query(engine, cfg: "RunConfig", version: int, vocab_limit: int) -> list[tuple[str, Sample]]:
    return engine.probe(probe_prompt(vocab_limit, seed=cfg.seed), probe_params(cfg, version))


def gap_statistics(gaps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row (one probe response): [median, max] of ``gaps`` over the tokens where ``mask`` is set (the lower
    median for an even count, so one outlier among two or more tokens never decides it); [0, 0] for a row
    without tokens. Returns float64 [rows, 2]."""
    out = torch.zeros(gaps.shape[0], 2, dtype=torch.float64)
    for row in range(gaps.shape[0]):
        values = gaps[row][mask[row].bool()].double()
        if values.numel():
            out[row, 0], out[row, 1] = values.median(), values.max()
    return out


def verify_sync(engine, policy: "PolicyForward", ps: "ParallelState", cfg: "RunConfig", *, version: int,
                vocab_limit: int) -> dict[str, float]:
    """Probe every server after the sync to ``version``; raises SyncVerificationError on every rank when a
    server's median gap exceeds ``cfg.weight_sync.verify_tol`` or it reports another version.

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
    stats, tokens = _server_gaps([s for _, s in probes], policy, ps)
    if mp_size > 1:
        stats = collectives.reduce_values(stats, op="max", group=ps.mp_group)
    wrong_version = [url for url, s in probes if s.weight_version != version]
    # [worst median, largest gap, a wrong version, tokens compared]
    verdict = torch.tensor([float(stats[:, 0].max()) if len(probes) else 0.0,
                            float(stats[:, 1].max()) if len(probes) else 0.0, float(bool(wrong_version)), tokens],
                           dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Agree on the verdict (MAX) and count tokens: every rank raises or none does.
        worst = collectives.reduce_values(verdict[:3], op="max")
        count = collectives.reduce_values(verdict[3:] if ps.is_generator else [0.0])
        verdict = torch.cat([worst, count])
    median, largest, bad_version, tokens = (float(verdict[0]), float(verdict[1]), bool(verdict[2]),
                                            float(verdict[3]))
    if median > tol or bad_version:
        raise _failure(version, median, largest, tol, bad_version, probes if engine is not None else None, stats)
    if tokens == 0:
        logger.warning("weight sync probe: every probe response was empty (end-of-sequence at once); nothing "
                       "compared at version %d", version)
    return {"sync/probe_gap": largest, "sync/probe_tokens": tokens}


def _server_gaps(samples: list[Sample], policy: "PolicyForward", ps: "ParallelState") -> tuple[torch.Tensor, float]:
    """[median, max] |server - trainer| log-prob gap per probe (``gap_statistics``; zeros off the last pipeline
    stage) and the probe tokens compared."""
    n = len(samples)
    # One row per micro-batch, repeated until the pipeline has as many micro-batches as stages (an interleaved
    # schedule needs at least that many); gaps are read off the first n rows.
    reps = -(-ps.pp_size // n) if ps.pp_size > 1 else 1
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    batch = rows_from_samples(samples * reps, torch.zeros(n * reps), pad_id=0, sample_ids=list(range(n * reps)),
                              key_stride=longest + ps.tp_size, multiple_of=ps.tp_size, device=ps.device)
    lp, _ = policy.forward(batch, micro_batch_size=1 if ps.pp_size > 1 else n)
    stats = torch.zeros(n, 2, dtype=torch.float64)
    if ps.is_last_stage:
        stats = gap_statistics((batch.rollout_logprobs - lp).detach().abs()[:n].cpu(), batch.loss_mask[:n].cpu())
    return stats, float(batch.loss_mask[:n].sum())


def _failure(version: int, median: float, largest: float, tol: float, bad_version: bool,
             probes: list[tuple[str, Sample]] | None, stats: torch.Tensor) -> SyncVerificationError:
    if probes is not None:
        detail = "; ".join(f"{url}: gap {float(g[0]):.3g} (median; largest {float(g[1]):.3g}) over "
                           f"{len(s.response_ids)} tokens, version {s.weight_version}"
                           for (url, s), g in zip(probes, stats))
    else:
        detail = "see the generating rank's error for the servers"
    return SyncVerificationError(
        f"weight sync to version {version} failed its probe: median |server - trainer| log-prob gap {median:.3g} "
        f"over a server's probe tokens (weight_sync.verify_tol={tol:g}; largest single-token gap {largest:.3g})"
        f"{', a server reports another version' if bad_version else ''} [{detail}]. The servers do not compute "
        "with the trainer's weights: a tensor not loaded or loaded into the wrong place, a stale server, or a "
        "dtype mismatch (bf16 servers need a larger weight_sync.verify_tol, see configs/README.md)")
