"""Feature conversion: task examples (inputs/targets) -> model batches, with seqio's converters.

seqio's converters already emit the keyword names of t5k's models:

| model_type | converter | model kwargs (packed adds *_segment_ids, *_positions) | loss features |
|---|---|---|---|
| `encoder_decoder` | `EncDecFeatureConverter` | encoder_input_tokens, decoder_input_tokens | decoder_target_tokens, decoder_loss_weights |
| `decoder` (LM) | `DecoderFeatureConverter` | decoder_input_tokens | decoder_target_tokens, decoder_loss_weights |
| `prefix_lm` | `PrefixLMFeatureConverter` | decoder_input_tokens, decoder_causal_attention | decoder_target_tokens, decoder_loss_weights |

`model_kwargs(batch, model_type)` picks the model's arguments out of a converted batch, so a train step is
``logits = model.apply(params, **model_kwargs(batch, kind))`` and the loss reads ``loss_features(batch)``.
Packed batches carry segment ids (1, 2, ... per example in a row, 0 on padding) and positions (restarting at
0 for every example): the models mask attention across segments with them.
"""

from typing import Dict, Mapping

import numpy as np
import seqio

CONVERTERS = {
    "encoder_decoder": seqio.EncDecFeatureConverter,
    "decoder": seqio.DecoderFeatureConverter,
    "prefix_lm": seqio.PrefixLMFeatureConverter,
}
MODEL_KWARGS = {
    "encoder_decoder": ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
                        "decoder_segment_ids", "encoder_positions", "decoder_positions"),
    "decoder": ("decoder_input_tokens", "decoder_segment_ids", "decoder_positions"),
    "prefix_lm": ("decoder_input_tokens", "decoder_segment_ids", "decoder_positions", "decoder_causal_attention"),
}
LOSS_FEATURES = ("decoder_target_tokens", "decoder_loss_weights")


def get_feature_converter(model_type: str = "encoder_decoder", pack: bool = True) -> seqio.FeatureConverter:
    """The seqio converter for `model_type` ("encoder_decoder", "decoder" or "prefix_lm")."""
    if model_type not in CONVERTERS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(CONVERTERS)}")
    return CONVERTERS[model_type](pack=pack)


def model_feature_lengths(task_feature_lengths: Mapping[str, int], model_type: str = "encoder_decoder",
                          pack: bool = True) -> Dict[str, int]:
    """Lengths of the converted features (e.g. 512/114 -> encoder 512, decoder 114; prefix LM: 626)."""
    converter = get_feature_converter(model_type, pack)
    return dict(converter.get_model_feature_lengths(dict(task_feature_lengths)))


def model_kwargs(batch: Mapping[str, np.ndarray], model_type: str = "encoder_decoder") -> Dict[str, np.ndarray]:
    """The model's keyword arguments present in `batch` (segment ids / positions only when packed)."""
    return {k: batch[k] for k in MODEL_KWARGS[model_type] if k in batch}


def loss_features(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: batch[k] for k in LOSS_FEATURES}
