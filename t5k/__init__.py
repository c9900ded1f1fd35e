"""t5k: Korean T5-family language models (CT5, DialogCT5, HyperCLOVA-style) in JAX/Flax."""

__version__ = "0.1.0"
