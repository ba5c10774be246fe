"""Routing replay for mixture-of-experts policies (``model.moe_routing_replay``): the step's old-log-prob forward
records each MoE layer's top-k experts per token, and the training forwards of each mini-batch route every token to
the experts recorded for it, so the importance ratio pi/pi_old compares the same experts.

Megatron-Core 0.16.1's TopKRouter passes its ``router_replay`` object to the top-k routing and calls only its
``get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``; the replayed probabilities are
the router's own scores gathered at the recorded experts (still differentiable). Megatron's RouterReplay keeps a
class-wide list of every instance ever built (a process building several models would mix them); this module
puts its own :class:`_LayerReplay` on each router of the actor's chunks instead.

A router is called once per micro-batch of a forward, in the micro-batches' order, whatever the pipeline schedule
(each layer lives on one chunk). The old-log-prob forward packs the step as each mini-batch's training step packs it
(policy/packing.py ``parts``), so the recorded routing of mini-batch ``i`` is the run of micro-batches its own
forward has, in the same shapes. With ``model.recompute=full`` a layer routes each micro-batch a second time, inside
the backward (the recomputed forward); every Megatron schedule runs one chunk's backwards in the order of its
forwards, so the ``j``-th recomputation of a layer in a forward is micro-batch ``j``: each layer keeps one cursor for
its forwards and one for its recomputations, and both index the recorded routing by micro-batch.

Example:
    replay = RoutingReplay(chunks)
    with replay.recording(micro_batch_counts):      # old log-probs: micro-batches per mini-batch, in order
        ...forward over the step...
    with replay.replaying(part=i):                 # one forward over mini-batch i (training or selection)
        ...forward and backward (recomputed layers included)...
    replay.changed, replay.routed                  # (token, layer) pairs whose own top-k differed / all, so far
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

__all__ = ["RoutingReplay"]


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread: a router called then is the recomputed
    forward of a checkpointed layer (model.recompute=full), not a forward of the schedule."""
    return torch._C._current_graph_task_id() != -1


class _LayerReplay:
    """One router's recorded top-k indices [tokens, k] per micro-batch, in order, and the replay cursors: the
    micro-batch of this layer's next forward and of its next recomputed forward (see the module docstring)."""

    def __init__(self, owner: "RoutingReplay"):
        self.owner, self.recorded, self.cursor, self.recompute_cursor = owner, [], 0, 0

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        mode = self.owner.mode
        if mode == "record":
            self.recorded.append(indices.detach().clone())
            return probs, indices
        if mode != "replay":
            return probs, indices
        recomputed = _in_backward()
        micro_batch = self.recompute_cursor if recomputed else self.cursor
        parts, part = self.owner.part_offsets, self.owner.part
        if parts[part] + micro_batch >= parts[part + 1]:
            raise RuntimeError(f"routing replay: mini-batch {part} has {parts[part + 1] - parts[part]} recorded "
                               f"micro-batches and this forward {'recomputes' if recomputed else 'routes'} more; "
                               "the forward must split the mini-batch as the old-log-prob forward did")
        target = self.recorded[parts[part] + micro_batch].to(scores.device)
        if target.shape != indices.shape:
            raise RuntimeError(f"routing replay: recorded routing {tuple(target.shape)} for {tuple(indices.shape)} "
                               f"tokens of micro-batch {micro_batch}: the micro-batch differs from the recorded one")
        if recomputed:
            self.recompute_cursor += 1
        else:
            self.cursor += 1
            # A token's routing changed when its own top-k set differs from the recorded one (order aside); a
            # recomputation routes the same tokens again and is not counted twice.
            changed = (indices.sort(dim=-1).values != target.sort(dim=-1).values).any(dim=-1)
            self.owner.changed += changed.sum()
            self.owner.routed += changed.numel()
        return scores.gather(1, target), target


class RoutingReplay:
    """The recorded routing of one step for every MoE router of ``chunks`` (see the module docstring)."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter

        self.layers: list[_LayerReplay] = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.router_replay = _LayerReplay(self)
                    self.layers.append(module.router_replay)
        self.mode: str | None = None
        self.part = 0
        self.part_offsets: list[int] = [0]
        """Index of each mini-batch's first recorded micro-batch (and the total at the end)."""
        self.changed: torch.Tensor | int = 0
        """(token, MoE layer) pairs of the replayed forwards whose router chose other experts than recorded."""
        self.routed = 0
        """(token, MoE layer) pairs routed in the replayed forwards (prompt, response and padding positions)."""

    @contextmanager
    def recording(self, micro_batches_per_part: Sequence[int]) -> Iterator[None]:
        """Record the routing of one forward whose micro-batches are, in order, ``micro_batches_per_part[i]`` of
        each mini-batch ``i``; forgets the previous recording and resets the counts."""
        for layer in self.layers:
            layer.recorded = []
        offsets = [0]
        for count in micro_batches_per_part:
            offsets.append(offsets[-1] + count)
        self.part_offsets, self.changed, self.routed = offsets, 0, 0
        self.mode = "record"
        try:
            yield
        finally:
            self.mode = None
        for i, layer in enumerate(self.layers):
            if len(layer.recorded) != offsets[-1]:
                raise RuntimeError(f"routing replay: MoE router {i} recorded {len(layer.recorded)} micro-batches, "
                                   f"expected {offsets[-1]}")

    @contextmanager
    def replaying(self, part: int) -> Iterator[None]:
        """Route one forward over mini-batch ``part`` by the recorded experts (its micro-batches from the first)."""
        if not 0 <= part < len(self.part_offsets) - 1:
            raise RuntimeError(f"routing replay: no routing recorded for mini-batch {part} "
                               f"({len(self.part_offsets) - 1} recorded)")
        for layer in self.layers:
            layer.cursor = layer.recompute_cursor = 0
        self.mode, self.part = "replay", part
        try:
            yield
        finally:
            self.mode = None
