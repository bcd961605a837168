"""One distribution, ``mmtrain``.

The top-level folders ``parallel/``, ``kernels/`` and ``recipes/`` install as ``mmtrain.parallel``,
``mmtrain.kernels`` and ``mmtrain.recipes`` (see docs in DESIGN: ``kernels`` is a PyPI name of its
own, so it must not be installed as a top-level package).
"""

from setuptools import setup

import os

ROOTS = {"mmtrain": "mmtrain", "mmtrain.parallel": "parallel", "mmtrain.kernels": "kernels",
         "mmtrain.recipes": "recipes"}


def _packages():
    """Every folder with an __init__.py below each root, named under its installed prefix."""
    found = {}
    for prefix, root in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, root)
                name = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
                found[name] = dirpath
    return found


PACKAGES = _packages()

setup(
    name="mmtrain",
    version="0.1.0",
    description="Distributed pretraining of MiniMax-01-style hybrid lightning/softmax MoE models",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"mmtrain.recipes": ["*.yaml", "*/*.yaml"]},
    include_package_data=True,
    # Ranges that the GPU machines (Python 3.12, torch 2.11, Triton 3.6) satisfy as well as CI's
    # pinned CPU install (torch 2.13.0). Never the PyPI package "apex" (an unrelated project).
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.5",
        "rich>=13",
        "safetensors>=0.4",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "triton>=3.2",
            "transformers>=4.57",
            "megatron-core>=0.13",
        ],
        "wandb": ["wandb>=0.19"],
        "fp8": ["transformer-engine>=2.0"],
    },
    entry_points={"console_scripts": ["mmtrain=mmtrain.cli:main"]},
)
