"""Trainer tokens/s with packed sequences under a token budget against padded rows, on one batch of long-tailed
response lengths, measured in one run (the two paths alternate, so machine load affects both alike).

The batch: ``--samples`` samples of a ``--prompt``-token prompt and a response whose length is lognormal with
median max/16 (sigma 1), 2% of them exactly at the maximum (``--max-len`` tokens in all), as in reasoning RL
where a few responses hit max_new_tokens. One "step" is what the trainer does per rollout batch: the old
log-probs (forward only) and one optimizer step (forward + backward, Clip-Cov loss) over the same batch.

* padded: micro-batches of ``--micro-batch-size`` rows padded to the batch's longest sample (the row path);
* packed: ``optim.max_tokens_per_micro_batch`` = micro-batch-size x longest sample, the same number of token
  slots per micro-batch, so a micro-batch's activations are no larger than a padded one's.

Cost model (what the figures scale with). Per layer, a micro-batch costs c_lin * tokens + c_att * sum(len^2):
padded rows pay for N * T_max slots and N * T_max^2 attention; packed rows for sum(l_i) tokens and sum(l_i^2)
(attention stays inside each sample). The speed-up is therefore about T_max / mean(l) where the linear layers
dominate (short rows, wide models), and grows towards T_max^2 / mean(l^2) where attention does (long rows); it
does not depend on the batch size N beyond the packing's last, partly filled micro-batch. ``--grid`` measures
that: T_max in {256, 512, 1024} at N=64, and N in {32, 128} at T_max=512.

Peak memory: the peak bytes autograd holds for backward at once in a training step (saved-tensor hooks; each
storage counted once), i.e. the activation memory of the largest micro-batch, since CPU tensors have no
allocator statistics. The token budget is set so that it is no higher than the padded path's.

    .venv/bin/python bench/packing_throughput.py [--max-len 512 --samples 64 --repeats 3] [--grid]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

MODEL = {"num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 256}
"""The quickstart model's proportions (ffn = 2 x hidden, 4 heads, 2 query groups), scaled to 4 layers, 256 wide."""


def lengths(num_samples: int, max_len: int, prompt: int, seed: int = 0) -> list[int]:
    """Response lengths: lognormal with median (max_len - prompt) / 16, 2% exactly at the maximum."""
    import random

    rnd = random.Random(seed)
    top = max_len - prompt
    out = [max(1, min(top, round(rnd.lognormvariate(0.0, 1.0) * top / 16))) for _ in range(num_samples)]
    for i in range(max(1, round(0.02 * num_samples))):
        out[(i * 50 + 7) % num_samples] = top
    return out


def _setup(max_len: int, num_samples: int, prompt: int, micro_batch_size: int):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.losses.policy import compute_token_selection, policy_loss
    from megatron_entcov.policy.actor import Actor
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    budget = micro_batch_size * max_len
    cfg = load_config(None, [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.max_position_embeddings={max_len}", "model.make_vocab_size_divisible_by=8",
        f"rollout.max_prompt_len={prompt}", f"sampling.max_new_tokens={max_len - prompt}",
        f"rollout.prompts_per_step={num_samples}", "rollout.n_samples_per_prompt=1",
        f"optim.micro_batch_size={micro_batch_size}", "optim.lr=1e-5", "loss.name=clip_cov",
        "loss.clip_cov_ratio=0.01"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=0)
    actor = Actor(cfg, ps, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(0, 256, (prompt,), generator=g).tolist(),
                      response_ids=torch.randint(0, 256, (r,), generator=g).tolist(),
                      rollout_logprobs=(-torch.rand(r, generator=g)).tolist(), finish_reason="stop",
                      weight_version=0, index=i)
               for i, r in enumerate(lengths(num_samples, max_len, prompt))]
    batch = rows_from_samples(samples, torch.randn(num_samples, generator=g), pad_id=0,
                              sample_ids=list(range(num_samples)), key_stride=max_len, device=ps.device)

    def step(max_tokens: int, saved: SavedActivations | None = None) -> float:
        import contextlib

        actor.max_tokens = max_tokens
        t0 = time.perf_counter()
        batch.old_logprobs, batch.old_entropy = actor.logprobs(batch)
        sel = compute_token_selection(cfg.loss, batch.old_logprobs, batch.old_logprobs, batch.advantages,
                                      batch.loss_mask, token_keys=batch.token_keys, group=ps.dp_group, step=0,
                                      seed=0)

        def loss_fn(mb, logprobs, entropy):
            return policy_loss(cfg.loss, logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask, entropy=entropy,
                               step=0, selection=sel.view(mb.view), rollout_logprobs=mb.rollout_logprobs,
                               segment_ids=mb.segment_ids)

        with saved.hooks() if saved is not None else contextlib.nullcontext():
            actor.train_step(batch, loss_fn)
        if ps.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return batch, step, budget


def measure_packing(max_len: int = 512, num_samples: int = 64, *, prompt: int = 32, micro_batch_size: int = 4,
                    repeats: int = 3) -> dict:
    """Padded vs packed step time over one batch, alternating, in this process (initialises torch.distributed
    with one rank). Returns the tokens, the best step time of each path, tokens/s and their ratio."""
    batch, step, budget = _setup(max_len, num_samples, prompt, micro_batch_size)
    from megatron_entcov.distributed.parallel import destroy_parallel
    from megatron_entcov.policy.packing import plan_bins

    try:
        saved = {"padded": SavedActivations(), "packed": SavedActivations()}
        step(0, saved["padded"]), step(budget, saved["packed"])    # warm-up, and the activation memory
        times: dict[str, list[float]] = {"padded": [], "packed": []}
        for _ in range(repeats):
            times["padded"].append(step(0))
            times["packed"].append(step(budget))
    finally:
        destroy_parallel()
    tokens = int(batch.seq_lengths.sum())
    best = {k: min(v) for k, v in times.items()}
    return {"max_len": max_len, "samples": num_samples, "tokens": tokens,
            "padded_slots": batch.num_rows * batch.input_ids.shape[1],
            "micro_batches": {"padded": num_samples // micro_batch_size,
                              "packed": len(plan_bins(batch.seq_lengths.tolist(), budget))},
            "time_s": best, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "tokens_per_s": {k: tokens / v for k, v in best.items()},
            "speedup": best["padded"] / best["packed"],
            "activation_peak_mib": {k: v.peak / 2**20 for k, v in saved.items()}}


class SavedActivations:
    """Peak bytes of tensors autograd keeps for backward at once (the activation memory a micro-batch needs; CPU
    tensors have no allocator statistics). Each storage counts once while anything saved still holds it."""

    def __init__(self):
        self.live: dict[int, list] = {}
        self.bytes = 0
        self.peak = 0

    def _pack(self, t):
        import torch

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        return _Held(t, key, self) if isinstance(t, torch.Tensor) else t

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.bytes -= entry[0]
                del self.live[key]

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)


class _Held:
    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner._release(self.key)


def format_packing(r: dict) -> str:
    return (f"T_max {r['max_len']:5d}  N {r['samples']:4d}  tokens {r['tokens']:6d} of {r['padded_slots']:6d} slots  "
            f"micro-batches {r['micro_batches']['padded']:3d} -> {r['micro_batches']['packed']:3d}  "
            f"padded {r['tokens_per_s']['padded']:8.0f} tok/s  packed {r['tokens_per_s']['packed']:8.0f} tok/s  "
            f"speed-up {r['speedup']:5.2f}x  activation peak {r['activation_peak_mib']['padded']:.0f} -> "
            f"{r['activation_peak_mib']['packed']:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid", action="store_true", help="also T_max 256/1024 at N=64 and N 32/128 at T_max 512")
    args = ap.parse_args()
    configs = [(args.max_len, args.samples)]
    if args.grid:
        configs += [(256, 64), (1024, 64), (512, 32), (512, 128)]
    for max_len, samples in configs:
        print(format_packing(measure_packing(max_len, samples, prompt=args.prompt,
                                             micro_batch_size=args.micro_batch_size, repeats=args.repeats)),
              flush=True)


if __name__ == "__main__":
    main()
