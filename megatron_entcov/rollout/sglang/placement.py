"""Where a replica's SGLang servers are: its share of given URLs, a router's workers, the device and GPUs of
the servers it launches (the address they reach the trainer at: transports.choose_master_address).

Each data-parallel replica's generating rank runs its own engine; nothing here talks to another replica, so
the placement is a pure function of the config, the replica's rank and the node it runs on.

Example:
    urls = replica_server_urls(cfg.rollout.sglang.server_urls, dp_rank=1, dp_size=2)     # urls[1::2]
    gpus = colocated_gpu_ids(num_servers=4, server_args=[], local_rank=4, num_gpus=8)   # [4, 5, 6, 7]
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from megatron_entcov.config import server_tp
from megatron_entcov.rollout.sglang.http import ServerError, http_json

__all__ = ["replica_server_urls", "router_workers", "resolve_device", "colocated_gpu_ids"]


def replica_server_urls(urls: Sequence[str], dp_rank: int, dp_size: int) -> list[str]:
    """Data-parallel replica ``dp_rank``'s share of ``rollout.sglang.server_urls``: every dp_size-th URL from its
    rank (each replica syncs and generates on its own servers only). ValueError when there are fewer than
    dp_size."""
    urls = list(urls)
    if urls and len(urls) < dp_size:
        raise ValueError(f"rollout.sglang.server_urls has {len(urls)} servers for {dp_size} data-parallel replicas; "
                         f"each replica needs its own: give at least {dp_size} (or leave server_urls empty to launch "
                         "rollout.sglang.num_servers per replica)")
    return urls[dp_rank::dp_size]


def router_workers(router_url: str, timeout_s: float) -> list[str]:
    """The worker URLs an ``sglang-router`` knows (``GET /workers``), waiting until it has registered at least
    one healthy worker (it does so in the background after start-up)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            workers = http_json(router_url, "/workers", timeout=10).get("workers", [])
            urls = [w["url"].rstrip("/") for w in workers if w.get("is_healthy", True)]
            if urls:
                return urls
            last = f"{len(workers)} workers, none healthy"
        except (ServerError, KeyError, TypeError, AttributeError) as err:
            last = err
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout.sglang.router_url={router_url!r}: no healthy worker listed at /workers within "
                               f"{timeout_s:.0f} s ({last}); check the router's --worker-urls") from None
        time.sleep(1.0)


def resolve_device(server_device: str) -> str:
    """``rollout.sglang.server_device`` made concrete: 'auto' = 'cuda' when this process sees a GPU, else 'cpu'."""
    if server_device != "auto":
        return server_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def colocated_gpu_ids(num_servers: int, server_args: Sequence[str], *, local_rank: int | None = None,
                      num_gpus: int | None = None) -> list[int]:
    """First GPU of each of a replica's launched servers: the replica's generating rank is the first of its
    model-parallel group, whose ranks hold consecutive GPUs of the node (torchrun's LOCAL_RANK order, tensor
    parallel fastest), so its servers go on GPUs LOCAL_RANK, LOCAL_RANK + tp_server, ... ValueError when they do
    not fit on the node."""
    import os

    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    tp = server_tp(server_args)
    ids = [local_rank + i * tp for i in range(num_servers)]
    if ids and ids[-1] + tp > num_gpus:
        raise ValueError(f"rollout.sglang.num_servers={num_servers} servers of {tp} GPUs each (rollout.sglang."
                         f"server_args --tp-size) from GPU {local_rank} need GPUs up to {ids[-1] + tp - 1}, but this "
                         f"node has {num_gpus}: launch fewer servers per replica, or start them elsewhere "
                         "(rollout.sglang.server_urls)")
    return ids
