"""t5k models: the config, the encoder-decoder (CT5) and the decoder-only (HyperCLOVA-style) networks."""

import gin
import jax
import jax.numpy as jnp

from t5k.models.config import TransformerConfig
from t5k.models.decoder_only import DecoderOnly
from t5k.models.encoder_decoder import EncoderDecoder

ARCHITECTURES = {"encoder_decoder": EncoderDecoder, "decoder_only": DecoderOnly}


@gin.configurable
def build_model(architecture: str = gin.REQUIRED, config: TransformerConfig = gin.REQUIRED):
    """The network named by `architecture` ('encoder_decoder' | 'decoder_only') with `config`."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"build_model.architecture = {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](config)


def dummy_inputs(model, batch_size: int = 1, length: int = 8):
    """Token arrays that `model.init` accepts (parameter shapes do not depend on them)."""
    tokens = jnp.ones((batch_size, length), jnp.int32)
    return (tokens, tokens) if isinstance(model, EncoderDecoder) else (tokens,)


def abstract_params(model):
    """The parameter tree with shapes and logical axis names, via `jax.eval_shape` (nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(model)))["params"]


__all__ = ["TransformerConfig", "EncoderDecoder", "DecoderOnly", "build_model", "ARCHITECTURES", "dummy_inputs",
           "abstract_params"]
