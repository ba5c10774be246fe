"""Numerical ops on sharded tensors: vocab-parallel log-prob/entropy, global covariance statistics.

Each op takes its process group explicitly (`tp_group=`, `group=`); `None` means single process.
Design notes: docs/design/ops.md
"""
