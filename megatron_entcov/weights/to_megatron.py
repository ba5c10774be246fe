"""Offline tool Hugging Face safetensors -> Megatron dist checkpoint root.

:func:`convert_hf_to_megatron` writes a checkpoint root (``latest``,
``step_000000/{model/, model_config.yaml, hf/, trainer_state.json, COMPLETE}``) that
:class:`~megatron_entcov.run.checkpoint.Checkpointer` accepts: the model is built at tp=1, pp=1 on the ``meta``
device, filled tensor by tensor from the safetensors files and saved as a layout-free dist checkpoint that loads
at any tp/pp (``--tp`` only fixes the vocabulary padding). Output-directory rules:
:mod:`megatron_entcov.weights.convert_output`; the other direction: :mod:`megatron_entcov.weights.to_hf`.

Example (``tools/convert_hf_to_megatron.py`` and ``megatron-entcov convert hf-to-megatron`` call
:func:`main_hf_to_megatron`):
    convert_hf_to_megatron("/models/Qwen2.5-7B", "/ckpts/qwen7b", tp=4, pp=1)
    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen2.5-7B --out /ckpts/qwen7b --tp 4 --pp 1

Design notes (memory, layout): docs/design/weights.md
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
import yaml

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.config.dtypes import torch_dtype
from megatron_entcov.distributed import collectives
from megatron_entcov.weights.convert_output import (
    MODEL_CONFIG_FILE,
    STEP_DIR,
    check_free_space,
    check_output,
    converter_parser,
    copy_hf_side_files,
    run_converter,
    writing_output,
)
from megatron_entcov.weights.hf_checkpoint import HFCheckpoint, check_hf_checkpoint, load_hf_model_config
from megatron_entcov.weights.hf_map import expected_hf_shapes
from megatron_entcov.weights.shards import load_hf_weights

logger = logging.getLogger(__name__)

__all__ = ["convert_hf_to_megatron", "main_hf_to_megatron"]

# --------------------------------------------------------------------------------------------------
# HF -> Megatron
# --------------------------------------------------------------------------------------------------


def _check_layout(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"--tp={tp} must divide {field}={getattr(cfg, field)}")
    if cfg.num_layers % pp:
        raise ValueError(f"--pp={pp} must divide num_layers={cfg.num_layers}")
    if ep > 1 and cfg.num_experts is None:
        raise ValueError(f"--ep={ep} needs a mixture-of-experts model (num_experts); this one is dense: use --ep 1")
    if cfg.num_experts is not None:
        if cfg.num_experts % ep:
            raise ValueError(f"--ep={ep} must divide num_experts={cfg.num_experts}")


def _checkpoint_bytes(cfg: ModelConfig) -> int:
    """The tensor bytes the dist checkpoint holds, without the vocabulary padding (a lower bound)."""
    itemsize = torch_dtype(cfg.params_dtype).itemsize
    return sum(math.prod(shape) for shape in expected_hf_shapes(cfg).values()) * itemsize


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                           dtype: str | None = None, make_vocab_size_divisible_by: int = 128,
                           force: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face directory into a Megatron checkpoint root at ``out``; returns ``out``.

    The dist checkpoint is written at tp=1, pp=1, ep=1 and loads at any layout (experts are keyed by their global
    index, so the checkpoint for ep=1 and ep=2 is the same; ``ep`` is only checked) whose padded vocabulary equals
    ``ModelConfig.padded_vocab_size(tp)`` (always the case for tp' dividing ``tp`` when the vocabulary is
    already a multiple of ``make_vocab_size_divisible_by * tp``; Megatron loads vocabulary tensors with
    ``allow_shape_mismatch``, so other paddings load too). Runs in one process; when torch.distributed is
    already initialised it is collective: every rank builds the whole model, the write is shared, and
    Megatron's parallel state is left at tp=1, pp=1 (call ``init_parallel`` again afterwards).
    Raises ValueError for an unsupported architecture, a missing tensor, a shape mismatch, a bad layout, an
    ``out`` that is, contains or lies inside ``hf_dir`` (even with ``force``) or an output directory that
    already holds a checkpoint (unless ``force``); NoSpaceLeft (an OSError, errno ENOSPC) when the filesystem
    of ``out`` is too small, up front or during the write. A failed write leaves ``out`` as it was.
    """
    import torch.distributed as dist

    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.model import build_model
    from megatron_entcov.run.checkpoint import save_model

    hf_dir, out = Path(hf_dir), Path(out)
    check_output(out, force, inputs=[("--hf-dir", hf_dir)])
    cfg = load_hf_model_config(hf_dir, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _check_layout(cfg, tp, pp, ep)
    hf = HFCheckpoint(hf_dir)
    check_hf_checkpoint(hf, cfg)
    needed = _checkpoint_bytes(cfg)
    check_free_space(out, needed)

    own_group = not dist.is_initialized()
    parallel = ParallelConfig(backend="gloo")
    ps = init_parallel(parallel, seed=0)
    try:
        padded = cfg.padded_vocab_size(tp)
        # The local spec (checkpoint keys are the same for both specs); padding fixed for the target tp.
        build_cfg = dataclasses.replace(cfg, transformer_impl="local",
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by * tp)
        # Built on the meta device, then allocated without initialisation: no random init of a 32B model,
        # and at most one copy of it in memory.
        with torch.device("meta"):
            chunks = build_model(build_cfg, parallel, dataclasses.replace(ps, device=torch.device("meta")),
                                 load_weights=True)
        chunks = [c.to_empty(device="cpu") for c in chunks]
        load_hf_weights(chunks, build_cfg, hf, ps, progress=progress and ps.is_rank0)
        # Rank 0 prepares .NAME.tmp, renames it to out once complete, and removes it on any failure.
        with writing_output(out, owner=ps.is_rank0, needed=needed) as tmp:
            step = tmp / STEP_DIR
            if ps.is_rank0:
                (step / "model").mkdir(parents=True)
            collectives.barrier()
            save_model(chunks, step / "model")
            del chunks
            if ps.is_rank0:
                info = {"source": str(hf_dir), "tp": tp, "pp": pp, "ep": ep, "padded_vocab_size": padded}
                (step / MODEL_CONFIG_FILE).write_text(
                    "# ModelConfig of this checkpoint (written by megatron_entcov.weights.to_megatron)\n"
                    + yaml.safe_dump({"model": dataclasses.asdict(cfg), "conversion": info}, sort_keys=False))
                copy_hf_side_files(hf_dir, step / "hf", config=True)
                (step / "trainer_state.json").write_text(
                    json.dumps({"step": 0, "converted_from": str(hf_dir)}, indent=1))
                (step / "COMPLETE").write_text("")
                (tmp / "latest").write_text(STEP_DIR)
        if ps.is_rank0:
            logger.info("convert: wrote %s (%d layers, vocab %d padded to %d for tp=%d, %s)", out, cfg.num_layers,
                        cfg.vocab_size, padded, tp, cfg.params_dtype)
        collectives.barrier()
    finally:
        if own_group:
            destroy_parallel()
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main_hf_to_megatron(argv: list[str] | None = None) -> int:
    """``megatron-entcov convert hf-to-megatron``: returns the exit code (2 on a bad input)."""
    parser = converter_parser("hf-to-megatron", "Hugging Face (Qwen2/Qwen2.5, Qwen3, Qwen3-MoE, Llama) -> Megatron "
                              "dist checkpoint",
                              out_help="output checkpoint root (latest, step_000000/model/ ...)")
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train at (vocab padding)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train at (checked only)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size to train at (checked only: experts "
                        "are stored by global index, the same checkpoint for every ep)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args(argv)
    return run_converter(lambda: convert_hf_to_megatron(
        args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, force=args.force))
