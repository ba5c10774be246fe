"""Running micro-batches through Megatron's pipeline schedules (no pipelining, 1F1B, interleaved).

The caller gives the micro-batches of this data-parallel rank (the same list on every rank of the
model-parallel group; any :class:`ModelInput`, e.g. policy.packing.MicroBatch) and a
``loss_fn(micro_batch, logits) -> (loss, outputs)`` that runs on the last pipeline stage with this rank's
vocabulary shard of the logits [b, T, V/tp]. The loss must already be normalised by the caller's *global*
denominator; this module undoes Megatron's own averaging (1/num_microbatches and x cp in the schedule, 1/(dp x cp)
in the DDP gradient reduction) so gradients are exact sums of the caller's losses (over the context-parallel ranks
too, each of which scores its own tokens). Megatron's schedules hand each
micro-batch object through their data iterator to our forward step untouched: any type works there.

Example:
    outputs = run_microbatches(chunks, micro_batches, loss_fn, ps=ps, forward_only=False)
    # outputs: one `outputs` dict per micro-batch on the last stage, [] elsewhere

Design notes: docs/design/policy.md
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["run_microbatches", "ModelInput"]


@dataclass(kw_only=True)
class ModelInput:
    """What the model reads of one micro-batch. Subclasses add what their loss reads (policy.packing.MicroBatch)."""

    input_ids: torch.Tensor
    """[b, T] int64 token ids: b right-padded rows of one length, or [1, L] for one packed row."""
    position_ids: torch.Tensor
    """int64, the shape of ``input_ids``: the RoPE position of each token (restarting at 0 per packed sample)."""
    packed_seq_params: PackedSeqParams | None = None
    """The sample boundaries of a packed row (THD format, ``cu_seqlens``); None for padded rows."""


InputT = TypeVar("InputT", bound=ModelInput)


def _forward_step(loss_fn: Callable, data_iterator: Iterator[ModelInput], model: torch.nn.Module):
    batch = next(data_iterator)
    # attention_mask=None: the local and TE specs then apply the causal mask themselves. Row sequences are
    # right-padded, so padding never precedes a real token and needs no mask of its own; packed rows carry
    # their sample boundaries in packed_seq_params (policy/packing.py).
    output = model(batch.input_ids, batch.position_ids, None, packed_seq_params=batch.packed_seq_params)
    return output, functools.partial(loss_fn, batch)


def run_microbatches(
    chunks: list[torch.nn.Module],
    micro_batches: Sequence[InputT],
    loss_fn: Callable[[InputT, torch.Tensor], tuple[torch.Tensor, dict]],
    *,
    ps: "ParallelState",
    forward_only: bool,
) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``micro_batches`` with the pipeline schedule.

    Args:
        chunks: this rank's model chunks (DDP-wrapped for training), one per virtual pipeline stage.
        micro_batches: equal-shape row micro-batches [b, T], or packed ones [1, L_i] with ``packed_seq_params``
            (policy/packing.py), identical on all model-parallel ranks; their number may differ between
            data-parallel ranks (the gradient reduction runs once, after the last).
        loss_fn: called on the last stage as ``loss_fn(micro_batch, logits)`` with logits [b, T, V/tp];
            returns (loss scalar normalised by the global denominator, dict of outputs to return).
        ps: the parallel state.
        forward_only: no backward (old log-prob recomputation, evaluation).

    Returns:
        On the last pipeline stage, the outputs dict of each micro-batch, in order; [] elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not micro_batches:
        return []
    b, t = micro_batches[0].input_ids.shape
    packed = micro_batches[0].packed_seq_params is not None
    for i, mb in enumerate(micro_batches):
        shape = tuple(mb.input_ids.shape)
        if packed != (mb.packed_seq_params is not None) or (shape != (b, t) and not (packed and shape[0] == 1)):
            raise ValueError(f"micro_batches[{i}] has shape {shape}, expected {(b, t)}: pad every row micro-batch "
                             "of a call to the same [b, T] (only packed micro-batches [1, L] may differ in L)")
    # Packed rows differ in length: the pipeline stages then send each activation's shape before it.
    get_model_config(chunks[0]).variable_seq_lengths = any(
        mb.input_ids.shape[1] != t for mb in micro_batches) and ps.pp_size > 1
    # Under context parallelism the inputs are this rank's tokens; Megatron wants the sequence's full length (it
    # divides by cp for the activations it sends between stages).
    t = max(mb.input_ids.shape[1] for mb in micro_batches) * ps.cp_size
    num_mb = len(micro_batches)
    # Megatron divides each micro-batch loss by num_microbatches and multiplies it by cp, and DDP averages gradients
    # over dp x cp. The caller's loss is already a share of the global mean: scale those factors back out.
    scale = float(num_mb * ps.dp_size)

    def scaled_loss(batch, output):
        loss, outputs = loss_fn(batch, output)
        return loss * scale, outputs

    vpp = len(chunks)
    iterators = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    forward_backward = get_forward_backward_func()
    results = forward_backward(
        forward_step_func=functools.partial(_forward_step, scaled_loss),
        data_iterator=iterators,
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=num_mb,
        seq_length=t,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    return list(results) if ps.is_last_stage else []
