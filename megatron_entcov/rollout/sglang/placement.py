"""Where a replica's SGLang servers are: its share of given URLs, a router's workers, the device and GPUs of
the servers it launches (the address they reach the trainer at: transports.choose_master_address).

Each data-parallel replica's generating rank runs its own engine; nothing here talks to another replica, so
the placement is a pure function of the config, the replica's rank and the node it runs on.

Example:
    urls = replica_server_urls(cfg.rollout.sglang.server_urls, dp_rank=1, dp_size=2)     # urls[1::2]
    gpus = colocated_gpu_ids(num_servers=4, server_args=[], local_rank=4, num_gpus=8)   # [4, 5, 6, 7]
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_entcov.config import server_tp
from megatron_entcov.config.checks import shorten
from megatron_entcov.rollout.sglang.http import (
    STARTUP_LIMIT,
    AttachError,
    BoundedWait,
    ServerError,
    Waiter,
    http_json,
)

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


def router_workers(router_url: str, timeout_s: float, *, waiter: Waiter | None = None) -> list[str]:
    """The worker URLs an ``sglang-router`` knows (``GET /workers``), waiting (``BoundedWait``: logged, through
    ``waiter``) until it has registered at least one healthy worker (it does so in the background after
    start-up). AttachError at once when the URL answers HTTP 4xx or a body that is not a JSON object (no
    router there), and after ``timeout_s``."""
    here = f"rollout.sglang.router_url={shorten(router_url)}"
    wait = BoundedWait(f"the sglang-router at {router_url} to list a healthy worker at /workers", timeout_s,
                       waiter=waiter)

    def not_a_router(answer: str) -> AttachError:
        return AttachError(f"{here} is not an sglang-router: GET /workers answered "
                           f"{shorten(' '.join(answer.split()), 160)}; give the URL of a running "
                           "`python -m sglang_router.launch_router`")

    while True:
        try:
            answer = http_json(router_url, "/workers", timeout=5)
        except ServerError as err:
            if not err.retryable:
                raise not_a_router(err.reason) from None
            last = err.reason
        else:
            if not isinstance(answer, dict) or set(answer) == {"text"}:
                raise not_a_router(str(answer.get("text", answer) if isinstance(answer, dict) else answer))
            try:
                workers = answer.get("workers", [])
                urls = [w["url"].rstrip("/") for w in workers if w.get("is_healthy", True)]
            except (KeyError, TypeError, AttributeError) as err:
                urls, last = [], f"{type(err).__name__}: {err}"
            else:
                last = f"{len(workers)} workers, none healthy"
            if urls:
                return urls
        if wait.expired():
            raise AttachError(f"{here}: no healthy worker listed at /workers within {wait.limit_text()}; last: "
                              f"{shorten(last, 160)}; check the router's --worker-urls, or raise {STARTUP_LIMIT} "
                              "if its workers are still loading")
        wait.pause(1.0, last)


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
