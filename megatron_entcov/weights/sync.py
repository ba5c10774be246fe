"""Weight sync: Megatron shards -> full Hugging Face-named tensors -> the rollout engine, in bounded buckets.

Every rank of a model-parallel group takes part in gathering, and only the generating rank (``ps.is_generator``)
receives the full tensors (weights/shards.py ``iter_hf_weights(dst="generator")``: tensor-parallel shards gathered
to each stage's tp rank 0, later stages sending theirs point to point to the generating rank). The generating rank
hands each bucket to its engine as it arrives, so at most ``bucket_bytes`` of full tensors are alive at once;
the other ranks only send. The engine's weight version is set to the trainer's after the last bucket and
checked.

Example:
    sync = WeightSync(chunks, cfg.model, ps, bucket_bytes=256 << 20)
    nbytes = sync.push(engine if is_generator else None, version=step)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from megatron_entcov.config import ModelConfig
from megatron_entcov.distributed.parallel import fail_together
from megatron_entcov.weights.shards import iter_hf_weights

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["WeightSync"]


class WeightSync:
    """Pushes the current policy weights to a rollout engine (collective over the model-parallel group)."""

    def __init__(self, chunks, model_cfg: ModelConfig, ps: "ParallelState", *, bucket_bytes: int):
        self.chunks, self.model_cfg, self.ps, self.bucket_bytes = chunks, model_cfg, ps, bucket_bytes

    def push(self, engine, version: int, *, prepare: Callable[[], None] | None = None) -> int:
        """Gather and send every weight; returns the bytes sent (0 on ranks without an engine).

        Collective over the world; only the generating rank (the one with ``engine``) receives the full
        tensors, the others send their shards. On the generating rank, ``prepare()`` runs first (e.g.
        colocated servers take back their weight memory). A failure there or in the engine raises on every
        rank, after the gather collectives have run to the end on all of them (parallel.fail_together), so no
        rank is left blocked."""
        sent = 0
        buckets = iter_hf_weights(self.chunks, self.model_cfg, self.ps, bucket_bytes=self.bucket_bytes,
                                  dst="generator")

        def counted():
            nonlocal sent
            for bucket in buckets:
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        with fail_together(f"weight sync to version {version}"):
            try:
                if engine is not None and not self.ps.is_generator:
                    raise ValueError(f"WeightSync.push: an engine was given on rank {self.ps.rank} (tp rank "
                                     f"{self.ps.tp_rank}, pp rank {self.ps.pp_rank}), which receives no weights; "
                                     "only the generating rank (ps.is_generator) holds one: pass None elsewhere")
                if engine is not None:
                    if prepare is not None:
                        prepare()
                    engine.update_weights(counted(), version)
                    if engine.weight_version != version:
                        raise RuntimeError(f"weight sync: engine reports version {engine.weight_version}, "
                                           f"expected {version}")
            finally:
                for _ in buckets:             # take part in (the rest of) the collectives
                    pass
        return sent
