"""Every torch.distributed collective of the package goes through megatron_entcov/collectives.py, the one place
that knows which device a process group's tensors live on (NCCL: CUDA only). A direct call elsewhere is how a
host tensor reaches an NCCL group unchecked; this audit names each such call site."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_entcov"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv", "barrier",
               "all_to_all", "all_to_all_single", "broadcast_object_list", "all_gather_object", "gather_object",
               "scatter_object_list", "batch_isend_irecv", "monitored_barrier", "P2POp"}
OWNER = "collectives.py"


def direct_collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for each ``dist.X(...)`` / ``torch.distributed.X(...)`` collective, however it was imported."""
    tree = ast.parse(source)
    dist_names = {"torch.distributed"}
    bare = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    dist_names.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for a in node.names:
                if a.name in COLLECTIVES:
                    bare.add(a.asname or a.name)
            continue
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name == "distributed":
                    dist_names.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in dist_names:
            found.append((node.lineno, ast.unparse(f)))
        elif isinstance(f, ast.Name) and f.id in bare:
            found.append((node.lineno, f.id))
    return found


def test_no_collective_bypasses_the_device_aware_helper():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == OWNER and path.parent == PACKAGE:
            continue
        for line, call in direct_collective_calls(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {call}")
    assert not offenders, ("collectives outside megatron_entcov/collectives.py (use its functions; host metadata "
                           "through reduce_values):\n" + "\n".join(offenders))


@pytest.mark.parametrize("source, expected", [
    ("import torch.distributed as dist\ndist.all_reduce(x)\n", [(2, "dist.all_reduce")]),
    ("import torch\ntorch.distributed.broadcast(t, src=0)\n", [(2, "torch.distributed.broadcast")]),
    ("from torch import distributed as d\nd.barrier()\n", [(2, "d.barrier")]),
    ("from torch.distributed import all_gather_object as ago\nago(out, x)\n", [(2, "ago")]),
    ("import torch.distributed as dist\ndist.get_rank(); dist.is_initialized()\n", []),
    ("from megatron_entcov import collectives\ncollectives.all_reduce(x)\n", []),
])
def test_the_audit_finds_each_import_style(source, expected):
    assert direct_collective_calls(source) == expected
