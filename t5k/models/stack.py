"""Transformer layers and the stacking of them: unrolled (`layers_0`, `layers_1`, …) or `nn.scan`-ned.

Scanning compiles one layer body instead of N copies (compile time flat in depth, which matters for 24+ layer
models), at the price of a stacked parameter layout: every leaf gains a leading `layers` axis. Both layouts
compute the same function; `stack_layer_params` / `unstack_layer_params` convert checkpoints between them.

Remat (`jax.checkpoint`) policies trade recomputation for activation memory:
- 'none':    keep every activation for the backward pass (fastest, most memory);
- 'minimal': keep only the results of matmuls without batch dimensions (the projections), recompute the rest;
- 'full':    keep only the layer inputs and recompute the whole layer in the backward pass.
"""

import re
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5k.models.config import TransformerConfig
from t5k.models import layers
from t5k.models.layers import Array, MlpBlock, MultiHeadAttention, constrain, make_norm

REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class EncoderLayer(nn.Module):
    """Pre-norm block: x + Attn(Norm(x)), then x + Mlp(Norm(x)); dropout on each residual branch."""

    config: TransformerConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Array, positions: Optional[Array], deterministic: bool):
        cfg = self.config
        dropout = nn.Dropout(rate=cfg.dropout_rate)
        h = make_norm(cfg, "pre_attention_norm")(x)
        h = MultiHeadAttention(cfg, name="attention")(h, h, bias, deterministic, positions, positions)
        x = x + dropout(h, deterministic=deterministic)
        h = make_norm(cfg, "pre_mlp_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic)
        x = x + dropout(h, deterministic=deterministic)
        x = constrain(x, "batch", "length", "embed")  # [batch, length, embed]
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Causal self-attention, then (encoder-decoder only) cross-attention to the encoder, then the MLP.

    `decode=True`: attention keys/values are cached (see `MultiHeadAttention`); `positions` are required.
    """

    config: TransformerConfig
    scanned: bool = False
    cross_attention: bool = True
    decode: bool = False
    decode_length: Optional[int] = None

    @nn.compact
    def __call__(
        self,
        x: Array,  # [batch, length, embed]
        self_bias: Array,  # [batch, 1, length, length]
        positions: Optional[Array],  # [batch, length]
        encoded: Optional[Array],  # [batch, enc_length, embed]
        cross_bias: Optional[Array],  # [batch, 1, length, enc_length]
        deterministic: bool,
        *,
        decode: Optional[bool] = None,
        decode_length: Optional[int] = None,
    ):
        # `decode` / `decode_length` given at call time override the attributes: the layers a shared
        # encoder-decoder builds once serve both the encoder (no cache) and the cached decoder.
        decode = self.decode if decode is None else decode
        decode_length = self.decode_length if decode_length is None else decode_length
        cfg = self.config
        dropout = nn.Dropout(rate=cfg.dropout_rate)
        h = make_norm(cfg, "pre_self_attention_norm")(x)
        h = MultiHeadAttention(cfg, decode=decode, decode_length=decode_length, name="self_attention")(
            h, h, self_bias, deterministic, positions, positions
        )
        x = x + dropout(h, deterministic=deterministic)
        if self.cross_attention and encoded is not None:  # None: an encoder pass through a shared stack
            h = make_norm(cfg, "pre_cross_attention_norm")(x)
            h = MultiHeadAttention(cfg, is_self_attention=False, decode=decode, name="encoder_decoder_attention")(
                h, encoded, cross_bias, deterministic
            )
            x = x + dropout(h, deterministic=deterministic)
        h = make_norm(cfg, "pre_mlp_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic)
        x = x + dropout(h, deterministic=deterministic)
        x = constrain(x, "batch", "length", "embed")
        return (x, None) if self.scanned else x


def apply_layer_stack(
    config: TransformerConfig, layer_cls, num_layers: int, x: Array, *args, deterministic: bool, **layer_kwargs
) -> Array:
    """Runs `num_layers` layers of `layer_cls` on `x`; call inside a parent's `nn.compact` method.

    `args` are passed unchanged to every layer (masks, positions, encoder output). Unrolled layers are named
    `layers_{i}`; the scanned stack is named `layers` and its parameters (and decoding caches) carry the logical
    axis `layers`. Cached decoding (`decode=True` in `layer_kwargs`) runs without remat: there is no backward pass.
    """
    if config.remat_policy != "none" and not layer_kwargs.get("decode", False):
        layer_cls = nn.remat(
            layer_cls,
            policy=REMAT_POLICIES[config.remat_policy],
            prevent_cse=not config.scan_layers,  # scan already prevents CSE across iterations
            static_argnums=(len(args) + 2,),  # `deterministic`; index 0 is self
        )
    if config.scan_layers:
        scanned_cls = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * (len(args) + 1),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned_cls(config, scanned=True, name="layers", **layer_kwargs)(x, *args, deterministic)
        return x
    for i in range(num_layers):
        x = layer_cls(config, name=f"layers_{i}", **layer_kwargs)(x, *args, deterministic)
    return x


def cached_self_attention_bias(
    config: TransformerConfig,
    positions: Optional[Array],
    decode_length: Optional[int],
    decoder_causal_attention: Optional[Array] = None,
    **unsupported,
) -> Array:
    """Self-attention bias `[batch, 1 or heads, q_len, decode_length]` of a cached decoding call.

    Call inside the decoder's compact method (it creates the stack's `relpos_bias` when positions are relative).
    `decoder_causal_attention` `[batch, q_len]` (a prefix LM's prompt, 1 on a leading block of positions) opens
    the mask among the prefix's slots, as `layers.prefix_lm_mask` does in training; it belongs to the call that
    writes the whole prefix (the prefill), since a prefix query must see the prefix keys after it.
    `unsupported` names inputs that cached decoding does not take (packing); they must be None.
    """
    given = sorted(name for name, value in unsupported.items() if value is not None)
    if given:
        raise ValueError(f"cached decoding (decode=True) does not support {given}")
    if positions is None or decode_length is None:
        raise ValueError("cached decoding (decode=True) needs decoder_positions [batch, q_len] and decode_length")
    mask = layers.cached_causal_mask(positions, decode_length)  # [batch, 1, q, decode_length]
    if decoder_causal_attention is not None:
        mask = mask | layers.cached_prefix_mask(decoder_causal_attention, decode_length)
    bias = layers.mask_to_bias(mask)
    if config.position_embedding == "relative":
        bias = bias + layers.RelativePositionBiases(
            config.relative_attention_num_buckets, config.relative_attention_max_distance, config.num_heads,
            bidirectional=False, name="relpos_bias",
        )(positions, jnp.arange(decode_length))
    return bias


# An unrolled layer's name; the scanned stack is `layers`.
LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layer_params(tree: Dict[str, Any]) -> Dict[str, Any]:
    """Unrolled -> scanned layout: every `{..., layers_i: T_i}` becomes `{..., layers: stack(T_0, T_1, …)}`."""
    if not isinstance(tree, dict):
        return tree
    indexed = {int(m.group(1)): v for k, v in tree.items() if (m := LAYER_KEY.match(k))}
    out = {k: stack_layer_params(v) for k, v in tree.items() if not LAYER_KEY.match(k)}
    if indexed:
        if sorted(indexed) != list(range(len(indexed))):
            raise ValueError(f"layer indices are not contiguous from 0: {sorted(indexed)}")
        layers = [indexed[i] for i in range(len(indexed))]
        out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layer_params(tree: Dict[str, Any]) -> Dict[str, Any]:
    """Scanned -> unrolled layout; the inverse of `stack_layer_params`."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            num_layers = jax.tree_util.tree_leaves(value)[0].shape[0]
            for i in range(num_layers):
                out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], value)
        else:
            out[key] = unstack_layer_params(value)
    return out
