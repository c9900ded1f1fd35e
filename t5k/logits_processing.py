"""Per-step logits processing for decoding: repetition penalty, min_new_tokens, temperature, top-k, top-p.

The order and semantics are those of `t5k.decoding`'s module docstring; `config` is a `DecodeConfig`.
"""

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1.0e9  # finite, so that masked logits never make NaNs in softmax or in score arithmetic




def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """`logits, seen: [rows, vocab]`: seen ids' positive logits / penalty, negative ones * penalty."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def process_logits(logits: jax.Array, seen: Optional[jax.Array], step: jax.Array, config) -> jax.Array:
    """Repetition penalty and min_new_tokens (steps 1-2 of the module docstring). `step`: new tokens so far."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.min_new_tokens > 0 and config.stop_token_ids:
        stop_ids = jnp.asarray(config.stop_token_ids)
        forbid = (step < config.min_new_tokens) & jnp.zeros(logits.shape[-1], bool).at[stop_ids].set(True)
        logits = jnp.where(forbid, NEG_INF, logits)
    return logits


def sampling_logits(logits: jax.Array, config) -> jax.Array:
    """Temperature, top-k, top-p (step 3): the logits to sample from, NEG_INF outside the kept set."""
    logits = logits / config.temperature
    vocab = logits.shape[-1]
    if 0 < config.top_k < vocab:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]  # [rows, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if config.top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        descending = -jnp.sort(-probs, axis=-1)
        mass_before = jnp.cumsum(descending, axis=-1) - descending  # mass of the strictly more probable ids
        # The kept set is every id whose more-probable predecessors have not yet reached top_p.
        num_kept = jnp.sum(mass_before < config.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
        logits = jnp.where(probs < threshold, NEG_INF, logits)
    return logits


def seen_ids(history: jax.Array, history_mask: jax.Array, vocab: int) -> jax.Array:
    """`[rows, hist]` ids -> `[rows, vocab]` bool presence (for the repetition penalty)."""
    rows = jnp.arange(history.shape[0])[:, None]
    return jnp.zeros((history.shape[0], vocab), bool).at[rows, history].max(history_mask)


def is_stop_id(tokens: jax.Array, config) -> jax.Array:
    if not config.stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(config.stop_token_ids))
