"""Sum / max / mean over an axis, written so that XLA:CPU fuses them with the ops that produce their input.

Why: XLA's CPU pipeline rewrites every reduction over a dimension longer than 32 into a reduce-window over blocks
of 32 followed by a reduce of the partial results (`TreeReductionRewriter`, pairwise summation for accuracy). A
reduce-window is never fused with its producer, so the reduction's input is first written to memory and read
back. For an attention softmax that is the biased logits `[batch, heads, q, k]` (materialised for the row max)
and the exponentials (materialised for the row sum); for a top-p bisection, each of its 31 masked sums over the
vocabulary; for RMSNorm, the squares.

Here the same two stages are written out: the axis is padded to a multiple of 32 with the operation's identity
(split evenly before and after, like the rewriter's `SAME` padding), reshaped to `[..., n / 32, 32, ...]`, reduced
over the 32 (a plain reduce, which XLA fuses with the producer, so the input is read once and never stored), and
then over the `n / 32` partials. An `optimization_barrier` between the stages keeps XLA's algebraic simplifier from
merging them back into one long reduce, which the rewriter would split again. Same blocks of 32 as XLA's own
rewrite, so sums group the same terms. Measured on this 2-core machine: the softmax of one ct5_small encoder
layer (`[8, 6, 512, 512]`) alone, 29–37 ms -> 11–12 ms; inside the model the gain is smaller (XLA had already
fused part of it): the bfloat16 ct5_small train step ~4–6% faster, the encoder's non-matmul time 880 -> 805 ms of
profiled op time. Small inputs (a decoding step's) keep the plain reduction (`MIN_ELEMENTS`).

Other backends (TPU, GPU) reduce long axes natively: there these are the plain `jnp` reductions.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
BLOCK = 32  # XLA:CPU's tree-reduction window: reductions over at most this many elements are left alone
# Below this many input elements the plain reduction is kept: its materialised input is small enough to stay in
# cache, and the barrier's cost shows (a decoding step's reductions over `[8, 51200]` logits ran ~3% slower).
MIN_ELEMENTS = 1 << 20


def sum_over(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    return _two_stage(x, jnp.sum, 0, axis, keepdims)


def max_over(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    identity = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    return _two_stage(x, jnp.max, identity, axis, keepdims)


def min_over(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    identity = jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).max
    return _two_stage(x, jnp.min, identity, axis, keepdims)


def mean_over(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    return sum_over(x, axis, keepdims) / x.shape[axis]


def _two_stage(x: Array, op: Callable, identity, axis: int, keepdims: bool) -> Array:
    axis = axis % x.ndim
    n = x.shape[axis]
    if n <= BLOCK or x.size < MIN_ELEMENTS or jax.default_backend() != "cpu":
        return op(x, axis=axis, keepdims=keepdims)
    pad = -n % BLOCK
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (pad // 2, pad - pad // 2)
        x = jnp.pad(x, widths, constant_values=identity)
    blocks = x.reshape(x.shape[:axis] + ((n + pad) // BLOCK, BLOCK) + x.shape[axis + 1:])  # the axis split in two
    partial = lax.optimization_barrier(op(blocks, axis=axis + 1))  # [..., (n + pad) / 32, ...]
    return op(partial, axis=axis, keepdims=keepdims)
