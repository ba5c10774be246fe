"""A real SGLang CPU server serves a tiny random Qwen3 (dense) model and takes the trainer's weight sync; the
post-sync probe (weights/probe.py) passes after a right sync and fails after a deliberately wrong weight.

The trainer (one process) loads Hugging Face weights 'a' (model.hf_dir); the server starts from other weights 'b',
both directories written by the project's own ``write_hf_model_dir``. The trainer's initial sync (the default
'disk' method, as the engine tests' servers use) must make the server compute with 'a': the probe passes, and the
server's probe log-probs equal a float64 transformers forward of the trainer's own weights (gathered under their
Hugging Face names) to 1e-4, the tolerance of the other SGLang tests. Then one tensor (a Qwen3 q-norm, which
Qwen2 has not) is pushed negated: the server's log-probs now equal transformers' with that tensor negated, and
the probe raises SyncVerificationError; pushing it back makes the probe pass again.

Run: make test-sglang   (or: .venv/bin/python -m pytest -m sglang tests/sglang/test_sglang_qwen3.py -s)
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.sglang

# head_dim 16 with hidden 32 and 4 heads: the explicit head_dim (not hidden / heads) must reach the server too.
QWEN3 = tiny_model(qk_layernorm=True, kv_channels=16)
STEP = ["rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "steps=1"]
LOGPROB_TOL = 1e-4      # float32 server vs float64 transformers forward (as in test_sglang_engine.py)


def _config(model: list[str], extra: list[str] = ()):
    from megatron_entcov.config import load_config

    return load_config(None, model + STEP + list(extra)).resolve(1)


def _peaky_dir(model_cfg, out_dir, seed: int):
    """A model directory (write_hf_model_dir) with large random weights: peaked next-token distributions, so a
    wrong tensor moves the probe's log-probs far above rounding (HF's 0.02 init leaves them near uniform)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(to_hf_config(model_cfg)).named_parameters()}
    state = {n: (1.0 + 0.1 * torch.randn(s, generator=gen)) if n.endswith("norm.weight")
             else 0.3 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    return write_hf_model_dir(model_cfg, out_dir, state_dict=state)


def _sync_and_probe_worker(rank, world_size, run_dir, model, bad_name):
    """The trainer syncs 'a' to a server started from 'b' (its probe runs in Trainer()); then ``bad_name`` is pushed
    negated and back. Returns the trainer's HF weights, the probe samples and verdicts."""
    from sglang_utils import buckets, cpu_servers

    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.sglang import SGLangEngine
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.probe import SyncVerificationError, probe_params, probe_prompt, verify_sync
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = _config(model, [f"model.hf_dir={run_dir}/a", f"output_dir={run_dir}/out", "name=qwen3"])
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    engine = SGLangEngine(cfg.model, cpu_servers(num_servers=1, max_inflight=32, request_timeout_s=120),
                          model_dir=f"{run_dir}/b", seed=cfg.seed, log_dir=f"{run_dir}/sglang_logs")
    trainer = None
    try:
        trainer = Trainer(cfg, ps, engine=engine)       # the initial sync (version 0) and its probe
        v = trainer.weight_version
        vocab_limit = min(len(trainer.tokenizer), cfg.model.vocab_size)
        prompt, params = probe_prompt(vocab_limit, seed=cfg.seed), probe_params(cfg, v)
        weights = {n: t.detach().clone() for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps)
                   for n, t in bucket}

        def probe(version):
            (_, sample), = engine.probe(prompt, params)
            try:
                verdict = verify_sync(engine, trainer.actor.policy, ps, cfg, version=version, vocab_limit=vocab_limit)
            except SyncVerificationError as e:
                verdict = str(e)
            return sample.to_dict(), verdict

        out = {"weights": weights, "right": probe(v)}
        bad = dict(weights, **{bad_name: -weights[bad_name]})
        engine.update_weights(buckets(bad), version=v + 1)
        out["wrong"] = probe(v + 1)
        engine.update_weights(buckets(weights), version=v + 2)
        out["restored"] = probe(v + 2)
        out["verify_tol"] = cfg.weight_sync.verify_tol
        return out
    finally:
        if trainer is not None:
            trainer.close()                             # closes the engine too
        else:
            engine.close()


def _hf_logprobs(model_cfg, weights: dict, sample: dict, tmp_dir) -> torch.Tensor:
    """Log-probs of the sample's response tokens under a float64 transformers forward of ``weights`` (HF names,
    written by write_hf_model_dir and loaded by transformers' own loader)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    model_dir = write_hf_model_dir(model_cfg, tmp_dir, state_dict=weights)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    prompt, response = sample["prompt_ids"], sample["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _check_sync_and_probe(tmp_path, model, bad_name):
    from sglang_utils import load_state_dict

    cfg = _config(model)
    a, b = _peaky_dir(cfg.model, tmp_path / "a", seed=0), _peaky_dir(cfg.model, tmp_path / "b", seed=1)
    (res,) = run_workers(_sync_and_probe_worker, 1, args=(str(tmp_path), model, bad_name), timeout=600)
    weights, tol = res["weights"], res["verify_tol"]
    # The trainer's weights are 'a' bit for bit (under the checkpoint names the files carry), and not 'b'.
    on_disk = load_state_dict(a)
    assert set(on_disk) <= set(weights) and all(torch.equal(weights[n], t) for n, t in on_disk.items())
    assert not torch.equal(weights[bad_name], load_state_dict(b)[bad_name])

    gaps = {}
    for case, expected in (("right", weights), ("wrong", dict(weights, **{bad_name: -weights[bad_name]})),
                           ("restored", weights)):
        sample, verdict = res[case]
        assert len(sample["response_ids"]) > 0, case
        ref = _hf_logprobs(cfg.model, expected, sample, tmp_path / f"hf_{case}")
        gaps[case] = float((torch.tensor(sample["rollout_logprobs"], dtype=torch.float64) - ref).abs().max())
        print(f"\n[sglang] {case}: max |server - transformers| {gaps[case]:.2e} over {len(ref)} probe tokens; "
              f"probe: {verdict}")
        assert gaps[case] < LOGPROB_TOL, (case, gaps[case])
        if case == "wrong":
            # The server computes with the negated tensor, far from the trainer's weights: the probe refuses.
            assert isinstance(verdict, str) and "failed its probe" in verdict, verdict
            right = _hf_logprobs(cfg.model, weights, sample, tmp_path / "hf_wrong_vs_right")
            lp = torch.tensor(sample["rollout_logprobs"], dtype=torch.float64)
            assert float((lp - right).abs().median()) > tol
        else:
            assert isinstance(verdict, dict), verdict
            assert verdict["sync/probe_gap"] < LOGPROB_TOL and verdict["sync/probe_tokens"] == len(ref), verdict


def test_qwen3_sync_and_probe_on_a_real_server(tmp_path):
    _check_sync_and_probe(tmp_path, QWEN3, "model.layers.0.self_attn.q_norm.weight")
