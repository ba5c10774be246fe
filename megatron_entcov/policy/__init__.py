"""The Megatron-Core policy: model construction, DDP + optimizer, batch packing, pipeline schedules, the
log-prob/entropy forward, and the Actor that owns forward and train step for RL and SFT.

- ``model``: GPTModel chunks from ModelConfig (the only place Megatron's TransformerConfig is built).
- ``optimizer``: Megatron DDP wrapping, optimizer and learning-rate schedule.
- ``batch``: samples -> padded rows (labels, loss mask, token keys); mini-/micro-batch splits.
- ``pipeline``: micro-batches through Megatron's forward-backward schedules.
- ``forward``: temperature and vocabulary padding applied once; log-probs and entropy per token.
- ``actor``: build, forward, one optimizer step (skipped when not finite); shared by trainer.py and sft.py.
"""
