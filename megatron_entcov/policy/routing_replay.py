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

Two sources of the recorded routing (``model.moe_routing_source``): 'old_logprob' records the router's own top-k;
'rollout' gives :meth:`RoutingReplay.recording` the experts the rollout engine chose for every token
(``TrainBatch.routed_experts``, laid out per micro-batch in each router's token order by :func:`rollout_routing`),
and the old-log-prob forward already routes by them: a token the rollout has a row for goes to its experts, any
other (a sample's last token, padding) to the router's own top-k, and that effective routing is what is recorded
and replayed, so pi_old, pi and the rollout's log-probs compare the same experts. Megatron routes a micro-batch's
hidden states [s, b, h] flattened s-major (token s * b + b_i), with sequence parallelism only this tensor-parallel
rank's slice of s, over every expert of the layer by global (logical) id whatever the expert-parallel size; a
router's ``layer_number`` is its global 1-based layer, so pipeline stages take their own layers' columns.

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

__all__ = ["RoutingReplay", "rollout_routing"]


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread: a router called then is the recomputed
    forward of a checkpointed layer (model.recompute=full), not a forward of the schedule."""
    return torch._C._current_graph_task_id() != -1


class _LayerReplay:
    """One router's recorded top-k indices [tokens, k] per micro-batch, in order, and the replay cursors: the
    micro-batch of this layer's next forward and of its next recomputed forward (see the module docstring)."""

    def __init__(self, owner: "RoutingReplay", index: int):
        self.owner, self.index, self.recorded, self.cursor, self.recompute_cursor = owner, index, [], 0, 0

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        mode = self.owner.mode
        if mode == "record":
            if self.owner.rollout is not None:
                indices = self._rollout_or_own(indices)
                probs = scores.gather(1, indices)        # the top-k's own values where the router's choice stays
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

    def _rollout_or_own(self, own: torch.Tensor) -> torch.Tensor:
        """The rollout's experts of this micro-batch's tokens where it has them, the router's own elsewhere."""
        micro_batch = len(self.recorded)
        routing = self.owner.rollout[micro_batch]
        if routing.shape[0] != own.shape[0] or routing.shape[2] != own.shape[1]:
            raise RuntimeError(f"routing replay: the rollout's routing of micro-batch {micro_batch} has "
                               f"{routing.shape[0]} tokens x top-{routing.shape[2]}; MoE router {self.index} "
                               f"routes {own.shape[0]} tokens x top-{own.shape[1]}")
        target = routing[:, self.index].to(device=own.device, dtype=own.dtype)
        has = target[:, :1] >= 0
        differs = (own.sort(dim=-1).values != target.sort(dim=-1).values).any(dim=-1, keepdim=True) & has
        self.owner.rollout_changed += differs.sum()
        self.owner.rollout_routed += has.sum()
        return torch.where(has, target, own)


def rollout_routing(micro: Sequence, routing: torch.Tensor, layer_numbers: Sequence[int], *, tp_rank: int = 0,
                    tp_size: int = 1, sequence_parallel: bool = False) -> list[torch.Tensor]:
    """The rollout's routing of each micro-batch as its routers see the tokens (module docstring).

    Args:
        micro: the forward's micro-batches (policy/packing.py MicroBatch: padded rows, or packed with
            ``flat_index``), in order.
        routing: ``TrainBatch.routed_experts`` [N, T, model layers, k] of the batch ``micro`` splits; -1 = none.
        layer_numbers: each MoE router's global 1-based layer number (``RoutingReplay.layer_numbers``).
        tp_rank, tp_size, sequence_parallel: with sequence parallelism a router sees its rank's slice of s.

    Returns:
        Per micro-batch, [tokens the router sees, len(layer_numbers), k] in the routers' token order, the dtype of
        ``routing`` (-1 where the router keeps its own top-k).
    """
    if routing.shape[2] < max(layer_numbers, default=0):
        raise ValueError(f"the rollout's routing has {routing.shape[2]} layers; the model has MoE layer "
                         f"{max(layer_numbers)} (1-based)")
    columns = torch.tensor([n - 1 for n in layer_numbers], dtype=torch.long, device=routing.device)
    n, t = routing.shape[:2]
    flat = None
    out = []
    for mb in micro:
        if mb.flat_index is None:
            rows = routing[mb.rows]                                       # [b, T, layers, k]
        else:
            if flat is None:                                              # one -1 slot: packed padding
                flat = torch.cat([routing.flatten(0, 1), routing.new_full((1, *routing.shape[2:]), -1)])
            rows = flat[mb.flat_index][None]                              # [1, L, layers, k]
        seq_first = rows.index_select(2, columns).transpose(0, 1)         # [s, b, MoE layers, k]
        if sequence_parallel and tp_size > 1:
            s = seq_first.shape[0] // tp_size
            seq_first = seq_first[tp_rank * s:(tp_rank + 1) * s]
        out.append(seq_first.reshape(-1, *seq_first.shape[2:]))
    return out


class RoutingReplay:
    """The recorded routing of one step for every MoE router of ``chunks`` (see the module docstring)."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter

        self.layers: list[_LayerReplay] = []
        self.layer_numbers: list[int] = []
        """Each router's global 1-based layer number, in the order of ``layers``."""
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.router_replay = _LayerReplay(self, len(self.layers))
                    self.layers.append(module.router_replay)
                    self.layer_numbers.append(int(module.layer_number))
        self.rollout: list[torch.Tensor] | None = None
        """While recording from the rollout: per micro-batch, the rollout's experts (:func:`rollout_routing`)."""
        self.rollout_changed: torch.Tensor | int = 0
        """(token, MoE layer) pairs of the last recording whose own top-k differed from the rollout's experts."""
        self.rollout_routed: torch.Tensor | int = 0
        """(token, MoE layer) pairs of the last recording routed by the rollout's experts."""
        self.mode: str | None = None
        self.part = 0
        self.part_offsets: list[int] = [0]
        """Index of each mini-batch's first recorded micro-batch (and the total at the end)."""
        self.changed: torch.Tensor | int = 0
        """(token, MoE layer) pairs of the replayed forwards whose router chose other experts than recorded."""
        self.routed = 0
        """(token, MoE layer) pairs routed in the replayed forwards (prompt, response and padding positions)."""

    @contextmanager
    def recording(self, micro_batches_per_part: Sequence[int],
                  rollout: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
        """Record the routing of one forward whose micro-batches are, in order, ``micro_batches_per_part[i]`` of
        each mini-batch ``i``; forgets the previous recording and resets the counts. ``rollout``: per micro-batch
        the rollout's experts (:func:`rollout_routing`), which this forward routes by where present."""
        for layer in self.layers:
            layer.recorded = []
        offsets = [0]
        for count in micro_batches_per_part:
            offsets.append(offsets[-1] + count)
        if rollout is not None and len(rollout) != offsets[-1]:
            raise RuntimeError(f"routing replay: the rollout's routing covers {len(rollout)} micro-batches of a "
                               f"forward over {offsets[-1]}")
        self.part_offsets, self.changed, self.routed = offsets, 0, 0
        self.rollout, self.rollout_changed, self.rollout_routed = (None if rollout is None else list(rollout)), 0, 0
        self.mode = "record"
        try:
            yield
        finally:
            self.mode, self.rollout = None, None
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
