"""Matmul-level kernels with hand-written gradients: low-precision dense products and dot-product attention.

Why hand-written: with bfloat16 compute, JAX's automatic transpose of `dot_general(x, w,
preferred_element_type=float32)` multiplies the *float32* cotangent with the bfloat16 operand, so every
backward matmul runs in float32, and a dot that returns bfloat16 is widened to float32 by XLA:CPU as well. Only
`bf16 x bf16 -> f32` products use the CPU's bfloat16 dot instructions (AVX512-BF16; the same holds for TPU/GPU
MXUs and tensor cores), measured at ~2.2x the float32 matmul rate on this machine. The functions below keep all
three products of every matmul (forward, input gradient, weight gradient) in that form: operands in the compute
dtype, float32 accumulation and results. In float32 they compute exactly what autodiff computes.

`dot_product_attention` also writes the softmax backward pass by hand (the flash-attention algebra without the
tiling), which touches each `[batch, heads, q, k]` tensor fewer times than autodiff of the same forward does,
and accepts its additive biases unbroadcast (a `[batch, 1, 1, k]` padding bias and a `[1, heads, q, k]`
position bias are added inside the logits fusion instead of being materialised as one `[batch, heads, q, k]`).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from t5k.reductions import max_over, sum_over

Array = jax.Array
F32 = jnp.float32


def _dot(a: Array, b: Array, dims) -> Array:
    """`a · b` with float32 accumulation and result."""
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


# ----------------------------------------------------------------------------------------------------------
# Dense: x [..., *in] · kernel [*in, *out] -> [..., *out]


def dense(x: Array, kernel: Array, num_in: int, dtype) -> Array:
    """Contracts the trailing `num_in` dims of `x` with the leading `num_in` dims of `kernel` in `dtype`.

    Returns float32 `[..., *out]`; the caller casts. The kernel gradient is float32 whatever `dtype` is (no
    rounding of weight gradients to bfloat16).
    """
    if jnp.dtype(dtype) == F32:
        return _dot(x.astype(F32), kernel.astype(F32), _dense_dims(x.ndim, num_in))
    return _low_precision_dense(x, kernel, num_in, jnp.dtype(dtype))


def _dense_dims(x_ndim: int, num_in: int):
    return (tuple(range(x_ndim - num_in, x_ndim)), tuple(range(num_in))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_dense(x, kernel, num_in, dtype):
    return _dot(x.astype(dtype), kernel.astype(dtype), _dense_dims(x.ndim, num_in))


def _low_precision_dense_fwd(x, kernel, num_in, dtype):
    return _low_precision_dense(x, kernel, num_in, dtype), (x, kernel)


def _low_precision_dense_bwd(num_in, dtype, residuals, g):
    x, kernel = residuals
    xc, kc, g = x.astype(dtype), kernel.astype(dtype), g.astype(dtype)  # g: [..., *out]
    num_batch = x.ndim - num_in
    d_x = _dot(g, kc, ((tuple(range(num_batch, g.ndim)), tuple(range(num_in, kernel.ndim))), ((), ())))
    d_kernel = _dot(xc, g, ((tuple(range(num_batch)), tuple(range(num_batch))), ((), ())))  # [*in, *out]
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_low_precision_dense.defvjp(_low_precision_dense_fwd, _low_precision_dense_bwd)


def dense_transposed(x: Array, table: Array, dtype) -> Array:
    """`x [..., e] · table [v, e]ᵀ -> [..., v]` in `dtype`, float32 result: the tied output projection
    (`Embed.attend`). Not `dense(x, table.T, ...)`: XLA folds that transpose into the table gradient's dot as a
    transposed output, which XLA:CPU's bfloat16 path cannot run (DotThunk: "BF16 x BF16 = F32" unimplemented).
    Here the table gradient is computed as `[v, e]` directly."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if jnp.dtype(dtype) == F32:
        return _dot(x.astype(F32), table.astype(F32), dims)
    return _low_precision_dense_transposed(x, table, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_dense_transposed(x, table, dtype):
    return _dot(x.astype(dtype), table.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())))


def _low_precision_dense_transposed_fwd(x, table, dtype):
    return _low_precision_dense_transposed(x, table, dtype), (x, table)


def _low_precision_dense_transposed_bwd(dtype, residuals, g):
    x, table = residuals
    xc, tc, g = x.astype(dtype), table.astype(dtype), g.astype(dtype)  # g: [..., v]
    batch = tuple(range(x.ndim - 1))
    d_x = _dot(g, tc, (((g.ndim - 1,), (0,)), ((), ())))  # [..., e]
    d_table = _dot(g, xc, ((batch, batch), ((), ())))  # [v, e]
    return d_x.astype(x.dtype), d_table.astype(table.dtype)


_low_precision_dense_transposed.defvjp(_low_precision_dense_transposed_fwd, _low_precision_dense_transposed_bwd)


# ----------------------------------------------------------------------------------------------------------
# Attention


def dot_product_attention(
    query: Array,  # [batch, q_len, heads, kv]
    key: Array,  # [batch, k_len, heads, kv]
    value: Array,  # [batch, k_len, heads, kv]
    biases: Sequence[Array],  # each float32, broadcastable to [batch, heads, q_len, k_len]
    dropout_keep: Optional[Array] = None,  # [batch, heads, q_len, k_len] float32: 0 or 1/keep_rate
) -> Array:
    """`softmax(q·kᵀ + Σ biases) · v` -> `[batch, q_len, heads, kv]` in the query's dtype.

    Products run in the query's dtype with float32 accumulation; the softmax is float32. Dropout, when given,
    multiplies the softmax weights (as in T5). The row normalisation is applied to the `[batch, q, heads, kv]`
    output rather than to the `q·k` weights: the same function, one pass over `[batch, heads, q, k]` fewer.
    """
    keep = () if dropout_keep is None else (dropout_keep,)
    if query.shape[1] == 1 and query.dtype != F32:
        # One query row (every cached decoding step) makes both products matrix-vector products, which
        # XLA:CPU keeps out of its bfloat16 matmul library: it widens the keys and values to float32 (for a
        # loop-invariant cross-attention cache, into a float32 copy twice the size) and runs a generic dot.
        # With the row repeated, the products are 2-row matmuls in bfloat16: half the bytes read, and on
        # ct5_small ~3x faster per decoding step. Row 1 is dropped; row 0 is unchanged.
        # Biases and the dropout mask have q_len 1 and broadcast over both rows.
        doubled = jnp.concatenate([query, query], axis=1)  # [batch, 2, heads, kv]
        return _attention(doubled, key, value, tuple(biases), keep)[:, :1]
    return _attention(query, key, value, tuple(biases), keep)


def _attention_forward(query, key, value, biases, keep):
    dtype = query.dtype
    logits = _dot(query, key.astype(dtype), (((3,), (3,)), ((0, 2), (0, 2))))  # [batch, heads, q, k]
    for bias in biases:
        logits = logits + bias
    row_max = max_over(logits, keepdims=True)
    weights = jnp.exp(logits - row_max)  # [batch, heads, q, k], unnormalised
    # The normaliser sums the weights as the product below sees them (rounded to `dtype`): the output is then
    # an exact weighted mean of the values, and the float32 weights are never materialised (their only
    # consumer is the rounding; summing them too would make XLA store them: ~2.5x slower softmax on CPU).
    row_sum = sum_over(weights.astype(dtype).astype(F32))  # [batch, heads, q]
    kept = weights * keep[0] if keep else weights
    out = _dot(kept.astype(dtype), value.astype(dtype), (((3,), (1,)), ((0, 1), (0, 2))))  # [batch, heads, q, kv]
    out = out / row_sum[..., None]
    return jnp.transpose(out, (0, 2, 1, 3)), weights, row_sum  # out: [batch, q, heads, kv] float32


@jax.custom_vjp
def _attention(query, key, value, biases, keep):
    return _attention_forward(query, key, value, biases, keep)[0].astype(query.dtype)


def _attention_fwd(query, key, value, biases, keep):
    out, weights, row_sum = _attention_forward(query, key, value, biases, keep)
    out = out.astype(query.dtype)
    return out, (query, key, value, biases, keep, weights.astype(query.dtype), row_sum, out)


def _attention_bwd(residuals, d_out):
    """With E = exp(s - max), l = Σ_k E, P = E/l and o = (P∘M)·v (M the dropout keep mask, or 1):
    dv = (P∘M)ᵀ·do, dP = M∘(do·vᵀ) - rowsum(do∘o), ds = P∘dP. The 1/l is folded into the small `do`."""
    query, key, value, biases, keep, weights, row_sum, out = residuals
    dtype = query.dtype
    inv_sum = jnp.transpose(1.0 / row_sum, (0, 2, 1))[..., None]  # [batch, q, heads, 1]
    d_scaled = d_out.astype(F32) * inv_sum  # do / l, [batch, q, heads, kv]
    delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True) * inv_sum  # [batch, q, heads, 1]
    d_scaled_c = d_scaled.astype(dtype)
    kept = (weights.astype(F32) * keep[0]).astype(dtype) if keep else weights
    # The two products that contract over q are written with the small operand on the left (`[.., kv, q] ·
    # [.., q, k]`): a plain row-major matmul that XLA:CPU's fast dot path takes; the other order contracts the
    # big operand's leading dim, which falls back to a slow generic dot (and has no bfloat16 kernel at all).
    d_value = _dot(d_scaled_c, kept, (((1,), (2,)), ((0, 2), (0, 1))))  # [batch, heads, kv, k]
    d_kept = _dot(d_scaled_c, value.astype(dtype), (((3,), (3,)), ((0, 2), (0, 2))))  # [batch, heads, q, k]
    if keep:
        d_kept = d_kept * keep[0]
    d_logits = weights.astype(F32) * (d_kept - jnp.transpose(delta, (0, 2, 1, 3)))  # [batch, heads, q, k]
    d_logits_c = d_logits.astype(dtype)
    d_query = _dot(d_logits_c, key.astype(dtype), (((3,), (1,)), ((0, 1), (0, 2))))  # [batch, heads, q, kv]
    d_key = _dot(query, d_logits_c, (((1,), (2,)), ((0, 2), (0, 1))))  # [batch, heads, kv, k]
    d_biases = tuple(_reduce_to(d_logits, b) for b in biases)
    return (
        jnp.transpose(d_query, (0, 2, 1, 3)).astype(query.dtype),
        jnp.transpose(d_key, (0, 3, 1, 2)).astype(key.dtype),
        jnp.transpose(d_value, (0, 3, 1, 2)).astype(value.dtype),
        d_biases,
        tuple(jnp.zeros_like(k) for k in keep),
    )


def _reduce_to(x: Array, like: Array) -> Array:
    """Sums `x` over the axes `like` broadcasts along, keeping its shape and dtype."""
    axes = tuple(i for i, n in enumerate(like.shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).astype(like.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention_step(
    query: Array,  # [batch, q_len, heads, kv]
    key_t: Array,  # [batch, heads, kv, k_len], the cross-attention cache's transposed keys
    value: Array,  # [batch, heads, k_len, kv]
    biases: Sequence[Array],  # each float32, broadcastable to [batch, heads, q_len, k_len]
) -> Array:
    """Cross-attention of a cached decoding step: `dot_product_attention` with the keys stored transposed.

    The logits are a multiply-reduce over `kv`, vectorised along the contiguous `k_len` axis of the transposed
    keys; XLA:CPU runs it as one loop that reads the bfloat16 keys once (~2x the rate of its matmul paths for
    these matrix-vector shapes). Decoding only: no hand-written gradient (autodiff of these plain ops is exact).
    """
    dtype = query.dtype
    logits = jnp.sum(query.astype(F32)[:, :, :, :, None] * key_t.astype(F32)[:, None], axis=3)  # [b, q, h, k]
    logits = jnp.transpose(logits, (0, 2, 1, 3))  # [batch, heads, q, k]
    for bias in biases:
        logits = logits + bias
    weights = jnp.exp(logits - max_over(logits, keepdims=True))
    row_sum = sum_over(weights.astype(dtype).astype(F32))  # [batch, heads, q], as in dot_product_attention
    q_len = query.shape[1]
    if q_len == 1 and dtype != F32:  # the doubled row of dot_product_attention, for YNNPACK's bf16 dot
        weights = jnp.concatenate([weights, weights], axis=2)
    out = _dot(weights.astype(dtype), value.astype(dtype), (((3,), (2,)), ((0, 1), (0, 1))))[:, :, :q_len]
    out = out / row_sum[..., None]  # [batch, heads, q, kv]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(dtype)
