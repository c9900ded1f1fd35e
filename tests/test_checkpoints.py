"""Checkpoints: a 4×2-mesh checkpoint restores onto 1 device and onto 2×1 with identical params and eval loss;
partial restore with a regex assignment map (new subtrees kept fresh, renamed sources, clear errors), across
layer layouts (scanned <-> unrolled); restore errors that name the leaves; the fine-tuning start state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5k import checkpoints, optim, partitioning, trainer
from t5k.models import EncoderDecoder, TransformerConfig

CONFIG = TransformerConfig(
    vocab_size=96, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
    dtype="float32", relative_attention_num_buckets=8, relative_attention_max_distance=16,
)


def _batch(seed=0, batch=8, enc_len=12, dec_len=6):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, 96, (batch, enc_len)).astype(np.int32)
    targets = rng.integers(2, 96, (batch, dec_len)).astype(np.int32)
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones_like(targets, np.float32)}


# These tiny programs run once: compiling them without LLVM's optimisations saves most of the test time.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def _run(jitted, *args):
    return jitted.lower(*args).compile(compiler_options=FAST)(*args)


def _optimizer(model):
    """Adafactor factoring these small matrices too (dims >= 16), so the state holds both factored statistics and
    placeholders."""
    return optim.make_optimizer(optimizer=functools.partial(optim.adafactor, min_dim_size_to_factor=16),
                                schedule=optim.constant_schedule(0.01), param_axes=trainer.param_axes(model))


def _mesh(data, model_axis):
    return partitioning.create_mesh(data=data, model=model_axis, devices=jax.devices()[: data * model_axis])


def _eval_loss(model, params, mesh, rules):
    with partitioning.activate(mesh, rules):
        out = _run(jax.jit(lambda p, b: trainer.eval_step(p, b, model=model, loss_config=trainer.LossConfig())),
                   params, trainer.device_batch(_batch(1), mesh, rules))
    out = jax.device_get(out)
    return float(out["loss_sum"]) / float(out["weight"])


def _bump(state):
    return state.replace(step=state.step + 1, opt_state=jax.tree_util.tree_map(
        lambda x: x + 0.25 if x.dtype == np.float32 else x, state.opt_state))


@pytest.fixture(scope="module")
def trained_on_4x2(tmp_path_factory):
    """A state initialised straight into its 4×2 FSDP shardings, saved; returns (directory, host state, eval loss).

    The optimizer state gets a non-trivial value too (so a mix-up of leaves would show); no train step is
    compiled, which keeps the test fast."""
    directory = str(tmp_path_factory.mktemp("ckpt_4x2"))
    model = EncoderDecoder(CONFIG)
    optimizer = _optimizer(model)
    mesh, rules = _mesh(4, 2), partitioning.logical_axis_rules(fsdp=True)
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        init = trainer.init_state_fn(model, optimizer)  # = trainer.init_state, compiled with FAST
        state = _run(jax.jit(lambda rng: _bump(init(rng)), out_shardings=shardings), jax.random.PRNGKey(0))
    kernel = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    manager = checkpoints.checkpoint_manager(directory, save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    return directory, jax.device_get(state), _eval_loss(model, state.params, mesh, rules)


@pytest.mark.parametrize("data,model_axis", [(1, 1), (2, 1)])
def test_4x2_checkpoint_restores_on_fewer_devices(trained_on_4x2, data, model_axis):
    directory, saved, saved_loss = trained_on_4x2
    model = EncoderDecoder(CONFIG)
    optimizer = _optimizer(model)
    mesh, rules = _mesh(data, model_axis), partitioning.logical_axis_rules(fsdp=True)
    with partitioning.activate(mesh, rules):
        target = trainer.abstract_state(model, optimizer, trainer.state_shardings(model, optimizer, mesh, rules))
        manager = checkpoints.checkpoint_manager(directory, async_save=False)
        state = checkpoints.restore(manager, target)
    assert int(state.step) == 1
    for leaf, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(target)):
        assert leaf.sharding == want.sharding and len(leaf.sharding.device_set) == data * model_axis
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), saved.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.opt_state), saved.opt_state)
    np.testing.assert_allclose(_eval_loss(model, state.params, mesh, rules), saved_loss, rtol=1e-6)


@pytest.mark.parametrize("change,expected", [
    ("optimizer", r"leaves of the state are not in it \(e\.g\. opt_state/.*Only the optimizer state differs"),
    ("model", r"leaves differ in shape \(e\.g\. params/\w+/layers_0/mlp/wi_0/kernel \(32, 48\) in it vs "
              r"\(32, 64\).*another model configuration"),
    ("scan+model", r"another model configuration; .* \(it was written with TransformerConfig.scan_layers = False\)"),
    ("scan+deeper", r"another model configuration; .* \(it was written with TransformerConfig.scan_layers = False\)"),
])
def test_restore_into_another_state_names_the_leaves(trained_on_4x2, change, expected):
    """Restoring a checkpoint into the state of another optimizer or model fails before Orbax reads anything,
    naming the differing leaves and which part (parameters or optimizer state) differs."""
    directory, _, _ = trained_on_4x2
    config = {"model": CONFIG.replace(d_ff=64), "scan+model": CONFIG.replace(scan_layers=True, d_ff=64),
              "scan+deeper": CONFIG.replace(scan_layers=True, num_decoder_layers=3)}.get(change, CONFIG)
    model = EncoderDecoder(config)
    optimizer = (optim.make_optimizer(optimizer=optim.adamw, schedule=optim.constant_schedule(0.01))
                 if change == "optimizer" else _optimizer(model))
    mesh, rules = _mesh(1, 1), partitioning.logical_axis_rules()
    with partitioning.activate(mesh, rules):
        target = trainer.abstract_state(model, optimizer, trainer.state_shardings(model, optimizer, mesh, rules))
    with pytest.raises(checkpoints.CheckpointMismatchError, match=expected):
        checkpoints.restore(checkpoints.checkpoint_manager(directory, async_save=False), target)


def test_unrolled_checkpoint_restores_into_scanned_layers_and_back(trained_on_4x2, tmp_path):
    """A model trained unrolled (`layers_0`, `layers_1`) loads into `scan_layers=True` (one stacked `layers`) on
    a mesh, and a scanned checkpoint loads unrolled: the parameters equal `stack_layer_params` of each other, and
    the scanned model restored from the unrolled checkpoint gives the saved eval loss."""
    from t5k.models import stack

    directory, saved, saved_loss = trained_on_4x2
    scanned_config = CONFIG.replace(scan_layers=True)
    mesh, rules = _mesh(2, 2), partitioning.logical_axis_rules()
    scanned = checkpoints.restore_params(directory, _abstract_params(scanned_config, mesh, rules))
    expected = stack.stack_layer_params(saved.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(scanned), expected)
    target = _abstract_params(scanned_config, mesh, rules)["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    assert scanned["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].sharding == target.sharding
    np.testing.assert_allclose(_eval_loss(EncoderDecoder(scanned_config), scanned, mesh, rules), saved_loss,
                               rtol=1e-5)

    scanned_dir = str(tmp_path / "scanned")
    ocp.PyTreeCheckpointer().save(scanned_dir, {"params": jax.device_get(scanned)})
    unrolled = checkpoints.restore_params(scanned_dir, _abstract_params(CONFIG, mesh, rules))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(unrolled), saved.params)

    deeper = _abstract_params(CONFIG.replace(num_decoder_layers=3))  # a layer the stacked source does not have
    with pytest.raises(KeyError, match=r"target 'decoder/layers_2/.* has no parameter"):
        checkpoints.restore_params(scanned_dir, deeper)


def test_resume_converts_the_whole_state_between_layer_layouts(trained_on_4x2, tmp_path):
    """A TrainState checkpoint written unrolled resumes into a scanned run (and back): parameters and Adafactor
    statistics are stacked (sliced), placeholders keep their value at the other rank, shardings are the run's;
    the next training step from the converted state equals the step the unrolled run would take."""
    from t5k.models import stack

    directory, saved, _ = trained_on_4x2
    scanned_model, unrolled_model = EncoderDecoder(CONFIG.replace(scan_layers=True)), EncoderDecoder(CONFIG)
    mesh, rules = _mesh(2, 2), partitioning.logical_axis_rules()

    def target(model, optimizer):
        with partitioning.activate(mesh, rules):
            return trainer.abstract_state(model, optimizer, trainer.state_shardings(model, optimizer, mesh, rules))

    scanned_optimizer = _optimizer(scanned_model)
    scanned_target = target(scanned_model, scanned_optimizer)
    state = checkpoints.restore(checkpoints.checkpoint_manager(directory, async_save=False), scanned_target)
    for leaf, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(scanned_target)):
        assert leaf.sharding == want.sharding and leaf.shape == want.shape
    host = jax.device_get(state)
    assert int(host.step) == 1 and int(host.skipped) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, host.params, stack.stack_layer_params(saved.params))
    adafactor = host.opt_state[0]
    for field in ("v_row", "v_col", "v"):
        expected = stack.stack_layer_params(getattr(saved.opt_state[0], field))
        for got, want in zip(jax.tree_util.tree_leaves(getattr(adafactor, field)), jax.tree_util.tree_leaves(expected)):
            if got.size == 1 and want.size > 1:  # a placeholder (the parameter keeps no such statistic)
                np.testing.assert_array_equal(got.reshape(()), want.reshape(-1)[0])
            else:
                np.testing.assert_array_equal(got, want)
    for field in ("v_row", "v"):  # both factored statistics and placeholders were converted
        sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(getattr(adafactor, field))]
        assert min(sizes) == 1 and max(sizes) > 1, (field, sizes)

    # Back: the converted state saved scanned resumes unrolled, equal to what was first saved.
    manager = checkpoints.checkpoint_manager(str(tmp_path / "scanned"), save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    unrolled_optimizer = _optimizer(unrolled_model)
    back = checkpoints.restore(manager, target(unrolled_model, unrolled_optimizer))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(back), saved)

    # The same update from both layouts (a wrong statistic or a mixed-up layer would change it).
    batch = _batch(2)

    def step(model, optimizer, start):
        return _run(jax.jit(lambda s, b: trainer.train_step(s, b, None, model=model, optimizer=optimizer,
                                                            loss_config=trainer.LossConfig())[0]), start, batch)

    from_scanned = jax.device_get(step(scanned_model, scanned_optimizer, host))
    from_unrolled = jax.device_get(step(unrolled_model, unrolled_optimizer, saved))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           from_scanned.params, stack.stack_layer_params(from_unrolled.params))
    assert not np.array_equal(from_unrolled.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"],
                              saved.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])


def test_finetuning_state_from_a_checkpoint_with_new_layers_kept_fresh(trained_on_4x2):
    """`t5k train`'s init_checkpoint path on a bigger model: the checkpoint's parameters where they exist, the
    fresh initialisation (same seed as a run from scratch) where the assignment map says None, then a step-0 state
    whose optimizer state is `optimizer.init` of those parameters, all in the run's shardings."""
    from t5k import train

    directory, saved, _ = trained_on_4x2
    model = EncoderDecoder(CONFIG.replace(num_decoder_layers=3))
    optimizer = _optimizer(model)
    mesh, rules = _mesh(2, 1), partitioning.logical_axis_rules()
    with partitioning.activate(mesh, rules):
        shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        params = train.initial_params(model, shardings, 3, directory, None, [(r"decoder/layers_2/.*", None)])
        fresh = trainer.init_params(model, shardings.params, 3)
        state = trainer.state_from_params(optimizer, shardings, params)
    got = jax.device_get(state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["decoder"]["layers_2"],
                           jax.device_get(fresh["decoder"]["layers_2"]))
    for name in ("encoder", "decoder"):
        for key, value in saved.params[name].items():
            jax.tree_util.tree_map(np.testing.assert_array_equal, got[name][key], value)
    assert int(state.step) == 0 and int(state.skipped) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
                           jax.device_get(optimizer.init(jax.device_get(state.params))))
    for leaf, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
        assert leaf.sharding == want


def _abstract_params(config, mesh=None, rules=None):
    model = EncoderDecoder(config)
    boxed = trainer.abstract_boxed_params(model)
    values = trainer.unbox_values(boxed)
    if mesh is None:
        return values
    shardings = partitioning.param_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values, shardings)


def _fresh_params(config, seed=7):
    """Stand-ins for freshly initialised parameters (random normal of the right shapes; no init compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(x.dtype), _abstract_params(config))


def test_restore_params_without_map_equals_full_restore_on_a_mesh(trained_on_4x2):
    directory, saved, _ = trained_on_4x2
    mesh, rules = _mesh(2, 4), partitioning.logical_axis_rules(fsdp=False)
    target = _abstract_params(CONFIG, mesh, rules)
    params = checkpoints.restore_params(directory, target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), saved.params)
    kernel = params["decoder"]["layers_1"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding == target["decoder"]["layers_1"]["mlp"]["wi_0"]["kernel"].sharding
    assert not kernel.sharding.is_fully_replicated
    shapes = checkpoints.checkpoint_param_shapes(directory)
    assert shapes["encoder/layers_0/mlp/wi_0/kernel"][0] == (32, 48)


def test_parameters_only_checkpoint_restores_into_the_targets_dtypes_and_shardings(trained_on_4x2, tmp_path):
    """A checkpoint of bare parameters (no TrainState) is read like a TrainState's params: onto the target's
    shardings and dtypes, only the arrays the target needs (here a shallower decoder)."""
    _, saved, _ = trained_on_4x2
    directory = str(tmp_path / "params_only")
    manager = checkpoints.checkpoint_manager(directory, save_interval_steps=1, async_save=False)
    checkpoints.save(manager, 1, saved.params, force=True)
    manager.wait_until_finished()
    mesh, rules = _mesh(2, 4), partitioning.logical_axis_rules(fsdp=True)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                                    _abstract_params(CONFIG.replace(num_decoder_layers=1), mesh, rules))
    params = checkpoints.restore_params(directory, target)
    kernel = params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    assert kernel.sharding == target["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding
    assert not kernel.sharding.is_fully_replicated
    expected = saved.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), np.asarray(expected, jnp.bfloat16).astype(np.float32))
    assert "layers_1" not in params["decoder"]


def test_extra_layer_kept_fresh_or_copied_by_regex(trained_on_4x2):
    """A 3-layer decoder from a 2-layer checkpoint: layer 2 fresh (None) or copied from layer 1 (groups)."""
    directory, saved, _ = trained_on_4x2
    bigger = CONFIG.replace(num_decoder_layers=3)
    fresh = _fresh_params(bigger)
    target = _abstract_params(bigger)

    kept = checkpoints.restore_params(directory, target, assignment_map=[(r"decoder/layers_2/.*", None)],
                                      fallback=fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(kept["decoder"]["layers_2"]),
                           jax.device_get(fresh["decoder"]["layers_2"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(kept["decoder"]["layers_1"]),
                           saved.params["decoder"]["layers_1"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(kept["encoder"]), saved.params["encoder"])

    copied = checkpoints.restore_params(directory, target,
                                        assignment_map={r"decoder/layers_2/(.*)": r"decoder/layers_1/\1"})
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(copied["decoder"]["layers_2"]),
                           saved.params["decoder"]["layers_1"])
    # Layers 1 and 2 read one source, yet own separate buffers: the tree can be donated, as fine-tuning does.
    leaves = jax.tree_util.tree_leaves(copied)
    assert len({leaf.unsafe_buffer_pointer() for leaf in leaves}) == len(leaves)
    doubled = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: 2 * x, tree), donate_argnums=(0,))(copied)
    np.testing.assert_array_equal(doubled["decoder"]["layers_2"]["mlp"]["wo"]["kernel"],
                                  2 * saved.params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])


def test_extra_subtree_and_rename(trained_on_4x2):
    """An added adapter subtree stays at its fresh value; a renamed module reads its old name."""
    directory, saved, _ = trained_on_4x2
    target = _abstract_params(CONFIG)
    target["adapter"] = {"kernel": jax.ShapeDtypeStruct((32, 4), np.float32)}
    target["decoder"]["head"] = target["decoder"].pop("logits_dense")
    fallback = {"adapter": {"kernel": np.full((32, 4), 0.5, np.float32)}}
    params = checkpoints.restore_params(
        directory, target, fallback=fallback,
        assignment_map=[(r"adapter/.*", None), (r"decoder/head/(\w+)", r"decoder/logits_dense/\1")])
    np.testing.assert_array_equal(params["adapter"]["kernel"], fallback["adapter"]["kernel"])
    np.testing.assert_array_equal(params["decoder"]["head"]["kernel"], saved.params["decoder"]["logits_dense"]["kernel"])


def test_restore_params_errors_name_the_path(trained_on_4x2):
    directory, _, _ = trained_on_4x2
    bigger = _abstract_params(CONFIG.replace(num_decoder_layers=3))
    with pytest.raises(KeyError, match=r"target .decoder/layers_2/.* has no parameter"):
        checkpoints.restore_params(directory, bigger)
    with pytest.raises(KeyError, match=r"mapped to None .* no value"):
        checkpoints.restore_params(directory, bigger, assignment_map=[(r"decoder/layers_2/.*", None)])
    wider = _abstract_params(CONFIG.replace(d_ff=64))
    with pytest.raises(ValueError, match=r"target '\w+/layers_0/mlp/wi_0/kernel' has shape \(32, 64\) .* \(32, 48\)"):
        checkpoints.restore_params(directory, wider)
    with pytest.raises(FileNotFoundError, match="no step 5"):
        checkpoints.restore_params(directory, _abstract_params(CONFIG), step=5)

