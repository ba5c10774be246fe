"""Hugging Face <-> Megatron weights: the name/layout map, checkpoint files, gathering full tensors, syncing them
to a rollout engine and checking the sync, and the two converters (ModelConfig <-> transformers config is
config/hf.py).

- ``hf_map``: declarative rules between Megatron parameter names/layouts and Hugging Face ones.
- ``hf_checkpoint``: reading Hugging Face safetensors directories.
- ``shards``: this rank's Megatron shards <-> full HF-named tensors (load into a model; gather out in buckets).
- ``sync``: WeightSync, the gathered weights into the rollout engine (collective).
- ``probe``: the post-sync check (servers' log-probs equal the trainer's).
- ``to_megatron`` / ``to_hf``: the converters (``megatron-entcov convert``, ``tools/``).
- ``convert_output``: the converters' output directories (written atomically, never over an input).

Design notes: docs/design/weights.md
"""
