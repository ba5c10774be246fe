"""What megatron-core (0.16.x) needs to run on a CPU-only torch with gloo: tests, the quickstart, CI.

Each fix touches only the named megatron module, is applied only when ``torch.cuda.is_available()`` is False
(``apply()`` refuses otherwise) and is covered by ``tests/distributed/test_megatron_cpu.py`` /
``tests/unit/compat/test_compat_cpu.py``. The main tool is a per-module ``torch`` stand-in (:class:`_CpuTorch`)
forwarding everything to torch except the CUDA spellings; functions are patched only where a module-level name
cannot reach the call. Fixes:
 1. tensor_parallel.random: the CUDA RNG tracker -> :class:`CpuRNGStatesTracker`.
 2./3./5./8. ``torch.cuda.current_device()``, ``torch.cuda.synchronize()`` and ``device="cuda"`` in Megatron's
    buffers, p2p communication, pipeline schedules and dist_checkpointing -> the stand-in (cpu; a no-op sync).
 4. language_module: the tied embedding's ``weight.data.cuda()`` when pp > 1 -> ``Tensor.cuda`` returns the
    tensor itself while ``setup_embeddings_and_output_layer`` runs.
 6. optimizers (the distributed one included): ``device='cuda'`` scalars -> cpu; while their type checks run,
    CPU float tensors report their CUDA type names.
 7. WrappedTorchNorm under sequence parallelism: built with SP off, then its params marked SP.
 9. tensor_parallel.random: activation recomputation (``model.recompute``) saves and restores "the CUDA RNG
    state" around each recomputed block -> the host generator's state.
 10. transformer.moe: the all-to-all token dispatcher creates ``torch.cuda.Stream()`` at construction ->
    the stand-in in the MoE modules (token_dispatcher, moe_utils, router, moe_layer, experts).
 11. transformer.moe.moe_utils: ``te_general_gemm`` is undefined without Transformer Engine (the router's
    forward names it) -> defined as None there, which is what the router tests for.
 12. transformer.moe.token_dispatcher: the all-to-all split sizes become host numpy arrays only when they were on
    a GPU (``maybe_move_tensor_to_cpu``); on the host they stay tensors, which ``all_to_all_single`` refuses ->
    host tensors asked for ``as_numpy`` are converted too.
 13. models.common.embeddings (rope_utils, rotary_pos_embedding, yarn): under context parallelism RoPE keeps this
    rank's chunks of the positions with a pinned index moved by ``.cuda()`` (``get_pos_emb_on_this_cp_rank``) ->
    the same selection with an index on the embedding's device.

Design notes (each fix: the module and the error it prevents): docs/design/compat.md
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

from megatron_entcov.compat import device_audit

logger = logging.getLogger(__name__)

__all__ = ["apply", "is_applied", "allocations_on", "model_parallel_manual_seed", "CpuRNGStatesTracker"]

_APPLIED = False

# Modules reached through their module-global ``torch`` name (fixes 2, 3, 5, 6, 8). Missing ones (other
# megatron-core versions) are skipped with a debug log: the tests catch any that matter.
_TORCH_STANDIN_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.transformer.transformer_block",
    "megatron.core.models.gpt.gpt_model",
    # Fix 10: the MoE layer (the dispatcher's torch.cuda.Stream(), device="cuda" buffers).
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts",
)


_ALLOCATE_ON: torch.device | None = None
"""Set by :func:`allocations_on`: where the patched modules' "current CUDA device" is, instead of the host."""


@contextlib.contextmanager
def allocations_on(device: torch.device):
    """While the block runs, what the patched Megatron modules allocate on "the current CUDA device" (gradient
    buffers, the distributed optimizer's parameter buffers, scalars) goes to ``device``: ``torch.device("meta")``
    lets the planner (megatron_entcov/plan/) build a whole rank's training state, buffers included, with no
    memory. Only after :func:`apply`."""
    global _ALLOCATE_ON
    if not _APPLIED:
        raise RuntimeError("compat.cpu.allocations_on() needs compat.cpu.apply() first (a CPU-only torch)")
    before, _ALLOCATE_ON = _ALLOCATE_ON, torch.device(device)
    try:
        yield
    finally:
        _ALLOCATE_ON = before


def _current_device():
    # The CPU, the simulated accelerator when the device audit is armed, or allocations_on's device.
    return _ALLOCATE_ON if _ALLOCATE_ON is not None else device_audit.current_device()


def _map_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _current_device()
    if isinstance(device, str) and device.startswith("cuda"):
        return _current_device()
    if isinstance(device, torch.device) and device.type == "cuda":
        return _current_device()
    return device


class _CpuCuda:
    """``torch.cuda`` as seen by a patched module: queries answer for the CPU, sync calls are no-ops."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def current_device():
        return _current_device()

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def default_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def Stream(*args, **kwargs):  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NullStream()

    @staticmethod
    def Event(*args, **kwargs):  # noqa: N802
        return _NullEvent()

    @staticmethod
    def nvtx_range_push(*args, **kwargs):
        return None


class _NullStream:
    def wait_stream(self, other):
        return None

    def synchronize(self):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "zeros_like",
              "empty_like", "ones_like", "full_like", "as_tensor")


class _CpuTorch(types.ModuleType):
    """``torch`` for one megatron module: forwards everything, maps device='cuda' to CPU in factories."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda(torch.cuda)

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            return _with_cpu_device(attr)
        return attr


def _with_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


# Fix 1: the RNG tracker on CPU generator states.
class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker API (add/fork/get_states/set_states/reset) on the CPU generator.

    fork(name) swaps the CPU generator to the named stream and back, which is what dropout inside
    tensor-parallel regions needs on CPU (the CUDA tracker swaps the CUDA generator).
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Fix 9: the recompute checkpoint's RNG snapshot (CheckpointFunction, _fork_rng) -> the host generator.
    mrandom._get_cuda_rng_state = _host_rng_state
    mrandom._set_cuda_rng_state = _set_host_rng_state


def _host_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_host_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def model_parallel_manual_seed(seed: int, *, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of megatron's ``model_parallel_cuda_manual_seed``: the same stream names and seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    _install_rng_tracker()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# Fixes 4 and 6: Tensor methods that no module-level name reaches (`weight.data.cuda()`,
# `param.grad.type() == 'torch.cuda.FloatTensor'`). They are replaced only while the named megatron
# function runs, so nothing outside that call sees the change.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _cpu_tensor_type(orig):
    def tensor_type(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if args or kwargs:  # a conversion, not a query: leave it alone
            return result
        return _CUDA_TYPE_NAMES.get(result, result)

    return tensor_type


def _cpu_tensor_cuda(orig):
    def tensor_cuda(self, *args, **kwargs):
        return self

    return tensor_cuda


def _scoped_tensor_methods(fn, replacements):
    """Wrap `fn` so that, while it runs, Tensor.<name> is replacements[name](original)."""
    if getattr(fn, "_entcov_cpu_wrapped", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = {name: getattr(torch.Tensor, name) for name in replacements}
        for name, make in replacements.items():
            setattr(torch.Tensor, name, make(saved[name]))
        try:
            return fn(*args, **kwargs)
        finally:
            for name, orig in saved.items():
                setattr(torch.Tensor, name, orig)

    wrapper._entcov_cpu_wrapped = True
    return wrapper


def _patch_tensor_method_scopes() -> None:
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    lm = language_module.LanguageModule
    lm.setup_embeddings_and_output_layer = _scoped_tensor_methods(
        lm.setup_embeddings_and_output_layer, {"cuda": _cpu_tensor_cuda})
    wrapped = _scoped_tensor_methods(clip_grads.clip_grad_by_total_norm_fp32, {"type": _cpu_tensor_type})
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    if getattr(optimizer, "clip_grad_by_total_norm_fp32", None) is not None:
        optimizer.clip_grad_by_total_norm_fp32 = wrapped  # imported by name there
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _scoped_tensor_methods(f16.__init__, {"type": _cpu_tensor_type})
    dist_opt = distrib_optimizer.DistributedOptimizer
    dist_opt.__init__ = _scoped_tensor_methods(dist_opt.__init__, {"type": _cpu_tensor_type})


# Fix 7: WrappedTorchNorm under sequence parallelism.
def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "_entcov_cpu_patched", False):
        return
    orig_new = cls.__new__

    def __new__(klass, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        sp = config.sequence_parallel
        if sp:
            config.sequence_parallel = False
        try:
            norm = orig_new(klass, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                            normalization)
        finally:
            config.sequence_parallel = sp
        if sp:
            # Each TP rank sees a different sequence shard; Megatron all-reduces the grads of params
            # flagged sequence_parallel over the TP group (finalize_model_grads).
            for p in norm.parameters():
                setattr(p, "sequence_parallel", True)
        return norm

    cls.__new__ = staticmethod(__new__)
    cls._entcov_cpu_patched = True


# Fix 11: moe_utils without Transformer Engine.
def _define_te_general_gemm() -> None:
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError as exc:
        logger.debug("compat.cpu: skip moe_utils (%s)", exc)
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        # The router's gating linear tests `te_general_gemm is not None` and runs torch's matmul otherwise.
        moe_utils.te_general_gemm = None


# Fix 12: the dispatcher's split sizes as numpy on the host too.
def _host_splits(orig):
    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._entcov_cpu_wrapped = True
    return maybe_move_tensor_to_cpu


def _patch_token_dispatcher() -> None:
    try:
        from megatron.core.transformer.moe import token_dispatcher
    except ImportError as exc:
        logger.debug("compat.cpu: skip token_dispatcher (%s)", exc)
        return
    if not getattr(token_dispatcher.maybe_move_tensor_to_cpu, "_entcov_cpu_wrapped", False):
        token_dispatcher.maybe_move_tensor_to_cpu = _host_splits(token_dispatcher.maybe_move_tensor_to_cpu)


# Fix 13: RoPE's context-parallel slice without CUDA.
def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """megatron's get_pos_emb_on_this_cp_rank with the index on ``pos_emb``'s device (no pinned memory, no .cuda())."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def _patch_cp_rope() -> None:
    for name in ("rope_utils", "rotary_pos_embedding", "yarn_rotary_pos_embedding"):
        try:
            mod = importlib.import_module(f"megatron.core.models.common.embeddings.{name}")
        except ImportError as exc:
            logger.debug("compat.cpu: skip %s (%s)", name, exc)
            continue
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank


def is_applied() -> bool:
    return _APPLIED


def apply() -> None:
    """Apply every fix (idempotent). Refuses when CUDA is available: the fixes are for CPU-only torch."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_entcov.compat.cpu.apply() is for CPU-only runs; CUDA is available")
    standin = _CpuTorch()
    for name in _TORCH_STANDIN_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            logger.debug("compat.cpu: skip %s (%s)", name, exc)
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = standin
    _install_rng_tracker()
    _define_te_general_gemm()
    _patch_token_dispatcher()
    _patch_cp_rope()
    _patch_torch_norm()
    _patch_tensor_method_scopes()
    _APPLIED = True
    logger.info("compat.cpu: applied megatron-core CPU fixes to %d modules", len(_TORCH_STANDIN_MODULES))
