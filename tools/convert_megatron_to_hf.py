"""Convert a Megatron dist checkpoint (saved at any tp/pp/ep: experts are stored by global index, so no --ep is
needed) into a Hugging Face safetensors directory.

Run:
    python tools/convert_megatron_to_hf.py --ckpt /ckpts/qwen7b --out /models/qwen7b-rl [--dtype bfloat16]
(same as `megatron-entcov convert megatron-to-hf ...`; see docs/conversion.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_entcov.weights.to_hf import main_megatron_to_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_megatron_to_hf())
