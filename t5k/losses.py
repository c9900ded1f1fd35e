"""Token-level cross entropy with T5's z-loss and optional label smoothing.

All sums are returned un-normalised together with the weight total, so callers can accumulate over
microbatches exactly and normalise once (by real target tokens, or by a fixed factor).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from t5k.logits_processing import argmax
from t5k.reductions import max_over, sum_over

Array = jax.Array


class LossSums(NamedTuple):
    loss: Array  # sum of weighted per-token losses (cross entropy + z-loss)
    z_loss: Array  # the z-loss part of `loss`
    correct: Array  # weighted count of argmax-correct tokens
    weight: Array  # sum of the weights (real target tokens when weights = targets > 0)


def cross_entropy_sums(
    logits: Array,  # [batch, length, vocab], float32
    targets: Array,  # [batch, length] int
    weights: Optional[Array] = None,  # [batch, length]; default targets > 0
    z_loss: float = 1e-4,
    label_smoothing: float = 0.0,
) -> LossSums:
    """Sums of `-log p(target)` plus `z_loss * logsumexp(logits)**2` (PaLM/T5's z-loss, which keeps the
    softmax normaliser near 1 and stabilises bf16 training).

    With label smoothing the target distribution is `(1 - s)` on the target and `s / (vocab - 1)` elsewhere;
    the constant entropy of that distribution is subtracted so a perfect prediction scores 0, as in T5.
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = (targets > 0).astype(jnp.float32)
    vocab = logits.shape[-1]
    top = lax.stop_gradient(max_over(logits, keepdims=True))  # [batch, length, 1]
    log_z = jnp.log(sum_over(jnp.exp(logits - top))) + top[..., 0]  # logsumexp, [batch, length]
    log_probs = logits - log_z[..., None]
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
        smooth = confidence * target_log_prob + low * (sum_over(log_probs) - target_log_prob)
        token_loss = -smooth - normalizer
    else:
        token_loss = -target_log_prob
    token_z_loss = z_loss * jnp.square(log_z)
    correct = (argmax(logits) == targets).astype(jnp.float32)
    return LossSums(
        loss=jnp.sum((token_loss + token_z_loss) * weights),
        z_loss=jnp.sum(token_z_loss * weights),
        correct=jnp.sum(correct * weights),
        weight=jnp.sum(weights),
    )
