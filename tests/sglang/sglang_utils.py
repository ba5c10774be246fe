"""Helpers shared by the SGLang tests (imported as `sglang_utils`: this directory is on sys.path)."""

from __future__ import annotations

from pathlib import Path

from megatron_entcov.config import SGLangConfig


def cpu_servers(**fields) -> SGLangConfig:
    """The engine's ``rollout.sglang`` section for CPU servers (its default device, 'auto', would launch on a
    GPU where there is one, with this venv's CPU-only SGLang)."""
    return SGLangConfig(server_device="cpu", **fields)


def load_state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def buckets(state_dict: dict, size: int = 3) -> list[list]:
    """The state dict as buckets of ``size`` tensors (what WeightSync hands an engine)."""
    items = sorted(state_dict.items())
    return [items[i:i + size] for i in range(0, len(items), size)]


class Router:
    """An ``sglang-router`` process in front of ``worker_urls`` (from the server venv, ``make sglang-env``), for
    as long as the ``with`` block runs; ``url`` once it lists a healthy worker."""

    def __init__(self, worker_urls: list[str], log_path: Path):
        self.worker_urls, self.log_path = list(worker_urls), Path(log_path)
        self.proc = None
        self.url = ""

    def __enter__(self) -> "Router":
        import subprocess

        from megatron_entcov.distributed.net import free_port
        from megatron_entcov.rollout.sglang.placement import router_workers
        from megatron_entcov.rollout.sglang.server import default_server_python

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [default_server_python(), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
             "--worker-urls", *self.worker_urls, "--policy", "round_robin"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        router_workers(self.url, timeout_s=120)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
