"""The training step: sharded == single device, microbatching == full batch, losses, non-finite skipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5k import losses, optim, partitioning, trainer
from t5k.models import EncoderDecoder, TransformerConfig

CONFIG = TransformerConfig(
    vocab_size=96, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
    dtype="float32", relative_attention_num_buckets=8, relative_attention_max_distance=16,
)


def _batch(seed=0, batch=8, enc_len=12, dec_len=6):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, 96, (batch, enc_len)).astype(np.int32)
    targets = rng.integers(2, 96, (batch, dec_len)).astype(np.int32)
    for row in range(batch):  # ragged real lengths, so normalisation by real tokens matters
        enc[row, rng.integers(enc_len // 2, enc_len + 1):] = 0
        targets[row, rng.integers(1, dec_len + 1):] = 0
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc, "decoder_input_tokens": inputs, "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }


def _one_step(data, model_axis, fsdp, num_microbatches=1, batch=None):
    model = EncoderDecoder(CONFIG)
    optimizer = optim.make_optimizer(optimizer=optim.adafactor, schedule=optim.constant_schedule(0.01),
                                     param_axes=trainer.param_axes(model))
    mesh = partitioning.create_mesh(data=data, model=model_axis, devices=jax.devices()[: data * model_axis])
    rules = partitioning.logical_axis_rules(fsdp=fsdp)
    batch = _batch() if batch is None else batch
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        state = trainer.init_state(model, optimizer, shardings, seed=0)
        device_batch = trainer.device_batch(batch, mesh, rules)
        batch_shardings = {k: v.sharding for k, v in device_batch.items()}
        step = trainer.compile_train_step(model, optimizer, trainer.LossConfig(), shardings, batch_shardings,
                                          num_microbatches)
        state, metrics = step(state, device_batch, None)
    return jax.device_get(state), jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single_device_step():
    return _one_step(1, 1, False)


@pytest.mark.parametrize("data,model_axis,fsdp", [(8, 1, False), (4, 2, False), (2, 4, False), (8, 1, True)])
def test_sharded_train_step_equals_single_device(single_device_step, data, model_axis, fsdp):
    ref_state, ref_metrics, _ = single_device_step
    state, metrics, shardings = _one_step(data, model_axis, fsdp)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params,
                           ref_state.params)
    # The state really was sharded (not silently replicated).
    kernel = shardings.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert not kernel.is_fully_replicated or (model_axis == 1 and not fsdp)


def test_microbatches_equal_the_full_batch(single_device_step):
    ref_state, ref_metrics, _ = single_device_step
    state, metrics, _ = _one_step(1, 1, False, num_microbatches=4)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    assert metrics["target_tokens"] == ref_metrics["target_tokens"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params,
                           ref_state.params)


def test_non_finite_update_is_skipped_and_counted():
    model = EncoderDecoder(CONFIG)
    optimizer = optax.sgd(0.1)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), *trainer.dummy_inputs(model))["params"])
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"].at[0, 0].set(jnp.nan)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                               skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(lambda s, b: trainer.train_step(s, b, None, model=model, optimizer=optimizer,
                                                   loss_config=trainer.LossConfig()))
    new_state, metrics = step(state, _batch())
    assert int(new_state.skipped) == 1 and int(new_state.step) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.params, params)


def test_cross_entropy_and_z_loss_match_hand_computation():
    logits = jnp.asarray([[[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]])
    targets = jnp.asarray([[0, 2]])
    sums = losses.cross_entropy_sums(logits, targets, jnp.asarray([[1.0, 0.0]]), z_loss=0.1)
    log_z = np.log(np.exp(2.0) + np.exp(0.5) + np.exp(-1.0))
    assert np.isclose(float(sums.loss), (log_z - 2.0) + 0.1 * log_z**2, rtol=1e-6)
    assert float(sums.weight) == 1.0 and float(sums.correct) == 1.0


def test_z_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)))
    targets = jnp.asarray(rng.integers(0, 7, (2, 3)))

    def f(x):
        return losses.cross_entropy_sums(x, targets, jnp.ones((2, 3)), z_loss=0.5).loss

    grad = np.asarray(jax.grad(f)(logits))
    # Closed form: d/dx [lse(x) - x_t + z lse(x)^2] = softmax(x) (1 + 2 z lse(x)) - onehot(t).
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x).sum(-1, keepdims=True))
    expected = np.exp(x - lse) * (1 + 2 * 0.5 * lse) - np.eye(7)[np.asarray(targets)]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    # Central finite differences (float32, so a coarse step and tolerance).
    eps = 1e-2
    for index in [(0, 0, 0), (1, 2, 5), (0, 1, 3)]:
        bump = np.zeros(logits.shape, np.float32)
        bump[index] = eps
        numeric = (float(f(logits + bump)) - float(f(logits - bump))) / (2 * eps)
        assert np.isclose(grad[index], numeric, rtol=2e-2, atol=2e-3), (index, grad[index], numeric)


def test_label_smoothing_scores_a_perfect_prediction_near_zero():
    logits = jnp.full((1, 1, 5), -1e4).at[0, 0, 2].set(1e4)
    smooth = losses.cross_entropy_sums(logits, jnp.asarray([[2]]), z_loss=0.0, label_smoothing=0.1)
    confident = jnp.log(jnp.asarray([0.025, 0.025, 0.9, 0.025, 0.025]))[None, None]
    best = losses.cross_entropy_sums(confident, jnp.asarray([[2]]), z_loss=0.0, label_smoothing=0.1)
    assert abs(float(best.loss)) < 1e-5 and float(smooth.loss) > float(best.loss)


def test_rsqrt_schedule_is_t5s():
    schedule = optim.rsqrt_schedule(1.0, 10_000)
    assert np.isclose(float(schedule(jnp.asarray(0))), 0.01)
    assert np.isclose(float(schedule(jnp.asarray(10_000))), 0.01)
    assert np.isclose(float(schedule(jnp.asarray(40_000))), 0.005)


def test_batch_not_divisible_by_data_axis_is_a_clear_error():
    mesh = partitioning.create_mesh(data=8, model=1)
    with pytest.raises(ValueError, match="not divisible by the data axis"):
        trainer.check_batch_divisible(12, mesh)


def test_factored_optimizer_state_follows_parameter_shardings():
    """Adafactor's row/column statistics of a scanned `[layers, embed, mlp]` kernel keep the kernel's sharding on
    their kept dims (FSDP `embed`→data, `mlp`→model) and replicate the reduced ones; full moments copy it."""
    config = CONFIG.replace(d_model=128, d_ff=256, head_dim=32, scan_layers=True)
    model = EncoderDecoder(config)
    optimizer = optim.make_optimizer(schedule=optim.constant_schedule(0.01), param_axes=trainer.param_axes(model))
    mesh = partitioning.create_mesh(data=2, model=4)
    rules = partitioning.logical_axis_rules(fsdp=True)
    shardings = trainer.state_shardings(model, optimizer, mesh, rules)
    adafactor_state = shardings.opt_state[0]
    kernel = ("encoder", "layers", "mlp", "wi_0", "kernel")
    norm = ("encoder", "layers", "pre_mlp_norm", "scale")

    def spec(tree, path):
        for key in path:
            tree = tree[key]
        return tuple(tree.spec) + (None,) * (3 - len(tree.spec))

    assert spec(shardings.params, kernel) == (None, "data", "model")
    assert spec(adafactor_state.v_row, kernel) == (None, "data", None)
    assert spec(adafactor_state.v_col, kernel) == (None, None, "model")
    assert spec(adafactor_state.v, norm) == spec(shardings.params, norm) == (None, "data", None)


def test_single_process_setup_is_a_no_op_and_host_batches_become_global_arrays():
    assert partitioning.initialize_distributed() is False  # nothing configured: no jax.distributed
    assert partitioning.host_batch_shard(16) == (16, 0, 1)  # one process loads the whole batch
    mesh = partitioning.create_mesh(data=4, model=2)
    batch = _batch()
    arrays = trainer.device_batch(batch, mesh, partitioning.logical_axis_rules())
    for key, value in batch.items():
        assert arrays[key].shape == value.shape and tuple(arrays[key].sharding.spec)[:1] == ("data",)
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
        for shard in arrays[key].addressable_shards:  # each device holds its data shard's rows
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
