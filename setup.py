"""megatron-entcov: RL post-training of reasoning LLMs with entropy control, on Megatron-Core and SGLang."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-entcov",
    version="0.1.0",
    description="RLVR with Clip-Cov / KL-Cov entropy control on Megatron-Core, with SGLang rollouts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_entcov", "megatron_entcov.*"]),
    install_requires=[
        # Ranges here; exact CPU pins in requirements/cpu.txt. torch is installed first by the Makefile
        # so that pip never resolves it to a CUDA build on a CPU machine.
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.26,<2.5",
        "pyyaml>=6.0",
        "tensorboard>=2.16",
        "psutil>=5.9",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=4.51", "matplotlib>=3.8"],
        "hf": ["transformers>=4.51"],
        "plot": ["matplotlib>=3.8"],
        # GPU-only: never installed in the CPU environment (megatron-core prefers TE's fused ops, which
        # fail without a GPU). NVIDIA apex is not on PyPI (PyPI's `apex` is unrelated): used if importable.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["sglang==0.5.23"],
    },
    entry_points={"console_scripts": ["megatron-entcov=megatron_entcov.cli:main"]},
)
