"""Rollouts: data types, the engine protocol, and the engines.

- ``types``: :class:`SamplingParams`, :class:`Sample` (and the definition of rollout log-probs).
- ``engine``: the :class:`RolloutEngine` protocol every engine implements; ``iter_named_tensors``.
- ``local``: :class:`LocalEngine`, a Hugging Face copy of the policy in the trainer process (default, CPU).
- ``sglang``: the SGLang server engine (production).

``LocalEngine`` is imported lazily so that importing the types does not import transformers.
"""

from megatron_entcov.rollout.engine import NamedTensors, RolloutEngine, iter_named_tensors
from megatron_entcov.rollout.types import FINISH_REASONS, Sample, SamplingParams

__all__ = ["FINISH_REASONS", "LocalEngine", "NamedTensors", "RolloutEngine", "Sample", "SamplingParams",
           "iter_named_tensors"]


def __getattr__(name):
    if name == "LocalEngine":
        from megatron_entcov.rollout.local import LocalEngine

        return LocalEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
