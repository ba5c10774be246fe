"""Building the policy model with and without random initialisation (policy/model.py ``load_weights``), one
process on this machine's device. Prints the build times and their ratio: what a run that loads a checkpoint or
Hugging Face weights saves before its first step.

    .venv/bin/python bench/model_init.py [--layers 8 --hidden 1024 --vocab 32000 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    import torch

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.model import build_model

    heads = max(args.hidden // 64, 1)
    cfg = load_config(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             f"model.ffn_hidden_size={args.hidden * 4}", f"model.num_attention_heads={heads}",
                             f"model.num_query_groups={max(heads // 4, 1)}", f"model.vocab_size={args.vocab}",
                             "model.tie_word_embeddings=false"])
    ps = init_parallel(cfg.resolve(1).parallel, seed=0)
    times = {"random init": [], "load_weights (no init)": []}
    n_params = 0
    for _ in range(args.repeats):
        for label, load in (("random init", False), ("load_weights (no init)", True)):
            t0 = time.perf_counter()
            chunks = build_model(cfg.model, cfg.parallel, ps, load_weights=load)
            if ps.device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - t0)
            n_params = sum(p.numel() for c in chunks for p in c.parameters())
            del chunks
    destroy_parallel()
    best = {k: min(v) for k, v in times.items()}
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {n_params / 1e6:.1f}M params, "
          f"device {ps.device}, best of {args.repeats}")
    for label, t in best.items():
        print(f"  {label:24s} {t:7.2f} s")
    print(f"  ratio random / no init  {best['random init'] / best['load_weights (no init)']:7.1f}x")


if __name__ == "__main__":
    main()
