"""t5k.reductions: the two-stage reductions equal jnp's, on any axis, length and dtype, and XLA:CPU compiles them
without the reduce-window that would materialise their input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k import reductions


@pytest.mark.parametrize("shape,axis", [((4, 8, 40000), -1), ((3, 70000, 5), 1), ((1 << 20, 3), 0),
                                        ((2, 2, 520, 520), -1), ((24, 51200), -1)])
def test_two_stage_reductions_equal_jnp(shape, axis):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    assert x.size >= reductions.MIN_ELEMENTS and x.shape[axis] > reductions.BLOCK  # the two-stage path
    for ours, theirs in ((reductions.max_over, jnp.max), (reductions.min_over, jnp.min)):
        for keepdims in (False, True):
            got = jax.jit(lambda a: ours(a, axis, keepdims))(x)
            np.testing.assert_array_equal(got, theirs(x, axis=axis, keepdims=keepdims))  # exact
    np.testing.assert_allclose(jax.jit(lambda a: reductions.sum_over(a, axis))(x), jnp.sum(x, axis=axis),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(jax.jit(lambda a: reductions.mean_over(a, axis, True))(x),
                               jnp.mean(x, axis=axis, keepdims=True), rtol=1e-5, atol=1e-6)


def test_integer_and_boolean_inputs_and_small_inputs():
    ints = jnp.asarray(np.random.default_rng(1).integers(-1000, 1000, (16, 70001)), jnp.int32)
    np.testing.assert_array_equal(jax.jit(reductions.max_over)(ints), ints.max(axis=-1))
    np.testing.assert_array_equal(jax.jit(reductions.min_over)(ints), ints.min(axis=-1))
    np.testing.assert_array_equal(jax.jit(reductions.sum_over)(ints), ints.sum(axis=-1))
    flags = ints > 0
    np.testing.assert_array_equal(jax.jit(reductions.sum_over)(flags.astype(jnp.int32)), flags.sum(axis=-1))
    small = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(reductions.sum_over(small, 0), small.sum(axis=0))


def test_gradients_flow_through_the_two_stages():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4, 40000)), jnp.float32)

    def logsumexp(a):
        top = jax.lax.stop_gradient(reductions.max_over(a, keepdims=True))
        return jnp.sum(jnp.log(reductions.sum_over(jnp.exp(a - top))) + top[..., 0])

    np.testing.assert_allclose(jax.grad(logsumexp)(x), jax.nn.softmax(x, axis=-1), rtol=1e-4, atol=1e-9)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the reduce-window rewrite is XLA:CPU's")
def test_xla_cpu_fuses_the_reduction_with_its_producer():
    """What the module is for: a softmax's row max and row sum over 512 keys compile without reduce-window
    (which XLA:CPU never fuses, so its input would be written out first), while jnp's reductions do not."""
    logits = jax.ShapeDtypeStruct((8, 6, 512, 512), jnp.float32)
    bias = jax.ShapeDtypeStruct((1, 6, 512, 512), jnp.float32)

    def softmax_parts(maximum, total):
        def f(l, b):
            biased = l + b
            weights = jnp.exp(biased - maximum(biased))
            return weights.astype(jnp.bfloat16), total(weights.astype(jnp.bfloat16).astype(jnp.float32))
        return jax.jit(f).lower(logits, bias).compile().as_text()

    ours = softmax_parts(lambda a: reductions.max_over(a, keepdims=True), reductions.sum_over)
    plain = softmax_parts(lambda a: jnp.max(a, axis=-1, keepdims=True), lambda a: jnp.sum(a, axis=-1))
    assert "reduce-window" in plain
    assert "reduce-window" not in ours
