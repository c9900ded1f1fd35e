"""Adafactor against a hand-written reference of the paper's update (T5 settings), its factoring by logical axis
names (scanned == unrolled), bf16 state, and the schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5k import optim, trainer
from t5k.adafactor import choose_factoring
from t5k.models import EncoderDecoder, TransformerConfig


def reference_adafactor(param, grads, lr, factored, decay=0.8, clip=1.0, eps1=1e-30, eps2=1e-3, momentum=None):
    """Shazeer & Stern (2018), Algorithms 4/5 with T5's settings, written from the paper in numpy (float64),
    for a matrix `[rows, columns]`; `momentum` adds the paper's first moment of the clipped update."""
    w = np.asarray(param, np.float64)
    row = col = v = m = None
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        beta = 1.0 - t ** -decay  # 0 at t=1: the first second-moment estimate is the gradient's own
        g2 = g * g + eps1
        if factored:
            row = (1 - beta) * g2.mean(axis=1) if row is None else beta * row + (1 - beta) * g2.mean(axis=1)
            col = (1 - beta) * g2.mean(axis=0) if col is None else beta * col + (1 - beta) * g2.mean(axis=0)
            v_hat = np.outer(row, col) / row.mean()
        else:
            v = (1 - beta) * g2 if v is None else beta * v + (1 - beta) * g2
            v_hat = v
        u = g / np.sqrt(v_hat)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)  # update clipping
        if momentum is not None:
            m = (1 - momentum) * u if m is None else momentum * m + (1 - momentum) * u
            u = m
        scale = max(np.sqrt(np.mean(w * w)), eps2)  # relative step size: multiply by the parameter scale
        w = w - lr * scale * u
    return w


def _run(param, grads, lr, names=None, **kwargs):
    """Our Adafactor on one parameter `w` (logical axis `names`, or unnamed) over the gradient sequence."""
    axes = None if names is None else {"w": names}
    tx = optim.adafactor(learning_rate=optim.constant_schedule(lr), param_axes=axes, **kwargs)
    p = {"w": jnp.asarray(param, jnp.float32)}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, updates)
    return np.asarray(p["w"]), state


def test_factored_update_matches_reference():
    rng = np.random.default_rng(0)
    param = rng.normal(size=(256, 160))
    grads = [rng.normal(size=param.shape) * s for s in (1.0, 0.1, 3.0)]
    ours, state = _run(param, grads, lr=0.01, names=("embed", "mlp"))
    assert state.v_row["w"].shape == (256, 1) and state.v_col["w"].shape == (1, 160)  # really factored
    np.testing.assert_allclose(ours, reference_adafactor(param, grads, 0.01, factored=True), rtol=2e-5, atol=1e-6)


def test_unfactored_update_matches_reference():
    rng = np.random.default_rng(1)
    param = rng.normal(size=(4, 100))  # 4 < min_dim_size_to_factor=128: full second moments
    grads = [rng.normal(size=param.shape) for _ in range(3)]
    ours, state = _run(param, grads, lr=0.05)
    assert state.v["w"].shape == (4, 100)
    np.testing.assert_allclose(ours, reference_adafactor(param, grads, 0.05, factored=False), rtol=2e-5, atol=1e-6)


def test_attention_kernel_is_factored_as_embed_by_heads_times_kv():
    """`[embed, heads, kv]` is the matrix `embed × (heads·kv)`: the same update as the reference on the reshape."""
    rng = np.random.default_rng(2)
    param = rng.normal(size=(130, 4, 40))
    grads = [rng.normal(size=param.shape) * s for s in (1.0, 2.0, 0.5)]
    ours, state = _run(param, grads, lr=0.01, names=("embed", "heads", "kv"))
    assert state.v_row["w"].shape == (130, 1, 1) and state.v_col["w"].shape == (1, 4, 40)
    expected = reference_adafactor(param.reshape(130, 160), [g.reshape(130, 160) for g in grads], 0.01,
                                   factored=True)
    np.testing.assert_allclose(ours.reshape(130, 160), expected, rtol=2e-5, atol=1e-6)


def test_momentum_matches_reference():
    rng = np.random.default_rng(3)
    param = rng.normal(size=(128, 136))
    grads = [rng.normal(size=param.shape) for _ in range(3)]
    ours, _ = _run(param, grads, lr=0.01, names=("mlp", "embed"), momentum=0.9)
    expected = reference_adafactor(param.T, [g.T for g in grads], 0.01, factored=True, momentum=0.9).T
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape,names,batch,rows,columns,factored", [
    ((4, 128, 512), ("layers", "embed", "mlp"), (0,), (1,), (2,), True),
    ((4, 4, 32, 128), ("layers", "heads", "kv", "embed"), (0,), (3,), (1, 2), True),
    ((51200, 128), ("vocab", "embed"), (), (1,), (0,), True),
    ((4, 128), ("layers", "embed"), (0,), (1,), (), False),  # a scanned norm scale: per-layer full moments
    ((4, 32), ("heads", "relpos_buckets"), (), (0, 1), (), False),
    ((128, 64), ("embed", "mlp"), (), (0, 1), (), False),  # 64 < min_dim_size_to_factor
    ((256, 4, 16), None, (), (0, 1, 2), (), False),  # unnamed and not 2-D: never guessed
])
def test_factoring_follows_logical_names(shape, names, batch, rows, columns, factored):
    plan = choose_factoring(shape, names, min_dim_size_to_factor=128)
    assert (plan.batch, plan.rows, plan.columns, plan.factored) == (batch, rows, columns, factored)


def test_names_that_do_not_fit_the_shape_are_a_clear_error():
    tx = optim.adafactor(learning_rate=0.1, param_axes={"w": ("embed",)})
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(3, 4\) but 1 logical axis names"):
        tx.init({"w": jnp.zeros((3, 4))})
    tx = optim.adafactor(learning_rate=0.1, param_axes={"v": ("embed",)})
    with pytest.raises(ValueError, match=r"parameter \['w'\] has no entry in param_axes"):
        tx.init({"w": jnp.zeros((3,))})


def test_scanned_adafactor_equals_unrolled():
    """A `[layers, ...]` stack gets exactly the per-layer updates: statistics, update clipping and the parameter
    scale are per layer (layers get very different scales here, so any mixing across layers would show)."""
    rng = np.random.default_rng(4)
    layers = 3
    scales = np.asarray([0.01, 1.0, 100.0])
    kernel = rng.normal(size=(layers, 130, 140)) * scales[:, None, None]
    norm = rng.normal(size=(layers, 16)) * scales[:, None]
    grad_steps = [(rng.normal(size=kernel.shape) * scales[::-1, None, None], rng.normal(size=norm.shape))
                  for _ in range(3)]

    def run(params, axes, grads_of):
        tx = optim.make_optimizer(schedule=optim.constant_schedule(0.01), param_axes=axes)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        state = tx.init(params)
        for step in grad_steps:
            grads = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), grads_of(step))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return jax.device_get(params)

    scanned = run({"kernel": kernel, "scale": norm},
                  {"kernel": ("layers", "embed", "mlp"), "scale": ("layers", "embed")},
                  lambda step: {"kernel": step[0], "scale": step[1]})
    unrolled = run({f"layers_{i}": {"kernel": kernel[i], "scale": norm[i]} for i in range(layers)},
                   {f"layers_{i}": {"kernel": ("embed", "mlp"), "scale": ("embed",)} for i in range(layers)},
                   lambda step: {f"layers_{i}": {"kernel": step[0][i], "scale": step[1][i]} for i in range(layers)})
    for i in range(layers):
        np.testing.assert_allclose(scanned["kernel"][i], unrolled[f"layers_{i}"]["kernel"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(scanned["scale"][i], unrolled[f"layers_{i}"]["scale"], rtol=1e-6, atol=1e-9)


def test_bfloat16_state_halves_memory_and_stays_close_to_float32():
    rng = np.random.default_rng(5)
    param = rng.normal(size=(256, 160))
    grads = [rng.normal(size=param.shape) * s for s in (1.0, 0.3, 2.0, 1.0)]
    for names, stats in ((("embed", "mlp"), ("v_row", "v_col")), (("kv", "heads"), ("v",))):
        full, full_state = _run(param, grads, lr=0.01, names=names)
        half, half_state = _run(param, grads, lr=0.01, names=names, state_dtype="bfloat16", momentum=0.5)
        full_m, _ = _run(param, grads, lr=0.01, names=names, momentum=0.5)
        for leaf in jax.tree_util.tree_leaves((half_state.v_row, half_state.v_col, half_state.v, half_state.m)):
            assert leaf.dtype == jnp.bfloat16
        assert all(getattr(full_state, k)["w"].dtype == jnp.float32 for k in stats)
        # bf16 keeps 8 significant bits: each stored value is within 2^-9 relative, so the total update stays
        # within ~1% of float32's (measured as a norm: momentum may cancel single elements to near zero).
        step_half, step_full = half - param, full_m - param
        assert np.linalg.norm(step_half - step_full) < 1e-2 * np.linalg.norm(step_full)
        assert np.linalg.norm((full - param) - step_full) > 0.1 * np.linalg.norm(step_full)  # momentum is on


def test_factored_state_of_a_scanned_model_follows_its_names():
    config = TransformerConfig(vocab_size=256, d_model=128, num_heads=2, head_dim=64, d_ff=256, num_encoder_layers=2,
                               num_decoder_layers=2, scan_layers=True, dtype="float32")
    model = EncoderDecoder(config)
    tx = optim.make_optimizer(schedule=optim.constant_schedule(0.01), param_axes=trainer.param_axes(model))
    params = trainer.unbox_values(trainer.abstract_boxed_params(model))
    state = jax.eval_shape(tx.init, params)[0]
    mlp = ("encoder", "layers", "mlp", "wi_0", "kernel")  # [layers, embed, mlp]
    query = ("decoder", "layers", "self_attention", "query", "kernel")  # [layers, embed, heads, kv]

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree.shape

    assert (at(state.v_row, mlp), at(state.v_col, mlp)) == ((2, 128, 1), (2, 1, 256))
    assert (at(state.v_row, query), at(state.v_col, query)) == ((2, 128, 1, 1), (2, 1, 2, 64))
    assert at(state.v, ("encoder", "layers", "pre_mlp_norm", "scale")) == (2, 128)


def test_update_clipping_bounds_the_update_rms():
    param = np.ones((8, 8))
    grads = [np.zeros((8, 8)), np.zeros((8, 8))]
    grads[1][0, 0] = 1e3  # after a zero gradient, a spike: u would be huge without clipping
    ours, _ = _run(param, grads, lr=1.0)
    step = param - ours
    assert np.sqrt(np.mean(step * step)) <= 1.0 + 1e-5  # lr * scale(=1) * rms(u) with rms(u) clipped to 1


def test_warmup_schedule_shapes():
    schedule = optim.warmup_schedule(peak_learning_rate=1.0, warmup_steps=10, total_steps=110, decay="linear",
                                     end_fraction=0.0)
    values = [float(schedule(jnp.asarray(s))) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_rsqrt_schedule_needs_a_warmup_of_at_least_one_step():
    with pytest.raises(ValueError, match="rsqrt_schedule.warmup_steps = 0; expected an integer >= 1"):
        optim.rsqrt_schedule(1.0, warmup_steps=0)
    assert float(optim.rsqrt_schedule(1.0, warmup_steps=1)(jnp.asarray(0))) == 1.0


def test_trainable_mask_freezes_parameters():
    tx = optim.make_optimizer(optimizer=optim.adamw, schedule=optim.constant_schedule(0.1),
                              trainable=lambda path: path.startswith("lora"))
    params = {"lora": jnp.ones(3), "base": jnp.ones(3)}
    state = tx.init(params)
    updates, _ = tx.update({"lora": jnp.ones(3), "base": jnp.ones(3)}, state, params)
    assert np.all(np.asarray(updates["base"]) == 0) and np.all(np.asarray(updates["lora"]) != 0)


def test_trainable_subset_trains_sharded_with_the_rest_frozen():
    """A frozen parameter's optimizer state is optax's empty MaskedNode: state_shardings must keep it, and the
    sharded step must leave the frozen parameters bit-identical while the trainable ones move."""
    from t5k import partitioning

    config = TransformerConfig(vocab_size=64, d_model=16, num_heads=4, head_dim=4, d_ff=32, num_encoder_layers=1,
                               num_decoder_layers=1, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, dtype="float32")
    model = EncoderDecoder(config)
    tx = optim.make_optimizer(schedule=optim.constant_schedule(1e-2), param_axes=trainer.param_axes(model),
                              trainable=lambda path: path.startswith("decoder/"))
    mesh, rules = partitioning.create_mesh(data=2, model=4), partitioning.logical_axis_rules(fsdp=True)
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, tx, mesh, rules)
        state = trainer.init_state(model, tx, shardings, seed=0)
        rng = np.random.default_rng(0)
        batch = {"encoder_input_tokens": rng.integers(2, 64, (4, 8)), "decoder_input_tokens": rng.integers(2, 64, (4, 6)),
                 "decoder_target_tokens": rng.integers(2, 64, (4, 6)), "decoder_loss_weights": np.ones((4, 6))}
        batch = {k: np.asarray(v, np.float32 if k == "decoder_loss_weights" else np.int32) for k, v in batch.items()}
        batch_shardings = {k: partitioning.batch_sharding(mesh, rules, 2) for k in batch}
        step = trainer.compile_train_step(model, tx, trainer.LossConfig(), shardings, batch_shardings)
        before = jax.device_get(state.params)  # the step donates the state
        new, _ = step(state, trainer.device_batch(batch, mesh, rules), jax.random.PRNGKey(0))
    after = jax.device_get(new.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["encoder"]),
                                                    jax.tree_util.tree_leaves(after["encoder"])))
    assert not np.array_equal(before["decoder"]["final_norm"]["scale"], after["decoder"]["final_norm"]["scale"])


def test_eager_init_state_can_be_donated():
    """An Adafactor state built outside jit (a notebook's `tx.init(params)`) holds one buffer per leaf, so a train
    step that donates it works: no "donate the same buffer twice" from leaves sharing a placeholder."""
    tx = optim.adafactor(learning_rate=optim.constant_schedule(0.01))
    params = {"matrix": jnp.ones((256, 160)), "bias": jnp.ones((4,)), "small": jnp.ones((4, 100))}
    state = tx.init(params)
    leaves = jax.tree_util.tree_leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, updates), state

    step_donating = jax.jit(step, donate_argnums=(0, 1))
    expected_params, _ = step(params, state)
    new_params, new_state = step_donating(params, state)
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expected_params)):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.count) == 1


def test_adamw_decays_matrices_not_vectors():
    """GPT-style AdamW: kernels and embeddings decay, biases and norm scales (scanned or not) do not; with
    decay_vectors everything decays. Zero gradients leave Adam's step at 0, so an update is -lr * wd * param
    exactly where decay applies. Inside a trainable subset the mask is looked up by path."""
    from jax.sharding import PartitionSpec as P

    params = {"kernel": jnp.ones((4, 16, 32)), "bias": jnp.ones((4, 32)), "scale": jnp.ones(16),
              "embedding": jnp.ones((64, 16))}
    axes = {"kernel": P("layers", "embed", "mlp"), "bias": P("layers", "mlp"), "scale": P("embed"),
            "embedding": P("vocab", "embed")}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def step(tx):
        updates, _ = tx.update(zeros, tx.init(params), params)
        return {k: float(np.unique(np.asarray(v))[0]) for k, v in updates.items()}

    schedule = optim.constant_schedule(0.1)
    assert step(optim.adamw(schedule, param_axes=axes, weight_decay=0.5)) == pytest.approx(
        {"kernel": -0.05, "bias": 0.0, "scale": 0.0, "embedding": -0.05})
    assert step(optim.adamw(schedule, param_axes=axes, weight_decay=0.5, decay_vectors=True)) == pytest.approx(
        {"kernel": -0.05, "bias": -0.05, "scale": -0.05, "embedding": -0.05})
    assert step(optim.adamw(schedule, weight_decay=0.5))["bias"] == pytest.approx(-0.05)  # unnamed: by rank
    subset = optim.make_optimizer(optimizer=functools.partial(optim.adamw, weight_decay=0.5), schedule=schedule,
                                  param_axes=axes, trainable=lambda path: path != "kernel")
    assert step(subset) == pytest.approx({"kernel": 0.0, "bias": 0.0, "scale": 0.0, "embedding": -0.05})
