"""Token histograms: a uniform sample of the step's tokens (covariance, entropy) for TensorBoard, identical for
every parallel layout, gathered to rank 0.

Each optimizer mini-batch contributes ceil(K / num_mini_batches) of its valid tokens: those with the smallest
splitmix64(token key XOR salt) over the data-parallel group (ops/covariance.global_random_choice_mask, with a
salt of its own), so the sample depends on the token keys, the seed and the step only. The chosen tokens
(Clip-Cov detached / KL-Cov penalised) are sampled the same way among themselves.

Example:
    hist = TokenHistograms(cfg.metrics.histogram_tokens, num_mini_batches=2, seed=cfg.seed, step=step, ps=ps)
    for mini in batch.split(2):
        selection = ...
        hist.add(mini, selection)          # every rank of the last pipeline stage
    values = hist.gather()                 # rank 0: {"cov/tokens": array, ...}; {} elsewhere
Design notes: docs/design/monitor.md
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives
from megatron_entcov.ops.covariance import global_random_choice_mask, selection_salt

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState
    from megatron_entcov.losses.policy import TokenSelection
    from megatron_entcov.policy.batch import TrainBatch

__all__ = ["HISTOGRAM_TAGS", "TokenHistograms", "histogram_seed"]

HISTOGRAM_TAGS = {
    "cov/tokens": "token covariance (log pi - mean)(A - mean) of the mini-batch, sampled tokens",
    "entropy/tokens": "policy entropy at the sampled tokens (nats, temperature applied)",
    "cov/chosen_tokens": "covariance of the tokens Clip-Cov detached / KL-Cov penalised (a sample of them)",
    "entropy/chosen_tokens": "entropy at the tokens Clip-Cov detached / KL-Cov penalised (a sample of them)",
}
"""TensorBoard histogram tags and what they show."""

_STREAM = 0x68697374_6f677261  # "histogra": the sample's random stream, independent of Clip-Cov's choice


def histogram_seed(seed: int) -> int:
    """The seed of the histogram sample's stream (``global_random_choice_mask(seed=..., step=step)``)."""
    return selection_salt(seed, _STREAM)


class TokenHistograms:
    """Collects one step's sampled token values mini-batch by mini-batch; :meth:`gather` sends them to rank 0.

    Every rank of the last pipeline stage calls :meth:`add` for every mini-batch (it is collective over the
    data-parallel group); every rank calls :meth:`gather` (collective over the world).
    """

    def __init__(self, tokens: int, *, num_mini_batches: int, seed: int, step: int, ps: "ParallelState | None",
                 sample_chosen: bool):
        """``tokens``: sample size per step (0 = off). ``sample_chosen``: also sample the chosen tokens (the
        loss chooses some: clip_cov, kl_cov)."""
        self.per_mini = math.ceil(tokens / num_mini_batches) if tokens > 0 else 0
        self.seed, self.step, self.ps = histogram_seed(seed), step, ps
        self.sample_chosen = sample_chosen
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {tag: [] for tag in HISTOGRAM_TAGS}

    @property
    def enabled(self) -> bool:
        return self.per_mini > 0

    def add(self, mini: "TrainBatch", selection: "TokenSelection") -> None:
        """Sample this mini-batch's tokens (collective over the data-parallel group)."""
        if not self.enabled:
            return
        group = self.ps.dp_group if self.ps is not None and dist.is_initialized() else None
        keys, valid = mini.token_keys, mini.loss_mask.bool()
        n = torch.tensor(self.per_mini, dtype=torch.int64, device=keys.device)
        picked = {"": global_random_choice_mask(keys, valid, n, seed=self.seed, step=self.step, group=group)}
        if self.sample_chosen:
            chosen = valid & (selection.clip_cov_mask | selection.kl_cov_mask)
            picked["chosen_"] = global_random_choice_mask(keys, chosen, n, seed=self.seed, step=self.step,
                                                          group=group)
        if self.ps is not None and not self.ps.owns_results:
            return
        for prefix, mask in picked.items():
            k = keys[mask].cpu().numpy()
            self._parts[f"cov/{prefix}tokens"].append((k, selection.covariance[mask].float().cpu().numpy()))
            self._parts[f"entropy/{prefix}tokens"].append((k, mini.old_entropy[mask].float().cpu().numpy()))

    def local_values(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """This rank's (keys, values) per tag."""
        out = {}
        for tag, parts in self._parts.items():
            if parts:
                out[tag] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return out

    def gather(self) -> dict[str, np.ndarray]:
        """Every replica's samples on rank 0, ordered by token key (so the array, not only the histogram, is the
        same for every layout); {} on the other ranks and when off. Collective over the world."""
        if not self.enabled:
            return {}
        mine = self.local_values()
        if self.ps is None or not dist.is_initialized() or dist.get_world_size() == 1:
            everyone = [mine]
        else:
            everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            collectives.gather_object(mine, everyone, dst=0)
            if dist.get_rank() != 0:
                return {}
        out = {}
        for tag in HISTOGRAM_TAGS:
            parts = [d[tag] for d in everyone if d and tag in d]
            if not parts:
                continue
            keys = np.concatenate([p[0] for p in parts])
            values = np.concatenate([p[1] for p in parts])
            if len(keys):
                out[tag] = values[np.argsort(keys, kind="stable")]
        return out
