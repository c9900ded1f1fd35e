"""Hand-written gradients in t5k.models.kernels against autodiff of straightforward reference code."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k.models import EncoderDecoder, TransformerConfig, kernels


def _reference_attention(query, key, value, biases, keep=None):
    """Plain float32 softmax attention, differentiated by JAX."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    for bias in biases:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = weights * keep
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _attention_inputs(seed=0, batch=2, q_len=5, k_len=7, heads=3, head_dim=4):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, n, heads, head_dim)), jnp.float32) for n in (q_len, k_len, k_len))
    padding = np.zeros((batch, 1, 1, k_len), np.float32)
    padding[1, ..., -2:] = -1e10  # the second row's last two keys are padding
    position = jnp.asarray(rng.standard_normal((1, heads, q_len, k_len)), jnp.float32)
    keep = jnp.asarray(rng.binomial(1, 0.8, (batch, heads, q_len, k_len)) / 0.8, jnp.float32)
    return q, k, v, (jnp.asarray(padding), position), keep


@pytest.mark.parametrize("with_dropout", [False, True])
def test_attention_values_and_gradients_match_autodiff(with_dropout):
    q, k, v, biases, keep = _attention_inputs()
    keep = keep if with_dropout else None
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(fn, q, k, v, position):
        return jnp.sum(fn(q, k, v, (biases[0], position), keep) * cotangent)

    ours = jax.value_and_grad(lambda *a: loss(kernels.dot_product_attention, *a), argnums=(0, 1, 2, 3))
    ref = jax.value_and_grad(lambda *a: loss(_reference_attention, *a), argnums=(0, 1, 2, 3))
    (value, grads), (ref_value, ref_grads) = ours(q, k, v, biases[1]), ref(q, k, v, biases[1])
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("query", "key", "value", "position bias"), grads, ref_grads):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_bfloat16_attention_stays_close_to_float32():
    q, k, v, biases, _ = _attention_inputs(seed=2)
    out = kernels.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), biases)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference_attention(q, k, v, biases), atol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_match_autodiff(dtype):
    """x [2, 3, 4, 5] · kernel [4, 5, 6]: float32 equals autodiff exactly; bfloat16 within its rounding, and the
    kernel gradient is float32 (never rounded to bfloat16)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 5, 6)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)

    def loss(x, kernel):
        return jnp.sum(kernels.dense(x, kernel, 2, dtype) * cotangent)

    def ref_loss(x, kernel):
        return jnp.sum(jnp.einsum("abij,ijo->abo", x, kernel) * cotangent)

    grads, ref_grads = jax.grad(loss, (0, 1))(x, kernel), jax.grad(ref_loss, (0, 1))(x, kernel)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=1e-1)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_output_projection_gradients_match_autodiff_and_run_on_cpu(dtype):
    """x [2, 3, 8] · table [40, 8]ᵀ (Embed.attend): float32 equals autodiff, bfloat16 within its rounding, the table
    gradient float32 and `[vocab, embed]`. The compiled bfloat16 gradient runs on XLA:CPU, which `dense(x, table.T)`
    did not (a transposed-output bf16 dot: DotThunk unimplemented)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((40, 8)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)

    def loss(x, table):
        return jnp.sum(kernels.dense_transposed(x, table, dtype) * cotangent)

    def ref_loss(x, table):
        return jnp.sum(jnp.einsum("abe,ve->abv", x, table) * cotangent)

    grads = jax.jit(jax.grad(loss, (0, 1)))(x, table)
    ref_grads = jax.grad(ref_loss, (0, 1))(x, table)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=1e-1)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.float32 and g.shape == r.shape
        np.testing.assert_allclose(g, r, **tol)


def test_every_matmul_of_a_bfloat16_train_step_is_bf16_by_bf16_to_f32():
    """The design property of kernels.py: forward and backward products all take the bfloat16 fast path."""
    config = TransformerConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                               num_decoder_layers=1, dtype="bfloat16")
    model = EncoderDecoder(config)
    enc, dec = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 4), jnp.int32)
    params = jax.eval_shape(lambda r: nn.unbox(model.init(r, enc, dec)["params"]), jax.random.PRNGKey(0))

    def loss(p):
        return jnp.mean(model.apply({"params": p}, enc, dec))

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    signatures = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", text)
    assert len(signatures) >= 3 * 10  # every projection, attention product and the logits, forward and backward
    # Except the relative-position tables' gradients (one per stack, `layers.bucket_lookup`): float32 cotangent x
    # one-hot buckets, a few MFLOP kept in float32 on purpose.
    table_grad = f"tensor<{config.num_heads}x{config.relative_attention_num_buckets}xf32>"
    assert sum(out == table_grad for _, _, out in signatures) == 2
    for lhs, rhs, out in signatures:
        if out != table_grad:
            assert ("bf16" in lhs, "bf16" in rhs, "f32" in out) == (True, True, True), (lhs, rhs, out)


@pytest.mark.parametrize("tied", [False, True])
def test_a_bfloat16_decoder_only_train_step_runs_on_cpu(tied):
    """Compiled and executed, not only lowered: XLA:CPU refuses some bf16 dot layouts at run time (a tied output
    projection written as `dense(x, table.T)` did), which the lowered text above cannot show."""
    from t5k.models import DecoderOnly

    config = TransformerConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=0,
                               num_decoder_layers=2, dtype="bfloat16", norm="layer", use_bias=True,
                               position_embedding="absolute", max_length=16, tie_embeddings=tied,
                               mlp_activations=("gelu",), scan_layers=True)
    model = DecoderOnly(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 64, (2, 8)), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens))

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves) and any(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


def test_reductions_stay_out_of_ynnpack():
    """`import t5k` keeps YNNPACK for dots only (t5k/xla_cpu.py): a batch-axis sum compiles to XLA's own loop
    fusion, a matmul still to a YNNPACK fusion."""
    x = jnp.ones((8, 6, 64, 64), jnp.float32)
    reduce_hlo = jax.jit(lambda x: (x * 2).sum(0)).lower(x).compile().as_text()
    dot_hlo = jax.jit(lambda a: a @ a).lower(jnp.ones((256, 256), jnp.float32)).compile().as_text()
    assert "__ynn_fusion" not in reduce_hlo
    assert "__ynn_fusion" in dot_hlo


def test_one_query_row_in_bfloat16_equals_the_same_row_among_others():
    """A single bfloat16 query row (a decoding step; computed as a doubled row so XLA:CPU keeps the products in
    bfloat16) gives what that row gives inside a longer query, and its gradients match float32 autodiff."""
    q, k, v, biases, _ = _attention_inputs(seed=4, q_len=3, k_len=9)
    padding = biases[0]
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    full = kernels.dot_product_attention(bf[0], bf[1], bf[2], (padding,))  # [batch, 3, heads, kv]
    for row in range(3):
        one = kernels.dot_product_attention(bf[0][:, row:row + 1], bf[1], bf[2], (padding,))
        assert one.shape == (2, 1, 3, 4) and one.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(full[:, row:row + 1], np.float32),
                                   atol=1e-2, rtol=1e-2)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal((2, 1, 3, 4)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, (padding,)).astype(jnp.float32) * cotangent)

    grads = jax.grad(lambda *a: loss(kernels.dot_product_attention, *a), argnums=(0, 1, 2))(
        bf[0][:, :1], bf[1], bf[2])
    ref = jax.grad(lambda *a: loss(_reference_attention, *a), argnums=(0, 1, 2))(q[:, :1], k, v)
    for name, g, r in zip(("query", "key", "value"), grads, ref):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=5e-2, rtol=5e-2, err_msg=name)


def test_bfloat16_kernel_concatenation_is_exact_without_float32_converts():
    """Fused projections concatenate bfloat16 kernels (decoding casts them) without XLA:CPU's float32 round trip;
    the values are the plain concatenation and the gradient is the cotangent split back."""
    from t5k.models import layers

    rng = np.random.default_rng(6)
    a, b = (jnp.asarray(rng.standard_normal((16, n)), jnp.bfloat16) for n in (8, 24))
    got = layers.concatenate_columns([a, b])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jnp.concatenate([a, b], 1), np.float32))
    hlo = jax.jit(lambda a, b: layers.concatenate_columns([a, b])).lower(a, b).compile().as_text()
    assert not re.search(r"f32\[", hlo), "a float32 detour in the bfloat16 concatenation"
    weights = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    grads = jax.grad(lambda a, b: jnp.sum(layers.concatenate_columns([a, b]).astype(jnp.float32) * weights),
                     argnums=(0, 1))(a, b)
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32), np.asarray(weights[:, :8].astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(grads[1], np.float32), np.asarray(weights[:, 8:].astype(jnp.bfloat16), np.float32))
    f32 = [x.astype(jnp.float32) for x in (a, b)]
    np.testing.assert_array_equal(layers.concatenate_columns(f32), jnp.concatenate(f32, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_attention_step_equals_attention_over_the_same_cache(dtype):
    """The decoding step's cross-attention over transposed cached keys/values equals `dot_product_attention` over
    the usual layouts (one query row, and several), with the padding bias."""
    for q_len in (1, 3):
        q, k, v, biases, _ = _attention_inputs(seed=7, q_len=q_len, k_len=9)
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        expected = kernels.dot_product_attention(q, k, v, (biases[0],))
        got = kernels.cross_attention_step(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)),
                                           (biases[0],))
        assert got.shape == expected.shape and got.dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)
