"""Adafactor against a hand-written reference of the paper's update (T5 settings), and the schedules."""

import jax.numpy as jnp
import numpy as np
import optax

from t5k import optim


def reference_adafactor(param, grads, lr, factored, decay=0.8, clip=1.0, eps1=1e-30, eps2=1e-3):
    """Shazeer & Stern (2018), Algorithms 4/5 with T5's settings, written from the paper in numpy (float64)."""
    w = np.asarray(param, np.float64)
    row = col = v = None
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
        scale = max(np.sqrt(np.mean(w * w)), eps2)  # relative step size: multiply by the parameter scale
        w = w - lr * scale * u
    return w


def _run_optax(param, grads, lr):
    tx = optim.adafactor(learning_rate=optim.constant_schedule(lr))
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
    ours, state = _run_optax(param, grads, lr=0.01)
    assert state[0].v_row["w"].shape == (256,) or state[0].v_col["w"].shape == (256,)  # really factored
    np.testing.assert_allclose(ours, reference_adafactor(param, grads, 0.01, factored=True), rtol=2e-5, atol=1e-6)


def test_unfactored_update_matches_reference():
    rng = np.random.default_rng(1)
    param = rng.normal(size=(4, 100))  # 4 < min_dim_size_to_factor=128: full second moments
    grads = [rng.normal(size=param.shape) for _ in range(3)]
    ours, _ = _run_optax(param, grads, lr=0.05)
    np.testing.assert_allclose(ours, reference_adafactor(param, grads, 0.05, factored=False), rtol=2e-5, atol=1e-6)


def test_update_clipping_bounds_the_update_rms():
    param = np.ones((8, 8))
    grads = [np.zeros((8, 8)), np.zeros((8, 8))]
    grads[1][0, 0] = 1e3  # after a zero gradient, a spike: u would be huge without clipping
    ours, _ = _run_optax(param, grads, lr=1.0)
    step = param - ours
    assert np.sqrt(np.mean(step * step)) <= 1.0 + 1e-5  # lr * scale(=1) * rms(u) with rms(u) clipped to 1


def test_warmup_schedule_shapes():
    schedule = optim.warmup_schedule(peak_learning_rate=1.0, warmup_steps=10, total_steps=110, decay="linear",
                                     end_fraction=0.0)
    values = [float(schedule(jnp.asarray(s))) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_trainable_mask_freezes_parameters():
    tx = optim.make_optimizer(optimizer=optim.adamw, schedule=optim.constant_schedule(0.1),
                              trainable=lambda path: path.startswith("lora"))
    params = {"lora": jnp.ones(3), "base": jnp.ones(3)}
    state = tx.init(params)
    updates, _ = tx.update({"lora": jnp.ones(3), "base": jnp.ones(3)}, state, params)
    assert np.all(np.asarray(updates["base"]) == 0) and np.all(np.asarray(updates["lora"]) != 0)
