"""Narrow compatibility fixes for running megatron-core where it does not expect to run."""
