"""The Megatron-Core policy: model construction, DDP + optimizer, training rows and micro-batches, pipeline
schedules, the log-prob/entropy forward, and the Actor that owns forward and train step for RL and SFT.

- ``model``: GPTModel chunks from ModelConfig (the only place Megatron's TransformerConfig is built).
- ``optimizer``: Megatron DDP wrapping, optimizer and learning-rate schedule.
- ``batch``: samples -> one right-padded row per sample (labels, loss mask, token keys); mini-batch splits.
- ``packing``: the typed micro-batches of a batch (row slices, or samples packed into one row), and back.
- ``pipeline``: micro-batches through Megatron's forward-backward schedules.
- ``forward``: temperature and vocabulary padding applied once; log-probs and entropy per token.
- ``actor``: build, forward, one optimizer step (skipped when not finite); shared by trainer.py and sft.py.
- ``offload``, ``colocation``: the trainer's GPU memory while colocated rollout servers hold it.

Design notes: docs/design/policy.md
"""
