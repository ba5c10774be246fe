"""Weight sync gathers the full tensors to the generating rank only (weights/shards.py
``iter_hf_weights(dst="generator")``, used by weights/sync.py ``WeightSync.push``), at tp=2 x pp=2 on 4 gloo ranks.

Checked against independent references:
- values: the generating rank's tensors equal, bitwise and by name, the Hugging Face safetensors the model was
  loaded from (a tied and an untied model, float32; and the untied one with an interleaved pipeline), in the
  order of the every-rank gather (``dst="all"``);
- placement: the other three ranks yield nothing;
- bytes: the tensor bytes each rank receives, counted at the collectives it calls, equal the figures computed
  from the model's parameter shapes (Megatron's own ``tensor_model_parallel`` marks, not our name map), for the
  new and the old (every-rank) algorithm; object metadata is not counted here (bench/weight_sync_bytes.py
  reports it);
- ``WeightSync.push`` hands an engine on the generating rank exactly those tensors, and a failing engine
  raises on every rank without leaving one blocked (the next sync works).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

TP, PP = 2, 2
BUCKET_BYTES = 6_000
MODELS = {
    "untied": dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                   vocab_size=30, make_vocab_size_divisible_by=8, max_position_embeddings=64, add_qkv_bias=True,
                   tie_word_embeddings=False),
    "tied": dict(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=2,
                 vocab_size=21, make_vocab_size_divisible_by=4, max_position_embeddings=64, tie_word_embeddings=True),
}
TENSOR_CALLS = ("gather", "all_gather", "broadcast", "send", "recv")


def _count_tensor_bytes(counts: dict):
    """Wrap megatron_entcov.distributed.collectives' tensor calls (the ones shards.py makes) to add, per call, the bytes this
    rank receives into its buffers from other ranks (``recv``) and sends to them (``sent``)."""
    import torch.distributed as dist

    from megatron_entcov.distributed import collectives

    def nbytes(t):
        return t.numel() * t.element_size()

    def wrap(name, fn):
        def counted(*args, **kw):
            group = kw.get("group")
            n, me = dist.get_world_size(group), dist.get_rank()
            if name == "gather":
                t, out = args[0], args[1]
                if kw["dst"] == me:
                    counts["recv"] += (n - 1) * nbytes(t)
                else:
                    counts["sent"] += nbytes(t)
                assert (out is not None) == (kw["dst"] == me)
            elif name == "all_gather":
                counts["recv"] += (n - 1) * nbytes(args[1])
                counts["sent"] += (n - 1) * nbytes(args[1])
            elif name == "broadcast":
                if kw["src"] == me:
                    counts["sent"] += (n - 1) * nbytes(args[0])
                else:
                    counts["recv"] += nbytes(args[0])
            elif name == "send":
                counts["sent"] += nbytes(args[0])
            else:
                counts["recv"] += nbytes(args[0])
            return fn(*args, **kw)
        return counted

    originals = {name: getattr(collectives, name) for name in TENSOR_CALLS}
    for name, fn in originals.items():
        setattr(collectives, name, wrap(name, fn))
    return lambda: [setattr(collectives, name, fn) for name, fn in originals.items()]


def _run(chunks, model_cfg, ps, dst):
    """(yielded {name: tensor}, names in order, bucket (count, bytes) list, bytes received, bytes sent)."""
    from megatron_entcov.weights.shards import iter_hf_weights

    counts = {"recv": 0, "sent": 0}
    restore = _count_tensor_bytes(counts)
    try:
        got, order, sizes = {}, [], []
        for bucket in iter_hf_weights(chunks, model_cfg, ps, bucket_bytes=BUCKET_BYTES, dst=dst):
            sizes.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
            for name, t in bucket:
                got[name] = t.clone()
                order.append(name)
    finally:
        restore()
    return got, order, sizes, counts["recv"], counts["sent"]


class _Engine:
    """What WeightSync.push needs of an engine: update_weights(buckets, version) and weight_version."""

    def __init__(self, fail_after: int | None = None):
        self.weight_version, self.fail_after, self.tensors = 0, fail_after, {}

    def update_weights(self, buckets, version):
        for i, bucket in enumerate(buckets):
            if self.fail_after is not None and i == self.fail_after:
                raise OSError("the engine's servers went away")
            self.tensors.update((n, t.clone()) for n, t in bucket)
        self.weight_version = version


def _worker(rank, world_size, hf_dirs):
    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model, unwrap_model
    from megatron_entcov.weights.shards import load_hf_weights
    from megatron_entcov.weights.sync import WeightSync

    parallel = ParallelConfig(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    ps = init_parallel(parallel, seed=5)
    out = {"tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank, "is_generator": ps.is_generator}
    for key, spec in MODELS.items():
        model_cfg = ModelConfig(**spec)
        chunks = build_model(model_cfg, parallel, ps)
        load_hf_weights(chunks, model_cfg, hf_dirs[key], ps)
        res = out[key] = {}
        # What the expected bytes are computed from: this rank's parameters, with Megatron's own TP marks.
        res["params"] = [(name, p.numel() * p.element_size(), bool(getattr(p, "tensor_model_parallel", False)))
                         for c in chunks for name, p in unwrap_model(c).named_parameters()]
        for dst in ("generator", "all"):
            got, order, sizes, recv, sent = _run(chunks, model_cfg, ps, dst)
            res[dst] = {"names": order, "sizes": sizes, "recv": recv, "sent": sent,
                        # numpy: tensors would travel back through shared memory that dies with the worker
                        "tensors": {n: t.numpy().copy() for n, t in got.items()} if dst == "generator" else None}
        sync = WeightSync(chunks, model_cfg, ps, bucket_bytes=BUCKET_BYTES)
        engine = _Engine() if ps.is_generator else None
        res["push_bytes"] = sync.push(engine, version=3)
        res["pushed"] = {n: t.numpy().copy() for n, t in engine.tensors.items()} if engine else None
        try:
            sync.push(_Engine(fail_after=1) if ps.is_generator else None, version=4)
            res["failed"] = None
        except Exception as err:  # noqa: BLE001 - the test checks what every rank raised
            res["failed"] = f"{type(err).__name__}: {err}"
        engine = _Engine() if ps.is_generator else None
        res["push_after_failure"] = sync.push(engine, version=5)
        res["version_after_failure"] = engine.weight_version if engine else None
    # Interleaved pipeline (2 chunks per stage: a stage's layers are not contiguous), the untied model.
    parallel = ParallelConfig(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP,
                              virtual_pipeline_model_parallel_size=2)
    ps = init_parallel(parallel, seed=5)
    model_cfg = ModelConfig(**MODELS["untied"])
    chunks = build_model(model_cfg, parallel, ps)
    load_hf_weights(chunks, model_cfg, hf_dirs["untied"], ps)
    got, order, _, _, _ = _run(chunks, model_cfg, ps, "generator")
    out["vpp"] = {"names": order, "all_names": _run(chunks, model_cfg, ps, "all")[1],
                  "tensors": {n: t.numpy().copy() for n, t in got.items()}}
    return out


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    from safetensors.torch import load_file

    from megatron_entcov.config import ModelConfig
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    tmp = tmp_path_factory.mktemp("weight_sync_gather")
    hf_dirs, reference = {}, {}
    for key, spec in MODELS.items():
        model_cfg = ModelConfig(**spec)
        init = load_file(str(write_hf_model_dir(model_cfg, tmp / f"{key}_init", seed=1) / "model.safetensors"))
        g = torch.Generator().manual_seed(7)
        # Every tensor random (the HF init has ones in norms and zeros in biases, which would hide mix-ups).
        state = {n: torch.randn(t.shape, generator=g) for n, t in init.items()}
        hf_dirs[key] = str(write_hf_model_dir(model_cfg, tmp / key, state_dict=state, seed=1))
        reference[key] = load_file(f"{hf_dirs[key]}/model.safetensors")
    results = run_workers(_worker, TP * PP, args=(hf_dirs,), timeout=240)
    return reference, results


def _stage_bytes(results, key, stage, tied):
    """(sharded, replicated) bytes of one tp rank's parameters on ``stage`` that weight sync sends (the last
    stage's copy of a tied embedding is not sent)."""
    res = next(r for r in results if r["pp_rank"] == stage and r["tp_rank"] == 0)[key]
    params = [p for p in res["params"] if not (tied and p[0] == "output_layer.weight")]
    return sum(b for _, b, tp in params if tp), sum(b for _, b, tp in params if not tp)


@pytest.mark.parametrize("key", list(MODELS))
def test_only_the_generating_rank_receives_the_full_tensors(synced, key):
    reference, results = synced
    want = dict(reference[key])
    if MODELS[key]["tie_word_embeddings"]:
        want.pop("lm_head.weight", None)
    (gen,) = [r for r in results if r["is_generator"]]
    got = gen[key]["generator"]["tensors"]
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    different = [n for n in want if not (got[n].dtype == want[n].numpy().dtype
                                         and (got[n] == want[n].numpy()).all())]
    assert different == [], f"tensors differ from the Hugging Face files: {different}"
    # The same names in the same order as the every-rank gather (what weight sync sent before).
    assert gen[key]["generator"]["names"] == gen[key]["all"]["names"]
    for count, nbytes in gen[key]["generator"]["sizes"]:
        assert nbytes <= BUCKET_BYTES or count == 1, f"a bucket of {count} tensors has {nbytes} bytes"
    assert len(gen[key]["generator"]["sizes"]) > 2            # several buckets: the bound was exercised
    for rank, r in enumerate(results):
        if not r["is_generator"]:
            assert r[key]["generator"]["names"] == [], f"rank {rank} received full tensors"
            assert sorted(r[key]["all"]["names"]) == sorted(want), f"rank {rank}: 'all' misses tensors"


@pytest.mark.parametrize("key", list(MODELS))
def test_bytes_received_per_rank_match_the_shapes(synced, key):
    _, results = synced
    tied = MODELS[key]["tie_word_embeddings"]
    stages = [_stage_bytes(results, key, s, tied) for s in range(PP)]
    full = [TP * sharded + replicated for sharded, replicated in stages]      # a stage's tensors, gathered
    for rank, r in enumerate(results):
        s, t = r["pp_rank"], r["tp_rank"]
        own_shards = (TP - 1) * stages[s][0]
        old = own_shards + sum(full[o] for o in range(PP) if o != s)
        if r["is_generator"]:
            new = own_shards + sum(full[o] for o in range(1, PP))
        elif t == 0:
            new = own_shards                  # a later stage's tp rank 0 gathers its stage, sends it on
        else:
            new = 0
        assert r[key]["all"]["recv"] == old, f"rank {rank} (tp {t}, pp {s}): old algorithm"
        assert r[key]["generator"]["recv"] == new, f"rank {rank} (tp {t}, pp {s}): new algorithm"
        sent = stages[s][0] if t > 0 else (full[s] if s > 0 else 0)
        assert r[key]["generator"]["sent"] == sent, f"rank {rank} (tp {t}, pp {s}): bytes sent"
        if not r["is_generator"]:
            assert new < old, f"rank {rank}: received {new} bytes, {old} before"


@pytest.mark.parametrize("key", list(MODELS))
def test_weight_sync_push_hands_the_engine_every_tensor_and_fails_together(synced, key):
    _, results = synced
    (gen,) = [r for r in results if r["is_generator"]]
    pushed, want = gen[key]["pushed"], gen[key]["generator"]["tensors"]
    assert sorted(pushed) == sorted(want) and all((pushed[n] == want[n]).all() for n in want)
    assert gen[key]["push_bytes"] == sum(v.nbytes for v in want.values())
    for rank, r in enumerate(results):
        if not r["is_generator"]:
            assert r[key]["push_bytes"] == 0, rank
            assert r[key]["failed"].startswith("RuntimeError: weight sync to version 4 failed on another rank"), \
                (rank, r[key]["failed"])
        else:
            assert r[key]["failed"] == "OSError: the engine's servers went away", r[key]["failed"]
        # Nobody was left inside a collective: the next sync runs on every rank.
        assert r[key]["push_after_failure"] == gen[key]["push_bytes"] * r["is_generator"], rank
    assert gen[key]["version_after_failure"] == 5


def test_an_interleaved_pipeline_gathers_to_the_generating_rank_too(synced):
    reference, results = synced
    want = reference["untied"]
    for rank, r in enumerate(results):
        got = r["vpp"]["tensors"]
        if not r["is_generator"]:
            assert got == {} and r["vpp"]["names"] == [], f"rank {rank} received full tensors"
            continue
        assert sorted(got) == sorted(want)
        assert all((got[n] == want[n].numpy()).all() for n in want)
        assert r["vpp"]["names"] == r["vpp"]["all_names"]
