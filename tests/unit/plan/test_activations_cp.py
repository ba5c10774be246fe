"""The activation plan under context parallelism: a rank holds 1/cp of each micro-batch's tokens. With Transformer
Engine's attention every term is the one of a micro-batch of n/cp tokens; the local spec's attention also keeps the
K and V it gathered (the full length) and scores its n/cp queries against the whole sample; the local spec's GPU
check divides its bound by cp."""

from __future__ import annotations

from megatron_entcov.config import load_config
from megatron_entcov.plan.activations import estimate_activations
from megatron_entcov.policy.model import local_attention_bytes

MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=8",
         "model.num_query_groups=2", "model.vocab_size=1000", "model.params_dtype=bfloat16"]


def _acts(cp: int, tokens: int, attention: str):
    cfg = load_config(None, MODEL + [f"parallel.context_parallel_size={cp}", "parallel.tensor_model_parallel_size=2",
                                     "parallel.sequence_parallel=true"])
    return estimate_activations(cfg.model, cfg.parallel, micro_batch_tokens=tokens, max_seq_len=4096, packed=True,
                                attention=attention, stage=0), cfg


def test_fused_attention_at_cp2_holds_what_half_the_tokens_hold():
    at_cp2, _ = _acts(2, 8192, "fused")
    half, _ = _acts(1, 4096, "fused")
    assert (at_cp2.layer_bytes, at_cp2.logits_bytes, at_cp2.train_bytes, at_cp2.forward_bytes) == \
        (half.layer_bytes, half.logits_bytes, half.train_bytes, half.forward_bytes)
    assert at_cp2.train_bytes < _acts(1, 8192, "fused")[0].train_bytes


def test_local_attention_at_cp2_adds_the_gathered_keys_and_values():
    at_cp2, cfg = _acts(2, 8192, "local")
    half, _ = _acts(1, 4096, "local")
    n, q_w, b = 4096, 8 // 2 * 32, 2          # this rank's tokens, heads/tp x head dim, bf16
    # cp 1 keeps q, k, v repeated to heads/tp width for its n tokens (GQA: v a copy); cp 2 keeps q for its n and
    # the gathered k and v for all 2n; scores (n x longest) and mask are the same.
    assert at_cp2.layer_bytes - half.layer_bytes == (n + 2 * n * 2) * q_w * b - n * 3 * q_w * b
    bound_cp2, product = local_attention_bytes(cfg.model, cfg.parallel, max_seq_len=4096, micro_batch_tokens=8192)
    cfg.parallel.context_parallel_size = 1
    bound_cp1, _ = local_attention_bytes(cfg.model, cfg.parallel, max_seq_len=4096, micro_batch_tokens=8192)
    assert bound_cp1 == 2 * bound_cp2 and "/ 2 context-parallel ranks" in product
