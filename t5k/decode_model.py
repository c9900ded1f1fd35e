"""The model side of cached decoding: a cache-creating start and a one-token step, alike for both architectures.

`make_stepper(model, params, batch, max_new_tokens)` reads the prompts (encoder-decoder: encodes them and
creates the decoder cache with the BOS step; decoder-only: writes the prompts into a fresh cache and steps on
each prompt's last token) and returns the logits of the first new token together with a `step` function that
feeds one token per row at given positions. Decoding loops (`t5k.decoding`, `t5k.beam_search`) only see these.
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
    """What decoding needs after the prompt has been read (all arrays batch-major over the prompts).

    cache        the "cache" collection, unboxed
    cache_axes   the batch axis of every cache leaf (a pytree like `cache`)
    context      per-row arrays every step passes to the model again (encoder output and tokens)
    logits       [batch, vocab] float32, the distribution of the first new token
    positions    [batch] int32, the position at which the first new token will be fed back
    history      [batch, hist] int32, ids the repetition penalty counts from the start (0 entries ignored
                 unless a position is marked in `history_mask`)
    history_mask [batch, hist] bool
    """

    cache: Any
    cache_axes: Any
    context: Dict[str, jax.Array]
    logits: jax.Array
    positions: jax.Array
    history: jax.Array
    history_mask: jax.Array


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
    bos = jnp.zeros((rows, 1), jnp.int32)
    logits, variables = model.apply(
        {"params": params}, encoded, enc, bos, decoder_positions=bos, decode=True, decode_length=decode_length,
        method=model.decode, mutable=["cache"],
    )
    return Start(
        cache=nn.unbox(variables["cache"]), cache_axes=_batch_axes(variables["cache"]),
        context={"encoded": encoded, "encoder_input_tokens": enc}, logits=logits[:, 0],
        positions=jnp.ones((rows,), jnp.int32), history=bos, history_mask=jnp.ones((rows, 1), bool),
    )


def _start_decoder_only(model: DecoderOnly, params, batch, decode_length: int) -> Start:
    """Writes each prompt but its last token into a fresh cache, then steps on the last token for the logits.

    The prefill's own logits are unused (XLA drops their computation); writing the full padded prompt is
    harmless because slots at or after a row's last prompt token are rewritten before any query sees them.
    """
    prompt, lengths = batch["prompt_tokens"], batch["prompt_lengths"]  # [batch, prompt_len], [batch]
    rows, prompt_len = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompt.shape)
    _, variables = model.apply(
        {"params": params}, prompt, decoder_positions=positions, decode=True, decode_length=decode_length,
        mutable=["cache"],
    )
    cache = nn.unbox(variables["cache"])
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
    logits, cache = _step_decoder_only(model, params, cache, {}, last, lengths - 1, decode_length)
    return Start(
        cache=cache, cache_axes=_batch_axes(variables["cache"]), context={}, logits=logits, positions=lengths,
        history=prompt, history_mask=positions < lengths[:, None],
    )


def _step_encoder_decoder(model, params, cache, context, tokens, positions, decode_length):
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


class Stepper(NamedTuple):
    """`step(cache, context, tokens [rows], positions [rows]) -> (logits [rows, vocab], cache)`."""

    step: Callable
    start: Start


def make_stepper(model, params, batch: Dict[str, jax.Array], max_new_tokens: int) -> Stepper:
    """The start and step of `model` (EncoderDecoder or DecoderOnly) for a validated `batch`."""
    if isinstance(model, EncoderDecoder):
        decode_length = max_new_tokens
        start = _start_encoder_decoder(model, params, batch, decode_length)
        step = _step_encoder_decoder
    else:
        decode_length = batch["prompt_tokens"].shape[1] + max_new_tokens - 1
        start = _start_decoder_only(model, params, batch, decode_length)
        step = _step_decoder_only
    return Stepper(functools.partial(step, model, params, decode_length=decode_length), start)
