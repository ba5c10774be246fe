"""Tasks: prompt data, the tokenizer, and the verifiers that score responses.

- ``verifiers``: the registry (``register_verifier``, ``get_verifier``), :func:`score`, ``PureVerifier``.
- ``arithmetic``, ``countdown``, ``math``: the tasks' generators and verifiers; importing this package
  registers them.
- ``prompts``: prompt data sets (generated tasks, jsonl/parquet files) and the per-replica loader.
- ``tokenizer``: the tokenizer of a Hugging Face directory, or the built-in one of the generated tasks.
"""

from megatron_entcov.tasks import arithmetic, countdown, math  # noqa: F401  (each registers its verifier)
from megatron_entcov.tasks.verifiers import (
    PureVerifier,
    Status,
    Verifier,
    VerifyResult,
    close_verifiers,
    get_verifier,
    register_verifier,
    score,
    summarize,
    verifier_names,
)

__all__ = ["Status", "VerifyResult", "Verifier", "PureVerifier", "register_verifier", "verifier_names",
           "get_verifier", "close_verifiers", "summarize", "score"]
