"""t5k: Korean T5-family language models (CT5, DialogCT5, HyperCLOVA-style) in JAX/Flax."""

from t5k import xla_cpu as _xla_cpu

_xla_cpu.set_default_flags()

__version__ = "0.1.0"
