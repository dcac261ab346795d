"""Packaging for fuser_moe.

Each top-level folder is one layer of the runtime and installs as a subpackage of ``fuser_moe``
(SPEC.md section 1): ``ir/`` becomes ``fuser_moe.ir`` and so on. Nothing installs as a top-level
``ir`` or ``backends`` module.
"""
from setuptools import setup

LAYERS = {
    "fuser_moe": "fuser_moe",
    "fuser_moe.ir": "ir",
    "fuser_moe.executors": "executors",
    "fuser_moe.backends": "backends",
    "fuser_moe.backends.transport": "backends/transport",
    "fuser_moe.python_frontend": "python_frontend",
}

setup(
    name="fuser_moe",
    version="0.1.0",
    description="Host-IR runtime for expert-parallel MoE dispatch and combine (NCCL and CUDA backends)",
    python_requires=">=3.10",
    packages=list(LAYERS),
    package_dir=LAYERS,
    package_data={"fuser_moe.backends": ["kernels/*.cu", "kernels/*.cuh"]},
    include_package_data=True,
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis"],
        "cuda": ["cuda-python>=12.4"],
    },
    entry_points={"console_scripts": ["fuser-moe=fuser_moe.cli:main"]},
)
