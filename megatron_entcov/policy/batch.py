"""Rollout samples as training tensors, one right-padded row per sample, split into mini-batches.

Owns :class:`TrainBatch` and :func:`rows_from_samples`. A sample (prompt + response) becomes one right-padded
row of length T. The model reads ``input_ids``; the log-prob of the token at position p+1 comes from the logits
at position p, so ``labels[p] = tokens[p+1]`` and ``loss_mask[p]`` is 1 exactly where tokens[p+1] is a response
token. Right padding keeps every real token before any padding, so the causal mask alone is correct. This row
layout is the step's canonical one: token selection, metrics and histograms read it; the model's micro-batches
are row slices of it or packed rows mapped back to it (policy/packing.py).

Example:
    batch = rows_from_samples(samples, advantages, pad_id=0, sample_ids=ids, key_stride=longest,
                              multiple_of=tp, device=ps.device)
    minis = batch.split(num_mini_batches)     # TrainBatch rows [n, T] each; micro-batches: policy/packing.py

Design notes: docs/design/policy.md
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_entcov.rollout.types import Sample

__all__ = ["TrainBatch", "rows_from_samples"]


@dataclass
class TrainBatch:
    """One sample per right-padded row. Shapes [N, T] unless noted; int64 ids, float32 values, bool masks."""

    input_ids: torch.Tensor
    """[N, T] int64: prompt + response tokens, then ``pad_id``."""
    position_ids: torch.Tensor
    """[N, T] int64: 0 .. T-1 in every row."""
    labels: torch.Tensor
    """[N, T] int64: the next token of each position (``input_ids`` shifted left by one)."""
    loss_mask: torch.Tensor
    """[N, T] bool: True where the label is a response token (scored)."""
    advantages: torch.Tensor
    """[N, T] float32: the sample's advantage at its response tokens, 0 elsewhere."""
    rollout_logprobs: torch.Tensor
    """[N, T] float32: the rollout engine's log-probs at the response tokens, 0 elsewhere."""
    token_keys: torch.Tensor
    """Globally unique int64 key per token (sample id * T + position): Clip-Cov/KL-Cov tie-breaks and the
    seeded random choice depend only on these, not on how rows are split."""
    seq_lengths: torch.Tensor
    """[N] int64: tokens of each row's sample (prompt + response); the rest of the row is padding. Packed
    micro-batches (policy/packing.py) take exactly these tokens."""
    old_logprobs: torch.Tensor | None = None
    """[N, T] float32 log pi_old of the labels under the step's weights; None until the trainer computes them."""
    old_entropy: torch.Tensor | None = None
    """[N, T] float32 entropy of pi_old at each position; None until the trainer computes it."""
    routed_experts: torch.Tensor | None = None
    """[N, T, layers, top-k] int16 (int32 beyond 32767 experts): the rollout's experts of each position's token
    per model layer (``Sample.routed_experts``), -1 where the rollout has none (a sample's last token, padding, a
    sample without routing); None when no sample carries routing (model.moe_routing_source=rollout reads it)."""

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: slice) -> "TrainBatch":
        return TrainBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                             for f in fields(self)})

    def split(self, parts: int) -> list["TrainBatch"]:
        """``parts`` equal consecutive row slices (ValueError if the rows do not divide evenly)."""
        if parts < 1 or self.num_rows % parts:
            raise ValueError(f"cannot split {self.num_rows} rows into {parts} equal parts")
        size = self.num_rows // parts
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def to(self, device: torch.device) -> "TrainBatch":
        """Every tensor on ``device`` (one copy each; the model and device collectives read them there)."""
        return TrainBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                             for f in fields(self)})


def rows_from_samples(samples: list[Sample], advantages: torch.Tensor, *, pad_id: int, sample_ids: list[int],
                      key_stride: int, device: torch.device | str, multiple_of: int = 1) -> TrainBatch:
    """One right-padded row per sample, on ``device`` (packing several samples into a row: policy/packing.py).

    Args:
        samples: the rollouts of this rank, in order.
        advantages: [N] one scalar per sample (broadcast to its response tokens).
        pad_id: token id written into padding (any valid id; padding is masked out).
        sample_ids: a globally unique id per sample (e.g. its index in the step's global batch).
        key_stride: the row length used to build token keys (the step's global maximum sample length, so keys
            of real tokens do not collide between samples whose rows are built on different ranks).
        device: where the rows go: ``ps.device`` for the model (built on the host, copied once per tensor).
            Keyword-only and required, so no caller can leave a batch on the host by forgetting it.
        multiple_of: pad T up to a multiple of this (sequence parallelism needs a multiple of tp).
    """
    if len(samples) != advantages.shape[0] or len(samples) != len(sample_ids):
        raise ValueError(f"{len(samples)} samples, {advantages.shape[0]} advantages, {len(sample_ids)} ids")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    t = max(lengths)
    t = -(-t // multiple_of) * multiple_of
    if max(lengths) > key_stride:
        # Keys of real tokens stay below key_stride (padding past it is never a valid token), so the keys do
        # not depend on the padding multiple (tensor parallelism), only on sample ids and positions.
        raise ValueError(f"key_stride={key_stride} is shorter than the longest sample {max(lengths)}")
    n = len(samples)
    tokens = torch.full((n, t + 1), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, t, dtype=torch.bool)
    rollout_lp = torch.zeros(n, t, dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p == 0:
            raise ValueError(f"sample {i} has an empty prompt: the first response token needs a prompt token's "
                             "logits to be scored; every prompt needs at least one token")
        if len(s.rollout_logprobs) != r:
            raise ValueError(f"sample {i}: {r} response tokens but {len(s.rollout_logprobs)} log-probs")
        tokens[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        # The logits at position p-1+j predict response token j.
        loss_mask[i, p - 1:p - 1 + r] = True
        rollout_lp[i, p - 1:p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    positions = torch.arange(t, dtype=torch.long)
    ids = torch.tensor(sample_ids, dtype=torch.long)
    routed = _routed_rows(samples, t)
    return TrainBatch(
        input_ids=tokens[:, :t].contiguous(),
        position_ids=positions.expand(n, t).contiguous(),
        labels=tokens[:, 1:].contiguous(),
        loss_mask=loss_mask,
        advantages=advantages.float()[:, None].expand(n, t) * loss_mask,
        rollout_logprobs=rollout_lp,
        token_keys=ids[:, None] * key_stride + positions[None, :],
        seq_lengths=torch.tensor(lengths, dtype=torch.long),
        routed_experts=routed,
    ).to(device)


def _routed_rows(samples: list[Sample], t: int) -> torch.Tensor | None:
    """The samples' rollout routing as rows [N, t, layers, top-k] (-1 where there is none), or None if no sample
    has routing. ValueError when two samples' routing has different layers or top-k."""
    shapes = {s.routed_experts.shape[1:] for s in samples if s.routed_experts is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"the samples' routed_experts have different [layers, top-k]: {sorted(shapes)}; every "
                         "sample must come from the same model")
    top = max(int(s.routed_experts.max(initial=0)) for s in samples if s.routed_experts is not None)
    dtype = torch.int16 if top < 2 ** 15 else torch.int32
    out = torch.full((len(samples), t, *shapes.pop()), -1, dtype=dtype)
    for i, s in enumerate(samples):
        if s.routed_experts is not None:
            out[i, :len(s.routed_experts)] = torch.from_numpy(s.routed_experts)
    return out
