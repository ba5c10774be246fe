"""Convert a Hugging Face Qwen2/Qwen2.5, Qwen3, Qwen3-MoE or Llama checkpoint into a Megatron dist checkpoint root.

Run:
    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen2.5-7B --out /ckpts/qwen7b --tp 4 --pp 1
    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-30B-A3B --out /ckpts/q30b --tp 2 --ep 4
(same as `megatron-entcov convert hf-to-megatron ...`; see docs/conversion.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_entcov.weights.to_megatron import main_hf_to_megatron  # noqa: E402

# The guard matters: dist_checkpointing starts a spawn-context Manager, which re-imports __main__.
if __name__ == "__main__":
    sys.exit(main_hf_to_megatron())
