"""Rollouts: data types, the engine protocol, the engines, and the factory that picks one.

- ``types``: :class:`SamplingParams`, :class:`Sample` (and the definition of rollout log-probs).
- ``engine``: the :class:`RolloutEngine` protocol every engine implements; ``iter_named_tensors``.
- ``local``: :class:`LocalEngine`, a Hugging Face copy of the policy in the trainer process (default, CPU).
- ``sglang``: the SGLang server engine (production).
- ``prefetch``: the next step's rollouts generated in the background (``rollout.overlap``).

:func:`build_engine` lives here, not in the protocol module: a protocol never imports its implementations.
The engines are imported lazily so that importing the types does not import transformers.
"""

from megatron_entcov.rollout.engine import NamedTensors, RolloutEngine, iter_named_tensors
from megatron_entcov.rollout.types import FINISH_REASONS, Sample, SamplingParams

__all__ = ["FINISH_REASONS", "LocalEngine", "NamedTensors", "RolloutEngine", "Sample", "SamplingParams",
           "build_engine", "iter_named_tensors"]


def build_engine(cfg, *, dp_rank: int = 0, dp_size: int = 1, device="cpu", waiter=None) -> RolloutEngine:
    """The engine ``cfg.rollout.engine`` names, for data-parallel replica ``dp_rank`` (call it on the replica's
    generating rank only: it may launch servers). The embedded engine generates on ``device`` (the trainer's:
    ``ps.device``); the SGLang engine's waits for its servers sleep through ``waiter`` (sglang.http.Waiter)."""
    if cfg.rollout.engine == "local":
        from megatron_entcov.rollout.local import LocalEngine

        return LocalEngine(cfg.model, seed=cfg.seed, device=device)
    from megatron_entcov.rollout.sglang import SGLangEngine

    return SGLangEngine.from_config(cfg, dp_rank=dp_rank, dp_size=dp_size, waiter=waiter)


def __getattr__(name):
    if name == "LocalEngine":
        from megatron_entcov.rollout.local import LocalEngine

        return LocalEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
