"""Narrow compatibility fixes for running megatron-core where it does not expect to run.

- ``cpu``: megatron-core on a CPU-only torch with gloo (tests, the quickstart, CI).
- ``distrib_optimizer``: Megatron's distributed optimizer stepping with torch's own Adam (checkpoint resumes).
- ``device_audit``: a simulated accelerator on CPU that catches host/device placement errors in tests.
- ``toolchain``: what the node can run (Transformer Engine, Megatron's torch.compile'd jit_fuser), probed once.
  Importing this package hides an installed Transformer Engine whose ``transformer_engine.pytorch`` does not
  import, before any Megatron import of the command (Megatron-Core would fail at its own import).

Design notes: docs/design/compat.md
"""

from megatron_entcov.compat import toolchain

toolchain.guard_transformer_engine()
