"""The model side of cached decoding: a cache-creating start and a one-token step, alike for both architectures.

`make_stepper(model, params, batch, max_new_tokens)` reads the prompts and creates the cache:
- encoder-decoder: encodes the inputs, then makes a decode call with no decoder tokens, which allocates the
  self-attention cache and projects the encoder output into the cross-attention keys/values once;
- decoder-only: writes the padded prompts into a fresh cache (one prefill call; its logits are unused, so XLA
  drops their computation).
Decoding loops (`t5k.decoding`, `t5k.beam_search`) then call `step` once per new token, feeding first
`Start.tokens` (T5's BOS 0, or each prompt's last token) at `Start.positions`, and from then on the token just
chosen at the next position.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5k.models import DecoderOnly, EncoderDecoder


@dataclasses.dataclass
class Start:
    """The state after reading the prompts (arrays batch-major over the prompts).

    cache        the "cache" collection, unboxed
    cache_axes   the batch axis of every cache leaf (a pytree like `cache`)
    context      per-row arrays every step passes to the model again (encoder output and tokens)
    tokens       [batch] int32, the token the first step feeds
    positions    [batch] int32, its position (the t-th step feeds position `positions + t`)
    history      [batch, hist] int32, ids the repetition penalty counts from the start, where `history_mask`
    history_mask [batch, hist] bool
    """

    cache: Any
    cache_axes: Any
    context: Dict[str, jax.Array]
    tokens: jax.Array
    positions: jax.Array
    history: jax.Array
    history_mask: jax.Array


class Stepper(NamedTuple):
    """`step(cache, context, tokens [rows], positions [rows]) -> (logits [rows, vocab] float32, cache)`."""

    step: Callable
    start: Start
    vocab_size: int


def _batch_axes(boxed_cache) -> Any:
    """Batch axis of each cache leaf, read from its logical axis names (`layers` comes first when scanned)."""

    def axis(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise TypeError(f"cache leaf without logical axis names: {type(leaf).__name__}")
        return leaf.names.index("batch")

    return jax.tree_util.tree_map(axis, boxed_cache, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def take_rows(tree, axes, rows: jax.Array):
    """Gathers `rows` along each leaf's batch axis (`axes` a matching pytree of ints)."""
    return jax.tree_util.tree_map(lambda x, a: jnp.take(x, rows, axis=a), tree, axes)


def _start_encoder_decoder(model: EncoderDecoder, params, batch, decode_length: int) -> Start:
    enc = batch["encoder_input_tokens"]  # [batch, enc_len]
    rows = enc.shape[0]
    encoded = model.apply({"params": params}, enc, method=model.encode)  # [batch, enc_len, embed]
    nothing = jnp.zeros((rows, 0), jnp.int32)
    _, variables = model.apply(
        {"params": params}, encoded, enc, nothing, decoder_positions=nothing, decode=True,
        decode_length=decode_length, method=model.decode, mutable=["cache"],
    )
    bos = jnp.zeros((rows,), jnp.int32)
    return Start(
        cache=nn.unbox(variables["cache"]), cache_axes=_batch_axes(variables["cache"]),
        context={"encoded": encoded, "encoder_input_tokens": enc}, tokens=bos, positions=bos,
        history=bos[:, None], history_mask=jnp.ones((rows, 1), bool),
    )


def _start_decoder_only(model: DecoderOnly, params, batch, decode_length: int) -> Start:
    """Writes the padded prompts into a fresh cache; the first step re-feeds each prompt's last token.

    Slots at or after a row's last prompt token may hold padding; the steps rewrite them before any query
    can see them (a query at position p sees slots 0..p only). A prefix LM (`config.prefix_lm`) writes its
    prompt with the prompt attending to itself bidirectionally, as in training; re-feeding the last prompt token
    then changes nothing, since it sees the whole prompt either way.
    """
    prompt, lengths = batch["prompt_tokens"], batch["prompt_lengths"]  # [batch, prompt_len], [batch]
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    prefix = (positions < lengths[:, None]).astype(jnp.int32) if model.config.prefix_lm else None
    _, variables = model.apply(
        {"params": params}, prompt, decoder_positions=positions, decoder_causal_attention=prefix, decode=True,
        decode_length=decode_length, mutable=["cache"],
    )
    return Start(
        cache=nn.unbox(variables["cache"]), cache_axes=_batch_axes(variables["cache"]), context={},
        tokens=jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0], positions=lengths - 1,
        history=prompt, history_mask=positions < lengths[:, None],
    )


def _step_encoder_decoder(model, params, cache, context, tokens, positions, decode_length):
    # The cross-attention cache is loop-invariant: tying it to this step's positions keeps XLA from hoisting
    # work on it out of the decoding loop (a float32 copy of the bfloat16 keys, twice the bytes at every read).
    cache, positions = jax.lax.optimization_barrier((cache, positions))
    # `encoded` is passed for the layers' signature; with the cache in place nothing reads it.
    logits, variables = model.apply(
        {"params": params, "cache": cache}, context["encoded"], context["encoder_input_tokens"], tokens[:, None],
        decoder_positions=positions[:, None], decode=True, decode_length=decode_length, method=model.decode,
        mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


def _step_decoder_only(model, params, cache, context, tokens, positions, decode_length):
    del context
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], decoder_positions=positions[:, None], decode=True,
        decode_length=decode_length, mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


def make_stepper(model, params, batch: Dict[str, jax.Array], max_new_tokens: int) -> Stepper:
    """The start and step of `model` (EncoderDecoder or DecoderOnly) for a validated `batch`.

    Cache lengths: encoder-decoder max_new_tokens (inputs at positions 0..max_new_tokens-1); decoder-only
    prompt_len + max_new_tokens - 1 (the last new token is never fed back).
    """
    if isinstance(model, EncoderDecoder):
        decode_length = max_new_tokens
        start = _start_encoder_decoder(model, params, batch, decode_length)
        step = _step_encoder_decoder
    else:
        decode_length = batch["prompt_tokens"].shape[1] + max_new_tokens - 1
        start = _start_decoder_only(model, params, batch, decode_length)
        step = _step_decoder_only
    return Stepper(functools.partial(step, model, params, decode_length=decode_length), start, model.config.vocab_size)
