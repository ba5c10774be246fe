"""Narrow compatibility fixes for running megatron-core where it does not expect to run.

- ``cpu``: megatron-core on a CPU-only torch with gloo (tests, the quickstart, CI).
- ``distrib_optimizer``: Megatron's distributed optimizer stepping with torch's own Adam (checkpoint resumes).
- ``device_audit``: a simulated accelerator on CPU that catches host/device placement errors in tests.

Design notes: docs/design/compat.md
"""
