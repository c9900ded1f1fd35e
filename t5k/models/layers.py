"""Building blocks shared by the encoder-decoder and decoder-only models.

Conventions
- Parameters are float32 and created with logical axis names (`nn.with_logical_partitioning`), so the mesh
  layout is decided by the axis rules in gin, never here. Names used: vocab, embed, mlp, heads, kv,
  relpos_buckets, abspos_buckets (and `layers`, added by `nn.scan`).
- Activations are computed in the configured dtype (bfloat16 by default); normalisation statistics, softmax and
  logits in float32. Large activations are constrained with logical names (batch, length, embed, mlp, heads, kv)
  so that, under a mesh, XLA keeps the intended layout instead of guessing.
- Attention masks are boolean `[batch, 1, q_len, k_len]` and become an additive float32 bias once, at the stack
  level; every layer receives the bias, or a tuple of biases that attention adds inside its logits computation
  (so a padding bias and a position bias never materialise as one `[batch, heads, q, k]` array).
"""

import functools
import operator
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from t5k.models import kernels
from t5k.models.config import TransformerConfig
from t5k.reductions import mean_over

Array = jax.Array

# An additive bias this negative makes a softmax weight exactly 0 in float32, without the inf-inf NaNs that
# -inf produces on fully masked rows (padding queries).
MASK_BIAS = -1e10

# Logical axes of the cached keys and values of attention layers (`[batch, length, heads, kv]`).
CACHE_AXES = ("batch", "length", "heads", "kv")
# Cross-attention keys and values are cached in the layouts `kernels.cross_attention_step` reads directly.
CROSS_KEY_AXES = ("batch", "heads", "kv", "length")
CROSS_VALUE_AXES = ("batch", "heads", "length", "kv")


def constrain(x: Array, *logical_axes: Optional[str]) -> Array:
    """Sharding constraint by logical names; a no-op outside a mesh / axis-rules context."""
    return nn.with_logical_constraint(x, logical_axes)


def fan_in_init(scale: float = 1.0, distribution: str = "truncated_normal", num_input_axes: int = 1):
    """Variance-scaling initializer whose fan-in is the product of the leading `num_input_axes` dims.

    jax's default assumes 2-D kernels; ours are `[embed, heads, kv]` or `[heads, kv, embed]`, where the fan-in
    is embed or heads*kv respectively.
    """

    def init(key, shape, dtype=jnp.float32):
        inner = nn.initializers.variance_scaling(
            scale,
            "fan_in",
            distribution,
            in_axis=tuple(range(num_input_axes)),
            out_axis=tuple(range(num_input_axes, len(shape))),
        )
        return inner(key, shape, dtype)

    return init


class DenseGeneral(nn.Module):
    """A linear map contracting the trailing `in_features` dims of the input with a `[*in, *out]` kernel.

    `kernel_axes` names every kernel dimension (input dims first). No bias unless `use_bias`. The input
    shape is declared up front (rather than inferred at the first call) so that a parent can read the kernel
    without calling the layer, which is what `fused_dense` needs.

    With `lora_rank > 0` the layer also holds a LoRA adapter (t5k.models.lora): `lora_a [*in, rank]` and
    `lora_b [rank, *out]`, and computes `x @ kernel + lora_scale * (x @ lora_a) @ lora_b`. The product goes
    through the rank, never through a `[*in, *out]` update, so training the adapter costs two thin matmuls.
    """

    in_features: Tuple[int, ...]
    out_features: Tuple[int, ...]
    kernel_axes: Tuple[str, ...]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32  # compute dtype of the product
    kernel_init: Optional[Callable] = None
    output_dtype: Optional[jnp.dtype] = None  # None: `dtype`; float32 for logits computed in bfloat16
    lora_rank: int = 0
    lora_scale: float = 0.0

    def setup(self):
        kernel_shape = tuple(self.in_features) + tuple(self.out_features)
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}")
        n_in = len(self.in_features)
        init = self.kernel_init or fan_in_init(num_input_axes=n_in)
        self.kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes), kernel_shape, jnp.float32)
        if self.use_bias:
            bias_axes = self.kernel_axes[n_in:]
            self.bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), tuple(self.out_features), jnp.float32
            )
        if self.lora_rank:
            # A like a kernel of its fan-in, B zero: a fresh adapter adds exactly 0 (LoRA's initialisation).
            a_axes = self.kernel_axes[:n_in] + ("lora",)
            b_axes = ("lora",) + self.kernel_axes[n_in:]
            self.lora_a = self.param("lora_a", nn.with_logical_partitioning(fan_in_init(num_input_axes=n_in), a_axes),
                                     tuple(self.in_features) + (self.lora_rank,), jnp.float32)
            self.lora_b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, b_axes),
                                     (self.lora_rank,) + tuple(self.out_features), jnp.float32)

    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_features)
        if x.shape[x.ndim - n_in:] != tuple(self.in_features):
            raise ValueError(f"{self.name}: expected input [..., {self.in_features}], got {x.shape}")
        y = kernels.dense(x, self.kernel, n_in, self.dtype)  # float32
        if self.use_bias:
            y = y + self.bias
        if self.lora_rank:
            y = y + self.lora_update(x)
        return y.astype(self.output_dtype or self.dtype)

    def lora_update(self, x: Array) -> Array:
        """`lora_scale * (x @ lora_a) @ lora_b`: `[..., *in] -> [..., *out]` float32."""
        low = kernels.dense(x, self.lora_a, len(self.in_features), self.dtype).astype(self.dtype)  # [..., rank]
        return self.lora_scale * kernels.dense(low, self.lora_b, 1, self.dtype)


def fused_dense(modules: Sequence[DenseGeneral], x: Array) -> Tuple[Array, ...]:
    """Applies several DenseGeneral maps of the same input (one input dim each) as one matmul.

    The kernels stay separate parameters (HF/t5x-compatible names); only the computation is fused over their
    concatenation. On CPU one wide matmul runs markedly faster than several narrow ones, and concatenating
    the weights is cheap next to the activations. Results equal the unfused ones (same contraction and dtype).
    LoRA adapters, where a module has one, add their low-rank updates to its part after the split.
    """
    dtype = modules[0].dtype
    out_shapes = [tuple(m.out_features) for m in modules]
    kernel = concatenate_columns([m.kernel.reshape(m.kernel.shape[0], -1) for m in modules])  # [in, sum(out)]
    y = kernels.dense(x, kernel, 1, dtype)  # [..., sum(out)] float32
    if modules[0].use_bias:
        y = y + jnp.concatenate([m.bias.reshape(-1) for m in modules])
    adapted = any(m.lora_rank for m in modules)
    if not adapted:
        y = y.astype(dtype)
    sizes = [int(np.prod(s)) for s in out_shapes]
    parts = [p.reshape(p.shape[:-1] + s) for p, s in zip(jnp.split(y, np.cumsum(sizes)[:-1], axis=-1), out_shapes)]
    if adapted:
        parts = [(p + m.lora_update(x) if m.lora_rank else p).astype(dtype) for p, m in zip(parts, modules)]
    return tuple(parts)


def concatenate_columns(kernels: Sequence[Array]) -> Array:
    """`[in, out_i]` kernels -> `[in, sum(out_i)]`, without XLA:CPU's float32 detour for 16-bit floats.

    XLA:CPU widens a bfloat16 concatenate to float32 (convert both inputs, concatenate, convert back): ~150 ms per
    ct5_small encoder call once the kernels are bfloat16 (decoding casts them before use). Concatenating the
    same bits as uint16 is exact and native. The gradient splits the cotangent back (a custom VJP, since
    integer bitcasts carry no gradient). Float32 kernels (training) take the plain concatenate.
    """
    if jnp.dtype(kernels[0].dtype).itemsize != 2 or not jnp.issubdtype(kernels[0].dtype, jnp.floating):
        return jnp.concatenate(kernels, axis=1)
    return _concatenate_16bit(tuple(kernels))


@jax.custom_vjp
def _concatenate_16bit(kernels):
    dtype = kernels[0].dtype
    bits = jnp.concatenate([lax.bitcast_convert_type(k, jnp.uint16) for k in kernels], axis=1)
    return lax.bitcast_convert_type(bits, dtype)


def _concatenate_16bit_fwd(kernels):
    return _concatenate_16bit(kernels), tuple(k.shape[1] for k in kernels)


def _concatenate_16bit_bwd(widths, g):
    return (tuple(jnp.split(g, np.cumsum(widths)[:-1], axis=1)),)


_concatenate_16bit.defvjp(_concatenate_16bit_fwd, _concatenate_16bit_bwd)


def lora_fields(config: TransformerConfig, projection: str) -> dict:
    """DenseGeneral's LoRA fields for the projection named `projection` (rank 0 when it is not adapted)."""
    return {"lora_rank": config.lora_rank_of(projection), "lora_scale": config.lora_scale}


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(mean_over(jnp.square(x32), keepdims=True) + self.epsilon)
        return (x32 * scale).astype(self.dtype)


class LayerNorm(nn.Module):
    """GPT-style layer norm with scale and bias; statistics in float32."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), features, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), features, jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = mean_over(x32, keepdims=True)
        var = mean_over(jnp.square(x32 - mean), keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


def make_norm(config: TransformerConfig, name: str) -> nn.Module:
    cls = RMSNorm if config.norm == "rms" else LayerNorm
    return cls(epsilon=config.norm_epsilon, dtype=config.compute_dtype, name=name)


class Embed(nn.Module):
    """Token (or absolute position) embedding table `[num_embeddings, embed]`; `attend` gives tied logits."""

    num_embeddings: int
    features: int
    table_axes: Tuple[str, str] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, self.table_axes),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids: Array) -> Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{self.name}: embedding lookup needs integer ids, got {ids.dtype}")
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)  # [..., embed]

    def attend(self, x: Array) -> Array:
        """`x @ embedding.T`, products in `dtype`, float32 result: `[..., embed] -> [..., num_embeddings]`."""
        return kernels.dense_transposed(x, self.embedding, self.dtype)


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """Maps `memory_position - query_position` to T5's log-spaced buckets.

    Half the buckets (per direction when bidirectional) hold exact small distances; the rest cover distances up
    to `max_distance` logarithmically, and everything farther shares the last bucket. In the causal case,
    future positions (positive offsets) fall in bucket 0 together with offset 0 — they are masked anyway.
    """
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # n is at least max_exact wherever the log value is used; clamping keeps log(0) out of the graph.
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    val_if_large = max_exact + (
        jnp.log(n_large / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """T5 relative position bias: one `[heads, buckets]` table per stack, shared by all of its layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """`[q_len]`, `[k_len]` int positions -> float32 bias `[1, heads, q_len, k_len]`.

        Cached decoding passes per-row query positions `[batch, q_len]` and gets `[batch, heads, q_len, k_len]`.
        """
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        relative = key_positions[None, :] - query_positions[..., :, None]  # [(batch,) q, k]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = bucket_lookup(table, buckets)  # [heads, (batch,) q, k]
        return bias[None] if query_positions.ndim == 1 else jnp.moveaxis(bias, 0, 1)


# The one-hot matrix of the bucket gradient is built only up to this many elements (64 MB in float32: 512 x 512
# positions x 32 buckets is 8.4M); longer sequences scatter-add instead.
ONE_HOT_GRAD_LIMIT = 1 << 24


@jax.custom_vjp
def bucket_lookup(table: Array, buckets: Array) -> Array:
    """`table[:, buckets]`: `[heads, n]` gathered by int `[...]` -> `[heads, ...]`.

    The gradient is written by hand. Autodiff's (a scatter-add of the cotangent transposed to `[..., heads]`)
    lets XLA fuse that transpose with the cotangent's producers -- for the encoder's shared bias, the batch sums
    of every layer's attention-logit gradients -- into one loop that reads all of them in transposed order:
    ~0.5 s of a 5 s bfloat16 ct5_small step on CPU. Here the table gradient is a matmul of the cotangent in its
    own `[heads, positions]` layout with the one-hot bucket matrix `[positions, n]` (exact: each position adds
    to one bucket), falling back to a scatter-add when the one-hot matrix would exceed `ONE_HOT_GRAD_LIMIT`.
    """
    return jnp.take(table, buckets, axis=1)


def _bucket_lookup_fwd(table, buckets):
    return bucket_lookup(table, buckets), (buckets, table.shape[1])


def _bucket_lookup_bwd(residuals, d_bias):
    buckets, num_buckets = residuals
    flat = d_bias.reshape(d_bias.shape[0], -1)  # [heads, positions]
    ids = buckets.reshape(-1)  # [positions]
    if ids.size * num_buckets <= ONE_HOT_GRAD_LIMIT:
        one_hot = jax.nn.one_hot(ids, num_buckets, dtype=flat.dtype)  # [positions, n]
        d_table = lax.dot_general(flat, one_hot, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
    else:
        d_table = jax.ops.segment_sum(flat.T, ids, num_segments=num_buckets).T
    return d_table, np.zeros(buckets.shape, jax.dtypes.float0)


bucket_lookup.defvjp(_bucket_lookup_fwd, _bucket_lookup_bwd)


def rotary_embedding(x: Array, positions: Array, base: float) -> Array:
    """Rotary position embedding (rotate-half form) of `x: [batch, length, heads, head_dim]`.

    `positions: [batch, length]`. Computed in float32 and cast back.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))  # [head_dim/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class KeyValueCache(nn.Module):
    """One attention layer's keys and values in the "cache" collection.

    `length=L` (self-attention): every call writes `project()`'s `[batch, q_len, heads, kv]` keys and values at
    `positions` `[batch, q_len]` (slot p holds position p) and returns all L slots. `length=None`
    (cross-attention): `project()` runs only on the call that creates the cache; its keys and values are stored
    as `[batch, heads, kv, length]` and `[batch, heads, length, kv]` (CROSS_KEY_AXES, CROSS_VALUE_AXES: the
    layouts `kernels.cross_attention_step` reads without a copy) and returned so by every call.
    """

    length: Optional[int] = None

    @nn.compact
    def __call__(self, project: Callable[[], Tuple[Array, Array]], positions: Optional[Array] = None):
        init = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
        if self.length is None:
            if self.has_variable("cache", "cached_key"):
                return self.variable("cache", "cached_key").value, self.variable("cache", "cached_value").value
            key, value = project()
            key = jnp.transpose(key, (0, 2, 3, 1))  # [batch, heads, kv, length]
            value = jnp.transpose(value, (0, 2, 1, 3))  # [batch, heads, length, kv]
            key_init = nn.with_logical_partitioning(jnp.zeros, CROSS_KEY_AXES)
            value_init = nn.with_logical_partitioning(jnp.zeros, CROSS_VALUE_AXES)
            self.variable("cache", "cached_key", key_init, key.shape, key.dtype).value = key
            self.variable("cache", "cached_value", value_init, value.shape, value.dtype).value = value
            return key, value
        key, value = project()
        batch, _, heads, head_dim = key.shape
        shape = (batch, self.length, heads, head_dim)
        cached_key = self.variable("cache", "cached_key", init, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", init, shape, value.dtype)
        if cached_key.value.shape != shape:
            raise ValueError(f"{self.name}: the cache holds {cached_key.value.shape}, this call needs {shape} "
                             "(a cache made for another batch size or decode_length)")
        cached_key.value = constrain(_write_slots(cached_key.value, key, positions), *CACHE_AXES)
        cached_value.value = constrain(_write_slots(cached_value.value, value, positions), *CACHE_AXES)
        return cached_key.value, cached_value.value  # [batch, length, heads, kv]


def _write_slots(cache: Array, new: Array, positions: Array) -> Array:
    """`cache [batch, L, ...]` with `new [batch, q_len, ...]` written at slots `positions [batch, q_len]`.

    Positions past the last slot are dropped. A one-token step (q_len = 1, every decoding step) selects
    instead of scattering: XLA:CPU widens a bfloat16 scatter to float32 and back, three passes over the cache
    per layer and step, where the select is one.
    """
    if new.shape[1] == 1:
        hit = jnp.arange(cache.shape[1])[None, :] == positions  # [batch, L]
        hit = hit.reshape(hit.shape + (1,) * (cache.ndim - 2))  # [batch, L, 1, 1]
        return jnp.where(hit, new.astype(cache.dtype), cache)
    rows = jnp.arange(cache.shape[0])[:, None]  # [batch, 1]
    return cache.at[rows, positions].set(new)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with an additive float32 bias (masks and position biases).

    T5 folds the 1/sqrt(head_dim) logit scaling into the query initializer (`scale_attention_logits=False`);
    GPT scales at run time.

    With `decode=True` (cached decoding) keys and values live in the "cache" collection. Self-attention
    writes this call's keys/values at their positions (`key_positions`, slot p holds position p) into
    `cached_key`/`cached_value` `[batch, decode_length, heads, kv]` and attends over the whole cache; the
    caller's bias masks slots after each query. Cross-attention projects the encoder output once, on the call
    that creates the cache, and reads it back on every later step.
    """

    config: TransformerConfig
    is_self_attention: bool = True
    decode: bool = False
    decode_length: Optional[int] = None  # cache length (self-attention with decode=True)

    def setup(self):
        cfg = self.config
        dense = functools.partial(
            DenseGeneral,
            in_features=(cfg.d_model,),
            out_features=(cfg.num_heads, cfg.head_dim),
            kernel_axes=("embed", "heads", "kv"),
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
        )
        query_scale = 1.0 if cfg.scale_attention_logits else 1.0 / cfg.head_dim
        self.query = dense(kernel_init=fan_in_init(scale=query_scale), **lora_fields(cfg, "query"), name="query")
        self.key = dense(**lora_fields(cfg, "key"), name="key")
        self.value = dense(**lora_fields(cfg, "value"), name="value")
        self.out = DenseGeneral(
            in_features=(cfg.num_heads, cfg.head_dim),
            out_features=(cfg.d_model,),
            kernel_axes=("heads", "kv", "embed"),
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            **lora_fields(cfg, "out"),
            name="out",
        )
        if self.decode:
            if self.is_self_attention and self.decode_length is None:
                raise ValueError(f"{self.name}: cached self-attention needs decode_length")
            self.kv_cache = KeyValueCache(self.decode_length if self.is_self_attention else None, name="kv_cache")

    def project_kv(self, inputs_kv: Array) -> Tuple[Array, Array]:
        if self.config.fuse_projections:
            return fused_dense([self.key, self.value], inputs_kv)
        return self.key(inputs_kv), self.value(inputs_kv)

    def project_qkv(self, inputs_q: Array, inputs_kv: Array):
        cfg = self.config
        if cfg.fuse_projections and self.is_self_attention:
            return fused_dense([self.query, self.key, self.value], inputs_q)
        if cfg.fuse_projections:
            return (self.query(inputs_q),) + fused_dense([self.key, self.value], inputs_kv)
        return self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)

    def _scale(self, query: Array) -> Array:
        """GPT's run-time 1/sqrt(head_dim) logit scaling (T5 folds it into the query initializer)."""
        if not self.config.scale_attention_logits:
            return query
        return query * jnp.asarray(self.config.head_dim**-0.5, query.dtype)

    def __call__(
        self,
        inputs_q: Array,  # [batch, q_len, embed]
        inputs_kv: Array,  # [batch, k_len, embed]
        bias,  # float32 [batch or 1, heads or 1, q_len, k_len], or a tuple of such (summed in the logits)
        deterministic: bool = True,
        query_positions: Optional[Array] = None,  # [batch, q_len], rotary only
        key_positions: Optional[Array] = None,  # [batch, k_len], rotary only
    ) -> Array:
        cfg = self.config
        biases = bias if isinstance(bias, tuple) else (bias,)
        if self.decode and not self.is_self_attention:
            query = self._scale(constrain(self.query(inputs_q), "batch", "length", "heads", "kv"))
            key_t, value = self.kv_cache(lambda: self.project_kv(inputs_kv))  # [b, heads, kv, len], [b, heads, len, kv]
            out = kernels.cross_attention_step(query, key_t, value, biases)
            return self.out(constrain(out, "batch", "length", "heads", "kv"))
        query, key, value = self.project_qkv(inputs_q, inputs_kv)  # [batch, len, heads, kv]
        query = constrain(query, "batch", "length", "heads", "kv")
        key = constrain(key, "batch", "length", "heads", "kv")
        value = constrain(value, "batch", "length", "heads", "kv")
        if cfg.position_embedding == "rotary":
            query = rotary_embedding(query, query_positions, cfg.rotary_base)
            key = rotary_embedding(key, key_positions, cfg.rotary_base)
        if self.decode:
            if key_positions is None:
                raise ValueError(f"{self.name}: cached self-attention needs the query/key positions")
            key, value = self.kv_cache(lambda: (key, value), key_positions)
        query = self._scale(query)
        keep = None
        if not deterministic and cfg.dropout_rate > 0.0:
            keep_rate = 1.0 - cfg.dropout_rate
            shape = (query.shape[0], cfg.num_heads, query.shape[1], key.shape[1])
            keep = jax.random.bernoulli(self.make_rng("dropout"), keep_rate, shape).astype(jnp.float32) / keep_rate
        out = kernels.dot_product_attention(query, key, value.astype(query.dtype), biases, keep)
        out = constrain(out, "batch", "length", "heads", "kv")
        return self.out(out)  # [batch, q_len, embed]


def activation_fn(name: str) -> Callable[[Array], Array]:
    return {
        "gelu": functools.partial(jax.nn.gelu, approximate=True),  # T5.1.1 / GPT-2 'gelu_new'
        "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "linear": lambda x: x,
    }[name]


class MlpBlock(nn.Module):
    """Transformer MLP: `wo(prod_i act_i(wi_i x))`; two activations ('gelu', 'linear') make gated GELU."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        names = ["wi"] if len(cfg.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
        self.wi = [
            DenseGeneral((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                         **lora_fields(cfg, n), name=n)
            for n in names
        ]
        self.wo = DenseGeneral((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), use_bias=cfg.use_bias,
                               dtype=cfg.compute_dtype, **lora_fields(cfg, "wo"), name="wo")
        self.dropout = nn.Dropout(rate=cfg.dropout_rate)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        if cfg.fuse_projections and len(self.wi) > 1:
            hidden = fused_dense(self.wi, x)
        else:
            hidden = [wi(x) for wi in self.wi]
        h = functools.reduce(operator.mul, [activation_fn(a)(h) for a, h in zip(cfg.mlp_activations, hidden)])
        h = constrain(h, "batch", "length", "mlp")  # [batch, length, mlp]
        h = self.dropout(h, deterministic=deterministic)
        return self.wo(h)  # [batch, length, embed]


# ----------------------------------------------------------------------------------------------------------
# Masks. All return boolean [batch, 1, q_len, k_len]; `mask_to_bias` turns them into the additive float32 bias.


def key_padding_mask(key_tokens: Array) -> Array:
    """`[batch, 1, 1, k_len]`: True on real keys (id > 0).

    Only keys are masked: a padded query's output is never read (cross-attention masks padded encoder keys,
    the loss masks padded targets), and masking keys alone keeps the mask `k_len` small instead of `q*k`.
    """
    return (key_tokens > 0)[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """True where query and key belong to the same packed example: `[batch, 1, q_len, k_len]`."""
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
    """`[1, 1, length, length]` lower-triangular."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def prefix_lm_mask(causal_attention: Array) -> Array:
    """Causal mask opened up to full attention among prefix positions (`causal_attention` = 1 on the prefix)."""
    prefix = causal_attention.astype(bool)
    bidirectional = (prefix[:, :, None] & prefix[:, None, :])[:, None]
    return causal_mask(causal_attention.shape[1]) | bidirectional


def cached_causal_mask(positions: Array, decode_length: int) -> Array:
    """`[batch, 1, q_len, decode_length]`: a query at position p sees the cache slots 0..p (slot i holds position i).

    Slots after p may hold stale keys (a longer row's prompt padding, or nothing yet); they stay masked until
    the step that writes position p overwrites them.
    """
    return (jnp.arange(decode_length)[None, None, :] <= positions[:, :, None])[:, None]


def cached_prefix_mask(causal_attention: Array, decode_length: int) -> Array:
    """`[batch, 1, q_len, decode_length]`: True where a prefix query meets a prefix slot (a prefix LM's prefill).

    `causal_attention` `[batch, q_len]` is 1 on the queries of the prefix, a leading block of positions 0..n-1
    (seqio's PrefixLM layout), so slot i (position i) belongs to the prefix exactly when i < n.
    """
    prefix = causal_attention.astype(bool)  # [batch, q]
    prefix_length = jnp.sum(prefix, axis=1)  # [batch]
    slot_in_prefix = jnp.arange(decode_length)[None, :] < prefix_length[:, None]  # [batch, decode_length]
    return (prefix[:, :, None] & slot_in_prefix[:, None, :])[:, None]


def mask_to_bias(mask: Array) -> Array:
    return jnp.where(mask, 0.0, MASK_BIAS).astype(jnp.float32)
