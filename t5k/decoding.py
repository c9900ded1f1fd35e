"""Decoding. For now: greedy decoding by full forward passes (no KV cache).

Each step re-runs the decoder over the whole fixed-length buffer and reads the logits at the current position.
That costs O(length²) but is simple enough to serve as the reference that cached decoding must reproduce token
for token, and it is what the quickstart uses to show span-filling predictions.
"""

import functools

import jax
import jax.numpy as jnp

from t5k.models import EncoderDecoder


def greedy_decode_uncached(model: EncoderDecoder, params, encoder_input_tokens: jax.Array, max_decode_length: int,
                           eos_id: int = 1) -> jax.Array:
    """`[batch, enc_len]` -> `[batch, max_decode_length]` greedy outputs, 0-padded after the first EOS.

    The decoder input starts with id 0 (T5's BOS); position i's prediction becomes input i+1.
    """
    if not isinstance(model, EncoderDecoder):
        raise TypeError("greedy_decode_uncached serves encoder-decoder models")
    return _greedy(model, params, encoder_input_tokens, max_decode_length, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _greedy(model, params, encoder_input_tokens, max_decode_length, eos_id):
    batch = encoder_input_tokens.shape[0]
    encoded = model.apply({"params": params}, encoder_input_tokens, method=model.encode)

    def step(i, carry):
        inputs, outputs, done = carry  # [batch, len], [batch, len], [batch]
        logits = model.apply({"params": params}, encoded, encoder_input_tokens, inputs, method=model.decode)
        token = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)  # [batch]
        token = jnp.where(done, 0, token)
        outputs = outputs.at[:, i].set(token)
        inputs = jnp.where(i + 1 < max_decode_length, inputs.at[:, jnp.minimum(i + 1, max_decode_length - 1)].set(token), inputs)
        return inputs, outputs, done | (token == eos_id)

    zeros = jnp.zeros((batch, max_decode_length), jnp.int32)
    _, outputs, _ = jax.lax.fori_loop(0, max_decode_length, step, (zeros, zeros, jnp.zeros((batch,), bool)))
    return outputs
