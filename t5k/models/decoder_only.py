"""Decoder-only language models: GPT-3 / HyperCLOVA style, T5.1.1-style blocks, causal LM and prefix LM.

Inputs follow the seqio DecoderFeatureConverter / PrefixLM converter:

    decoder_input_tokens      [batch, length]   int, 0 = padding
    decoder_segment_ids       [batch, length]   packed batches only
    decoder_positions         [batch, length]   packed batches only (absolute / rotary positions)
    decoder_causal_attention  [batch, length]   prefix LM only: 1 on the prefix (the inputs), which then
                                                attend to each other bidirectionally

Output: float32 logits `[batch, length, vocab]`. Tied embeddings give `x @ embedding.T` unscaled (GPT).
"""

import flax.linen as nn
import jax.numpy as jnp

from t5k.models import layers, prompts
from t5k.models.config import TransformerConfig
from t5k.models.layers import Array, constrain
from t5k.models.stack import DecoderLayer, apply_layer_stack, cached_self_attention_bias


class DecoderOnly(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        decoder_input_tokens: Array,
        decoder_segment_ids=None,
        decoder_positions=None,
        decoder_causal_attention=None,
        deterministic: bool = True,
        decode: bool = False,
        decode_length=None,
    ) -> Array:
        """Logits `[batch, length, vocab]`.

        `decode=True` is cached incremental decoding: the tokens `[batch, q_len]` are those at
        `decoder_positions` `[batch, q_len]`, written into a "cache" collection of `decode_length` slots
        (apply with `mutable=["cache"]`; the first call creates the cache, later calls pass it back in).
        """
        cfg = self.config
        tokens = decoder_input_tokens
        positions = decoder_positions
        if positions is None:
            if decode:
                raise ValueError("cached decoding (decode=True) needs decoder_positions [batch, q_len] and decode_length")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        causal_attention = decoder_causal_attention
        # P-tuning (t5k.models.prompts): the virtual tokens take positions 0..n-1 and the tokens move after them.
        # They are fed on every call but a cached step's: its cache holds their keys and values already.
        n = cfg.prompt_length
        prepend = bool(n) and not (decode and self.has_variable("cache", prompts.WRITTEN))
        if n:
            if decoder_segment_ids is not None:
                raise ValueError("P-tuning (TransformerConfig.prompt_length > 0) needs unpacked batches: in a packed "
                                 "row only the first example would see the virtual tokens (train.pack = False)")
            positions = positions + n
            if decode:
                decode_length = None if decode_length is None else decode_length + n
            if prepend:
                virtual = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (tokens.shape[0], n))
                positions = jnp.concatenate([virtual, positions], axis=1)  # [batch, n + length]
                if causal_attention is not None:  # the virtual tokens belong to a prefix LM's prefix
                    causal_attention = jnp.concatenate([jnp.ones_like(virtual, causal_attention.dtype),
                                                        causal_attention], axis=1)
        length = positions.shape[1]
        if decode:  # validates the decoding inputs before anything reads them
            bias = cached_self_attention_bias(
                cfg, positions, decode_length,
                decoder_causal_attention=causal_attention, decoder_segment_ids=decoder_segment_ids,
            )
        init = nn.initializers.normal(stddev=cfg.embedding_stddev)
        embedder = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, embedding_init=init, name="token_embedder")
        x = embedder(tokens)  # [batch, length, embed]
        if prepend:
            prompt = prompts.VirtualPrompt(cfg, name="prompt")()  # [n, embed]
            x = jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape), x], axis=1)
            if decode:  # later calls find their keys and values in the cache
                self.variable("cache", prompts.WRITTEN, nn.with_logical_partitioning(jnp.ones, ("batch",)),
                              (x.shape[0],), jnp.int32)
        if cfg.position_embedding == "absolute":
            longest = decode_length if decode else length
            if longest > cfg.max_length:
                raise ValueError(f"sequence length {longest} exceeds the position table (max_length={cfg.max_length})")
            x = x + layers.Embed(
                cfg.max_length, cfg.d_model, table_axes=("abspos_buckets", "embed"), dtype=cfg.compute_dtype,
                embedding_init=init, name="position_embedder",
            )(positions)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = constrain(x, "batch", "length", "embed")

        if not decode:
            if causal_attention is None:
                mask = layers.causal_mask(length)
            else:
                mask = layers.prefix_lm_mask(causal_attention)
            if decoder_segment_ids is not None:
                mask = mask & layers.segment_mask(decoder_segment_ids, decoder_segment_ids)
            bias = (layers.mask_to_bias(mask),)  # [batch or 1, 1, length, length]
        if cfg.position_embedding == "relative" and not decode:
            # Causal buckets as in t5x, for the prefix LM too (its later-prefix offsets share bucket 0), so one
            # checkpoint serves both masks.
            arange = jnp.arange(length)
            bias += (layers.RelativePositionBiases(
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
                bidirectional=False, name="relpos_bias",
            )(arange, arange),)  # [1, heads, length, length]
        x = apply_layer_stack(
            cfg, DecoderLayer, cfg.num_decoder_layers, x, bias, positions, None, None,
            deterministic=deterministic, cross_attention=False, decode=decode, decode_length=decode_length,
        )
        x = layers.make_norm(cfg, "final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_embeddings:
            logits = embedder.attend(x)
        else:
            logits = layers.DenseGeneral(
                (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype,
                output_dtype=jnp.float32, name="logits_dense",
            )(x)
        if prepend:
            logits = logits[:, n:]  # the virtual positions predict nothing
        return constrain(logits, "batch", "length", "vocab")  # [batch, length, vocab], float32
