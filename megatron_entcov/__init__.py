"""megatron-entcov: RL post-training of reasoning LLMs with entropy control (Clip-Cov, KL-Cov) on Megatron-Core."""

__version__ = "0.1.0"
