"""Beam search over a cached decoder, in one `lax.while_loop` (semantics: `t5k.decoding`'s module docstring).

Per prompt the loop keeps `num_beams` running beams and `num_beams` finished hypotheses. Each step scores all
`num_beams * vocab` continuations, keeps the best `candidates` (2 * num_beams, more with several stop ids, so
that num_beams of them can continue even if many stop), moves those that stop within the top num_beams ranks
into the finished set (scored with the length penalty) and continues with the best num_beams that do not stop.
The cache rows follow their beams (a gather along each cache leaf's batch axis).
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from t5k import logits_processing
from t5k.decode_model import Stepper, take_rows


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x [batch, beams, ...]`, `index [batch, k]` -> `[batch, k, ...]` (beam-axis gather per prompt)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(stepper: Stepper, config, stops) -> Tuple[jax.Array, jax.Array]:
    """Best `config.num_samples` hypotheses per prompt: tokens `[batch, num_samples, max_new_tokens]`, scores.

    `config` is a `DecodeConfig`; `stops` the stop-string tables or None.
    """
    start = stepper.start
    batch, vocab = start.tokens.shape[0], stepper.vocab_size
    beams, n = config.num_beams, config.max_new_tokens
    candidates = min(max(2, 1 + len(config.stop_token_ids)) * beams, beams * vocab)
    penalty = config.length_penalty_fn()
    rows = jnp.repeat(jnp.arange(batch), beams)  # [batch * beams]
    positions = start.positions[rows]
    context = jax.tree_util.tree_map(lambda x: x[rows], start.context)  # loop-invariant
    neg = logits_processing.NEG_INF
    state = dict(
        t=jnp.zeros((), jnp.int32),
        cache=take_rows(start.cache, start.cache_axes, rows),
        inputs=start.tokens[rows],  # [batch * beams], the token the next step feeds
        tokens=jnp.zeros((batch, beams, n), jnp.int32),
        # Only beam 0 is live at the start (all beams begin as copies of the prompt's row).
        scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(neg),
        stop_state=jnp.zeros((batch, beams), jnp.int32),
        seen=(logits_processing.seen_ids(start.history[rows], start.history_mask[rows], vocab)
              if config.repetition_penalty != 1.0 else None),
        finished_tokens=jnp.zeros((batch, beams, n), jnp.int32),
        finished_scores=jnp.full((batch, beams), neg, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch,), bool),
        all_stopped=jnp.zeros((), bool),
    )

    def body(s):
        t = s["t"]
        logits, cache = stepper.step(s["cache"], context, s["inputs"], positions + t)  # [batch * beams, vocab]
        logprobs = logits_processing.process_logits(jax.nn.log_softmax(logits, axis=-1), s["seen"], t, config)
        total = (logprobs.reshape(batch, beams, vocab) + s["scores"][..., None]).reshape(batch, beams * vocab)
        top_scores, top_index = jax.lax.top_k(total, candidates)  # [batch, candidates], best first
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        cand_tokens = _gather(s["tokens"], origin).at[:, :, t].set(token)  # [batch, candidates, n]
        cand_stop_state = _gather(s["stop_state"], origin)
        stops_here = logits_processing.is_stop_id(token, config) | (t == n - 1)
        if stops is not None:
            cand_stop_state, completes = stops.advance(cand_stop_state, token)
            stops_here = stops_here | completes

        # Running beams: the best candidates that do not stop.
        scores, pick = jax.lax.top_k(jnp.where(stops_here, neg, top_scores), beams)  # [batch, beams]
        origin_rows = (jnp.arange(batch)[:, None] * beams + _gather(origin, pick)).reshape(-1)
        next_token = _gather(token, pick)  # [batch, beams]

        # Finished hypotheses: stopping candidates within the top `beams` ranks, while the row still takes them.
        full = jnp.all(s["finished"], axis=1, keepdims=True) & (config.early_stopping is True)
        takes = stops_here & (jnp.arange(candidates) < beams)[None] & ~full & s["improvable"][:, None]
        new_scores = jnp.where(takes, top_scores / penalty(t + 1), neg)
        merged_scores = jnp.concatenate([s["finished_scores"], new_scores], axis=1)
        finished_scores, keep = jax.lax.top_k(merged_scores, beams)
        finished_tokens = _gather(jnp.concatenate([s["finished_tokens"], cand_tokens], axis=1), keep)
        finished = _gather(jnp.concatenate([s["finished"], takes], axis=1), keep)

        # Can a running beam still beat the worst finished hypothesis? (transformers' early-stop heuristic)
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_length = n
        else:
            best_length = t + 1
        best_possible = scores[:, :1] / penalty(best_length)
        worst = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), neg)
        improvable = s["improvable"] & jnp.any(best_possible > worst, axis=1)

        seen = s["seen"]
        if seen is not None:
            seen = seen[origin_rows].at[jnp.arange(batch * beams), next_token.reshape(-1)].set(True)
        return dict(
            t=t + 1, cache=take_rows(cache, start.cache_axes, origin_rows), inputs=next_token.reshape(-1),
            tokens=_gather(cand_tokens, pick), scores=scores, stop_state=_gather(cand_stop_state, pick), seen=seen, finished_tokens=finished_tokens,
            finished_scores=finished_scores, finished=finished, improvable=improvable,
            all_stopped=jnp.all(stops_here),
        )

    def cond(s):
        rows_open = ~(jnp.all(s["finished"]) & (config.early_stopping is True))
        return (s["t"] < n) & jnp.any(s["improvable"]) & rows_open & ~s["all_stopped"]

    final = jax.lax.while_loop(cond, body, state)
    k = config.num_samples
    return final["finished_tokens"][:, :k], final["finished_scores"][:, :k]
