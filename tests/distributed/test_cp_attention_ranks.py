"""The local context-parallel attention (policy/cp_attention.py) equals full causal attention, forward and
gradients, on 2 and 4 gloo ranks; with a group of one rank it is PackedDotProductAttention bit for bit.

One spawn of 4 ranks serves every case: Megatron's context-parallel group spans all 4 (cp4), two groups of 2 are
made beside it (cp2: both are checked) and one group per rank (cp1). Each rank gets its tokens of random global
q, k, v (cp_shard_index's layout), runs the module, back-propagates a random upstream gradient of its outputs and
returns its outputs and the gradients of its local q, k, v (K and V's gradients reduce-scattered back from every
rank that used them). The test puts them back in global order and compares them with an independent float64
reference written here (softmax(q k^T * scale + causal mask) v per sequence, GQA by head groups; no Megatron).
Layouts: padded rows (SBHD, one sequence per row) and packed rows (THD, several sequences of different lengths,
global cu_seqlens; from seq_lengths, from cu_seqlens_q, and from cu_seqlens_q_padded beside shorter real
lengths), with and without GQA and with an explicit softmax scale. fp32 kernels against the float64 reference:
atol 2e-6 on outputs and 1e-5 on gradients (values of order 1).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

WORLD = 4
DIM = 8
OUT_ATOL, GRAD_ATOL = 2e-6, 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cp: int
    heads: int
    groups: int
    lengths: tuple[int, ...]          # packed: the global sequence lengths; rows: (s,) of every row
    batch: int = 0                    # rows (SBHD); 0: one packed row (THD)
    scale: float | None = None        # softmax_scale (None: 1/sqrt(DIM))
    params: str = "host"              # THD: "host" (seq_lengths), "cu" (cu_seqlens_q), "padded" (+ _padded)
    seed: int = 0


CASES = [
    Case("rows_cp2", cp=2, heads=4, groups=4, lengths=(16,), batch=2, seed=1),
    Case("rows_cp2_gqa_scale", cp=2, heads=4, groups=2, lengths=(12,), batch=3, scale=0.3, seed=2),
    Case("rows_cp4_gqa", cp=4, heads=4, groups=1, lengths=(16,), batch=2, seed=3),
    Case("packed_cp2_gqa", cp=2, heads=4, groups=2, lengths=(8, 4, 12, 4), seed=4),
    Case("packed_cp2_cu_padded", cp=2, heads=4, groups=1, lengths=(8, 12), params="padded", seed=5),
    Case("packed_cp4", cp=4, heads=4, groups=4, lengths=(16, 8, 24), params="cu", seed=6),
    Case("packed_cp4_gqa_scale", cp=4, heads=4, groups=2, lengths=(8, 32), scale=0.25, seed=7),
    Case("rows_cp1", cp=1, heads=4, groups=2, lengths=(10,), batch=2, seed=8),
    Case("packed_cp1", cp=1, heads=4, groups=2, lengths=(6, 3, 9), seed=9),
]


def _inputs(case: Case):
    """Global q, k, v and the upstream gradient of the output, float32. Rows: [s, b, n, d]; packed: [t, n, d]."""
    g = torch.Generator().manual_seed(case.seed)
    lead = (case.lengths[0], case.batch) if case.batch else (sum(case.lengths),)
    q = torch.randn(*lead, case.heads, DIM, generator=g)
    k = torch.randn(*lead, case.groups, DIM, generator=g)
    v = torch.randn(*lead, case.groups, DIM, generator=g)
    out_lead = lead if case.batch else (lead[0], 1)
    grad = torch.randn(*out_lead, case.heads * DIM, generator=g)
    return q, k, v, grad


def _packed_params(case: Case):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_entcov.policy.packing import HostPackedSeqParams

    cu = torch.tensor([0, *np.cumsum(case.lengths)], dtype=torch.int32)
    if case.params == "host":
        return HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                   max_seqlen_q=max(case.lengths), max_seqlen_kv=max(case.lengths),
                                   seq_lengths=case.lengths)
    if case.params == "cu":
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    real = torch.tensor([0, *np.cumsum([n - 1 - i for i, n in enumerate(case.lengths)])], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu)


def _config(case: Case):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=case.heads * DIM, num_attention_heads=case.heads,
                             num_query_groups=case.groups, kv_channels=DIM, context_parallel_size=case.cp,
                             attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False,
                             apply_rope_fusion=False, gradient_accumulation_fusion=False)


def _build(cls, case: Case, cp_group):
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    pgs = ProcessGroupCollection()
    pgs.tp = mpu.get_tensor_model_parallel_group()
    if cp_group is not None:
        pgs.cp = cp_group
    return cls(_config(case), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
               softmax_scale=case.scale, pg_collection=pgs)


def _run(module, case: Case, index: torch.Tensor) -> dict:
    """Forward and backward of ``module`` on the tokens ``index`` of the case's inputs; numpy out and grads."""
    q, k, v, grad = (t.index_select(0, index) for t in _inputs(case))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    params = None if case.batch else _packed_params(case)
    out = module(q, k, v, None, packed_seq_params=params)
    (out * grad).sum().backward()
    return {"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy()}


def _run_case(case: Case, cp_group) -> dict:
    from megatron_entcov.policy.cp_attention import ContextParallelDotProductAttention
    from megatron_entcov.policy.cp_layout import cp_shard_index
    from megatron_entcov.policy.packing import PackedDotProductAttention

    total = case.lengths[0] if case.batch else sum(case.lengths)
    index = cp_shard_index(case.lengths, case.cp, cp_group.rank()) if case.cp > 1 else torch.arange(total)
    result = {"index": index.numpy(), "cp": _run(_build(ContextParallelDotProductAttention, case, cp_group),
                                                 case, index)}
    if case.cp == 1:
        module = _build(ContextParallelDotProductAttention, case, cp_group)
        result["cp_size"] = module.cp_size
        result["parent"] = _run(_build(PackedDotProductAttention, case, None), case, index)
    return result


def _worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_entcov.compat import cpu as cpu_compat

    cpu_compat.apply()
    mpu.initialize_model_parallel(context_parallel_size=world_size)
    cpu_compat.model_parallel_manual_seed(0, tp_rank=0)
    groups = {world_size: mpu.get_context_parallel_group()}
    for size in (1, 2):                              # every rank creates every group, in the same order
        for first in range(0, world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                groups[size] = group
    return {case.name: _run_case(case, groups[case.cp]) for case in CASES}


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, WORLD, timeout=180)


def _attend64(q, k, v, scale):
    """Float64 causal attention of one sequence: q [s, n, d], k and v [s, g, d] -> [s, n * d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("snd,tnd->nst", q, k) * scale
    s = q.shape[0]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("nst,tnd->snd", scores.softmax(-1), v).reshape(s, -1)


def _reference(case: Case) -> dict:
    """Float64 outputs and gradients of the whole case, in global order (independent of Megatron)."""
    q, k, v, grad = (t.double() for t in _inputs(case))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    scale = case.scale if case.scale is not None else 1 / math.sqrt(DIM)
    if case.batch:
        out = torch.stack([_attend64(q[:, b], k[:, b], v[:, b], scale) for b in range(case.batch)], dim=1)
    else:
        parts = zip(q.split(case.lengths), k.split(case.lengths), v.split(case.lengths))
        out = torch.cat([_attend64(*p, scale) for p in parts])[:, None]
    (out * grad).sum().backward()
    return {"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy()}


def _assemble(results: list, ranks: range, case: Case) -> dict:
    """The group's per-rank tensors put back in global order."""
    ref = _reference(case)
    full = {key: np.zeros_like(value, dtype=np.float32) for key, value in ref.items()}
    seen = np.zeros(ref["out"].shape[0], dtype=int)
    for r in ranks:
        res = results[r][case.name]
        for key in full:
            full[key][res["index"]] = res["cp"][key]
        seen[res["index"]] += 1
    assert (seen == 1).all(), seen
    return full


@pytest.mark.parametrize("case", [c for c in CASES if c.cp > 1], ids=lambda c: c.name)
def test_context_parallel_attention_equals_float64_full_attention(results, case):
    ref = _reference(case)
    for first in range(0, WORLD, case.cp):                   # every context-parallel group of this size
        got = _assemble(results, range(first, first + case.cp), case)
        np.testing.assert_allclose(got["out"], ref["out"], atol=OUT_ATOL, rtol=0, err_msg=f"{case.name} out")
        for key in ("dq", "dk", "dv"):
            np.testing.assert_allclose(got[key], ref[key], atol=GRAD_ATOL, rtol=0, err_msg=f"{case.name} {key}")


@pytest.mark.parametrize("case", [c for c in CASES if c.cp == 1], ids=lambda c: c.name)
def test_a_group_of_one_rank_is_the_parent_bit_for_bit_and_full_attention(results, case):
    ref = _reference(case)
    for rank in range(WORLD):
        res = results[rank][case.name]
        assert res["cp_size"] == 1
        for key in ("out", "dq", "dk", "dv"):
            np.testing.assert_array_equal(res["cp"][key], res["parent"][key], err_msg=f"{case.name} {key}")
            atol = OUT_ATOL if key == "out" else GRAD_ATOL
            np.testing.assert_allclose(res["cp"][key], ref[key], atol=atol, rtol=0, err_msg=f"{case.name} {key}")
