"""Measure SGLang start-up, generation throughput and weight-sync speed per method on this machine (CPU).

Run: .venv/bin/python tests/sglang/bench_sglang.py [--hidden 512 --layers 8 --vocab 8192]
Prints one line per figure (the numbers in docs/sglang.md come from here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_entcov.config import ModelConfig, SGLangConfig  # noqa: E402
from megatron_entcov.rollout.sglang import SGLangEngine  # noqa: E402
from megatron_entcov.rollout.sglang.server import write_hf_model_dir  # noqa: E402
from megatron_entcov.rollout.types import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                      num_attention_heads=8, num_query_groups=2, vocab_size=args.vocab, max_position_embeddings=512,
                      add_qkv_bias=True, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_hf_model_dir(cfg, Path(tmp) / "m")
        from safetensors.torch import load_file

        sd = load_file(str(model_dir / "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        print(f"model: {sum(t.numel() for t in sd.values()) / 1e6:.1f}M params, {nbytes / 1e6:.0f} MB float32")
        limit = int(args.bucket_mb * 2**20)
        buckets, cur, size = [], [], 0
        for name, t in sd.items():
            if cur and size + t.numel() * 4 > limit:
                buckets.append(cur)
                cur, size = [], 0
            cur.append((name, t))
            size += t.numel() * 4
        buckets.append(cur)
        t0 = time.monotonic()
        eng = SGLangEngine(cfg, SGLangConfig(server_device="cpu", num_servers=1, sync_method="disk"),
                           model_dir=model_dir)
        print(f"start-up: {time.monotonic() - t0:.1f} s (server ready {eng.startup_s[0]:.1f} s)")
        try:
            prompts = [[2, 5 + i % 10, 14, 4 + (3 * i) % 10, 17] for i in range(args.prompts)]
            params = SamplingParams(max_new_tokens=args.new_tokens)
            eng.generate(prompts[:4], params)
            t0 = time.monotonic()
            out = eng.generate(prompts, params)
            dt = time.monotonic() - t0
            n = sum(s.num_response_tokens for s in out)
            print(f"generate: {len(out)} prompts x {args.new_tokens} tokens: {n / dt:.0f} tokens/s ({dt:.2f} s)")
            urls = [s.url for s in eng.servers]
            for method in ("disk", "distributed", "tensor"):
                other = eng if method == "disk" else SGLangEngine(
                    cfg, SGLangConfig(server_device="cpu", server_urls=urls, sync_method=method))
                for rep in range(2):
                    v = other.weight_version + 1
                    other.update_weights(iter(buckets), version=v)
                    s = other.last_sync
                    print(f"sync {method} #{rep + 1}: {s['bytes'] / 1e6:.0f} MB in {s['seconds']:.2f} s = "
                          f"{s['bytes_per_s'] / 1e6:.0f} MB/s ({len(buckets)} buckets of <= {args.bucket_mb:.0f} MB)")
                if other is not eng:
                    other.close()
                    eng._weight_version = v
        finally:
            eng.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
