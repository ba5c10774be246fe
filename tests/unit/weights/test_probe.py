"""The post-sync probe's statistic and verdict (weights/probe.py), with a stand-in engine and trainer forward.

Before the fix the probe sampled its tokens at temperature 1 and failed on the largest single-token gap: bf16
rounding on one unlikely token could exceed weight_sync.verify_tol and stop the run at its first sync. Now the
tokens are greedy (at sampling temperature 1) and the check uses each server's median gap; the largest gap is
still reported (sync/probe_gap) and named in the error.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_entcov.rollout.types import Sample
from megatron_entcov.weights.probe import SyncVerificationError, gap_statistics, probe_prompt, verify_sync

TOKENS = 16
ROUNDING = np.full(TOKENS, 2e-3)
ONE_OUTLIER = ROUNDING.copy()
ONE_OUTLIER[5] = 0.5                         # one unlikely token, bf16 rounding on a large logit
SYSTEMATIC = 0.2 + 0.01 * np.arange(TOKENS) / TOKENS      # every token moved: wrong weights


def _lower_median(values: np.ndarray) -> float:
    return float(np.sort(values)[(len(values) - 1) // 2])


@pytest.mark.parametrize("gaps", [ROUNDING, ONE_OUTLIER, SYSTEMATIC, np.arange(1.0, 8.0)[::-1]])
def test_gap_statistics_are_the_median_and_max_over_the_masked_tokens(gaps):
    padded = torch.tensor(np.concatenate([gaps, [99.0, 99.0]]))[None].repeat(2, 1)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    mask[0, : len(gaps)] = True                               # row 1: an empty response
    stats = gap_statistics(padded, mask)
    assert stats.dtype == torch.float64 and stats.shape == (2, 2)
    assert stats[0].tolist() == pytest.approx([_lower_median(gaps), float(gaps.max())], rel=1e-12)
    assert stats[1].tolist() == [0.0, 0.0]


class _Engine:
    """Answers the probe with fixed server log-probs; records the sampling parameters it was asked for."""

    def __init__(self, n_tokens: int, version: int = 3):
        self.params, self.version, self.n = None, version, n_tokens
        self.server_lp = -np.linspace(0.1, 2.0, n_tokens)

    def probe(self, prompt, params):
        self.params = params
        sample = Sample(prompt_ids=list(prompt), response_ids=list(range(7, 7 + self.n)),
                        rollout_logprobs=self.server_lp.tolist(), finish_reason="length",
                        weight_version=self.version, index=0)
        return [("http://server-a", sample)]


class _Policy:
    """The trainer's forward: the server's log-probs moved by ``gaps`` on the response tokens."""

    def __init__(self, gaps: np.ndarray):
        self.gaps = torch.tensor(gaps, dtype=torch.float32)

    def forward(self, batch, micro_batch_size):
        lp = batch.rollout_logprobs.clone()
        positions = batch.loss_mask[0].nonzero().flatten()
        assert len(positions) == len(self.gaps)
        lp[0, positions] -= self.gaps
        return lp, None


PS = SimpleNamespace(mp_group=None, pp_size=1, tp_size=1, device="cpu", is_last_stage=True, is_generator=True)


def _cfg(temperature: float = 1.0, tol: float = 0.1):
    return SimpleNamespace(seed=0, sampling=SimpleNamespace(temperature=temperature),
                           weight_sync=SimpleNamespace(verify_tol=tol, probe_tokens=TOKENS))


def test_rounding_on_one_token_passes_and_is_still_reported_as_the_largest_gap():
    engine = _Engine(TOKENS)
    out = verify_sync(engine, _Policy(ONE_OUTLIER), PS, _cfg(), version=3, vocab_limit=50)
    assert out["sync/probe_gap"] == pytest.approx(0.5, rel=1e-5)
    assert out["sync/probe_tokens"] == TOKENS
    # Greedy probe tokens at sampling temperature 1, from the fixed probe prompt.
    p = engine.params
    assert (p.top_k, p.temperature, p.top_p, p.max_new_tokens, p.seed) == (1, 1.0, 1.0, TOKENS, 3)


def test_a_systematic_gap_fails_naming_the_server_its_median_and_largest_gap():
    with pytest.raises(SyncVerificationError) as err:
        verify_sync(_Engine(TOKENS), _Policy(SYSTEMATIC), PS, _cfg(), version=3, vocab_limit=50)
    message = str(err.value)
    median, largest = _lower_median(SYSTEMATIC), float(SYSTEMATIC.max())
    assert f"median |server - trainer| log-prob gap {median:.3g}" in message
    assert "weight_sync.verify_tol=0.1" in message and f"largest single-token gap {largest:.3g}" in message
    assert f"http://server-a: gap {median:.3g} (median; largest {largest:.3g}) over {TOKENS} tokens" in message
    assert "\n" not in message


def test_a_wrong_version_still_fails_with_no_gap():
    with pytest.raises(SyncVerificationError, match="a server reports another version"):
        verify_sync(_Engine(TOKENS, version=2), _Policy(ROUNDING), PS, _cfg(), version=3, vocab_limit=50)


def test_at_another_sampling_temperature_the_probe_samples_at_it():
    engine = _Engine(TOKENS)
    verify_sync(engine, _Policy(ROUNDING), PS, _cfg(temperature=0.7), version=3, vocab_limit=50)
    assert (engine.params.top_k, engine.params.temperature) == (-1, 0.7)
    assert probe_prompt(50) == probe_prompt(50) and max(probe_prompt(50)) < 50
