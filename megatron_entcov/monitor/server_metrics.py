"""Per-server rollout metrics from an engine's cumulative counters (``RolloutEngine.server_stats``).

Example:
    before = engine.server_stats()
    samples = engine.generate(...)
    stats = server_throughput(before, engine.server_stats(), seconds, dp_rank, dp_size)
"""

from __future__ import annotations

__all__ = ["server_throughput"]


def server_throughput(before: list[dict], after: list[dict], seconds: float, dp_rank: int,
                      dp_size: int) -> dict[str, float]:
    """Per-server generation throughput of one step's rollouts (tokens each server generated over the
    rollout wall time), live servers and restarts. Keys name the server by its slot (or 'router' for requests
    that went through an sglang-router), and by the replica when there are several:
    ``rollout/server1/tokens_per_s`` or ``rollout/dp0/server1/tokens_per_s``."""
    if not after:
        return {}
    prefix = f"rollout/dp{dp_rank}/" if dp_size > 1 else "rollout/"
    was = {b["name"]: b for b in before}
    out: dict[str, float] = {}
    for a in after:
        tokens = a["generated_tokens"] - was.get(a["name"], {}).get("generated_tokens", 0)
        out[f"{prefix}{a['name']}/tokens_per_s"] = tokens / max(seconds, 1e-9)
    # Sums over replicas (metrics are summed over ranks): servers live, restarts so far.
    out["rollout/live_servers"] = float(sum(a["state"] == "live" for a in after))
    out["rollout/server_restarts"] = float(sum(a["restarts"] for a in after))
    return out
