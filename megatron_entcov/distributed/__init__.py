"""Process groups and every collective: the parallel layout, the collective helpers, sockets.

- ``parallel``: ParallelState, torch.distributed and Megatron's model-parallel groups (the only importer of
  ``megatron.core.parallel_state``), the rendezvous store.
- ``collectives``: every collective the package issues, with each tensor on the device its backend needs.
- ``net``: local network helpers (``free_port``) for the launcher, the rendezvous and the SGLang servers.

Design notes: docs/design/distributed.md
"""
