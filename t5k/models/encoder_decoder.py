"""CT5 / T5.1.1 encoder-decoder.

Inputs follow the seqio EncDecFeatureConverter:

    encoder_input_tokens   [batch, enc_len]   int, 0 = padding
    decoder_input_tokens   [batch, dec_len]   targets shifted right, starting with 0 (T5 uses pad as BOS)
    encoder_segment_ids / decoder_segment_ids / *_positions   [batch, len]   only for packed batches

Output: float32 logits `[batch, dec_len, vocab]`.

The token embedding is shared by encoder and decoder; the output projection `logits_dense` is a separate
parameter (T5.1.1 does not tie it). With `tie_embeddings=True` the logits are `x @ embedding.T * d_model**-0.5`
(the T5.1.0 convention, also HF's when tied). With `shared_encoder_decoder=True` one stack of layers serves both
sides (the T5 paper's "encoder-decoder, shared"): encoder passes skip the cross-attention, which is the only
decoder-specific parameter set.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from t5k.models import layers
from t5k.models.config import TransformerConfig
from t5k.models.layers import Array, constrain
from t5k.models.stack import DecoderLayer, EncoderLayer, apply_layer_stack, cached_self_attention_bias


def _default_positions(tokens: Array) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _embed(config: TransformerConfig, token_embedder, tokens, deterministic) -> Array:
    """Token embedding with dropout, constrained to `[batch, length, embed]` (call inside a compact method)."""
    x = token_embedder(tokens)
    x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)
    return constrain(x, "batch", "length", "embed")


def _relative_bias(config: TransformerConfig, length: int, bidirectional: bool) -> Array:
    """The stack's `[1, heads, length, length]` relative position bias (call inside a compact method).

    Relative offsets from arange equal those from packed positions inside a segment, and across segments
    attention is masked, so arange serves packed batches too.
    """
    arange = jnp.arange(length)
    return layers.RelativePositionBiases(
        config.relative_attention_num_buckets, config.relative_attention_max_distance, config.num_heads,
        bidirectional, name="relpos_bias",
    )(arange, arange)


def _run_shared_layers(shared_layers, x, *args, deterministic, **decoding):
    for layer in shared_layers:
        x = layer(x, *args, deterministic, **decoding)
    return x


class Encoder(nn.Module):
    config: TransformerConfig
    token_embedder: nn.Module
    shared_layers: Optional[tuple] = None

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, deterministic=True) -> Array:
        cfg = self.config
        x = _embed(cfg, self.token_embedder, tokens, deterministic)  # [batch, length, embed]
        positions = _default_positions(tokens) if positions is None else positions
        mask = layers.key_padding_mask(tokens)
        if segment_ids is not None:
            mask = mask & layers.segment_mask(segment_ids, segment_ids)
        bias = (layers.mask_to_bias(mask),)  # [batch, 1, q or 1, k]
        if cfg.position_embedding == "relative":
            bias += (_relative_bias(cfg, tokens.shape[1], bidirectional=True),)  # [1, heads, q, k]
        if self.shared_layers is not None:
            x = _run_shared_layers(self.shared_layers, x, bias, positions, None, None, deterministic=deterministic)
        else:
            x = apply_layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, x, bias, positions, deterministic=deterministic)
        x = layers.make_norm(cfg, "final_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: TransformerConfig
    token_embedder: nn.Module
    shared_layers: Optional[tuple] = None

    @nn.compact
    def __call__(
        self,
        encoded: Array,  # [batch, enc_len, embed]
        encoder_tokens: Array,  # [batch, enc_len]
        tokens: Array,  # [batch, dec_len]
        encoder_segment_ids=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        decode=False,
        decode_length=None,
    ) -> Array:
        cfg = self.config
        x = _embed(cfg, self.token_embedder, tokens, deterministic)
        cross_mask = layers.key_padding_mask(encoder_tokens)
        if decode:
            self_bias = cached_self_attention_bias(cfg, positions, decode_length, decoder_segment_ids=segment_ids)
        else:
            positions = _default_positions(tokens) if positions is None else positions
            self_mask = layers.causal_mask(tokens.shape[1])
            if segment_ids is not None:
                self_mask = self_mask & layers.segment_mask(segment_ids, segment_ids)
                cross_mask = cross_mask & layers.segment_mask(segment_ids, encoder_segment_ids)
            self_bias = (layers.mask_to_bias(self_mask),)  # [batch or 1, 1, q, q]
            if cfg.position_embedding == "relative":
                self_bias += (_relative_bias(cfg, tokens.shape[1], bidirectional=False),)  # [1, heads, q, q]
        cross_bias = layers.mask_to_bias(cross_mask)
        args = (self_bias, positions, encoded, cross_bias)
        if self.shared_layers is not None:
            x = _run_shared_layers(self.shared_layers, x, *args, deterministic=deterministic, decode=decode,
                                   decode_length=decode_length)
        else:
            x = apply_layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, x, *args, deterministic=deterministic,
                                  decode=decode, decode_length=decode_length)
        x = layers.make_norm(cfg, "final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_embeddings:
            logits = self.token_embedder.attend(x) * cfg.d_model**-0.5
        else:
            logits = layers.DenseGeneral(
                (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype,
                output_dtype=jnp.float32, name="logits_dense",
            )(x)
        return constrain(logits, "batch", "length", "vocab")  # [batch, dec_len, vocab], float32


class EncoderDecoder(nn.Module):
    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, name="token_embedder")
        if cfg.prefix_lm:
            raise ValueError("TransformerConfig.prefix_lm is for decoder-only models; an encoder-decoder's inputs "
                             "are already read bidirectionally by its encoder")
        if cfg.prompt_length:
            raise ValueError("TransformerConfig.prompt_length: P-tuning's virtual tokens are implemented for "
                             "decoder-only models (HyperCLOVA); adapt an encoder-decoder with LoRA (lora_rank)")
        shared = None
        if cfg.shared_encoder_decoder:
            if cfg.num_encoder_layers != cfg.num_decoder_layers:
                raise ValueError("shared_encoder_decoder needs num_encoder_layers == num_decoder_layers")
            if cfg.scan_layers or cfg.remat_policy != "none":
                raise ValueError("shared_encoder_decoder is implemented for unrolled layers without remat")
            shared = tuple(DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_decoder_layers))
        self.encoder = Encoder(cfg, self.token_embedder, shared, name="encoder")
        self.decoder = Decoder(cfg, self.token_embedder, shared, name="decoder")

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, deterministic=True):
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic)

    def decode(
        self,
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        decoder_positions=None,
        deterministic=True,
        decode=False,
        decode_length=None,
    ):
        """Decoder logits `[batch, dec_len, vocab]`.

        `decode=True` is cached incremental decoding: `decoder_input_tokens` `[batch, q_len]` are the tokens at
        `decoder_positions` `[batch, q_len]`, written into a "cache" collection of `decode_length` slots
        (apply with `mutable=["cache"]`; the first call creates the cache, later calls pass it back in).
        """
        return self.decoder(
            encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids,
            decoder_positions, deterministic, decode, decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens,
        decoder_input_tokens,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        encoder_positions=None,
        decoder_positions=None,
        deterministic=True,
    ):
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("packed batches need both encoder_segment_ids and decoder_segment_ids")
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids, decoder_segment_ids,
            decoder_positions, deterministic,
        )
