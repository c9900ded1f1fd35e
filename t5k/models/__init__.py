"""t5k models: the config, the encoder-decoder (CT5) and the decoder-only (HyperCLOVA-style) networks."""

import gin

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


__all__ = ["TransformerConfig", "EncoderDecoder", "DecoderOnly", "build_model", "ARCHITECTURES"]
