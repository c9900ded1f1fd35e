"""t5k: Korean T5-family language models in JAX/Flax (CT5, DialogCT5, HyperCLOVA-style)."""

import setuptools

# Tested ranges: the upper bounds are the next minor release, since jax/flax/seqio break APIs across minors.
INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "seqio>=0.0.20,<0.0.21",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "gin-config>=0.5,<0.6",
    "numpy>=2.0,<3",
    "tokenizers>=0.23,<0.24",
    "kiwipiepy>=0.24,<0.25",
    "sacrebleu>=2.6,<2.7",
    "tensorboard>=2.21,<2.22",
    "tqdm>=4.66,<5",
]

HF_REQUIRES = [
    "torch==2.13.0",
    "transformers>=5.23,<6",
]

TEST_REQUIRES = HF_REQUIRES + [
    "pytest>=9.0,<10",
    "pytest-xdist>=3.8,<4",
    "hypothesis>=6.150,<7",
    "nbclient>=0.11,<0.12",
    "nbformat>=5.11,<6",
    "ipykernel>=7.4,<8",
]

# Data folders (the shipped vocabulary, the embedded corpora) are listed as namespace packages so that their files
# ship as package data; setuptools warns about importable folders missing from `packages`.
_NOT_CACHES = ["*__pycache__*"]
DATA_PACKAGES = setuptools.find_namespace_packages(include=["t5k.data", "t5k.data.*"], exclude=_NOT_CACHES) + [
    f"t5k_tasks.{pkg}" for pkg in setuptools.find_namespace_packages(where="tasks", include=["data", "data.*"], exclude=_NOT_CACHES)
]
PACKAGES = setuptools.find_packages(include=["t5k", "t5k.*"]) + ["t5k_tasks"] + DATA_PACKAGES


setuptools.setup(
    name="t5k",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.14",
    packages=PACKAGES,
    # The `tasks/` folder is importable as `t5k_tasks`: a top-level `tasks` package would collide.
    package_dir={"t5k_tasks": "tasks"},
    package_data={**{pkg: ["*"] for pkg in DATA_PACKAGES}, "t5k_tasks": ["NOTICE*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"hf": HF_REQUIRES, "test": TEST_REQUIRES},
    entry_points={"console_scripts": ["t5k=t5k.cli:main"]},
)
