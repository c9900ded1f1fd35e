"""LoRA adapters: the adapted projection against plain numpy, fresh adapters leave the pre-trained function
unchanged, merged kernels compute what the adapters compute (also through the HF export and greedy decoding),
a LoRA step trains the adapters alone (sharded == single device, gradient norm of the adapters only), and the
CT5 seed's 0.09% figure."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5k import convert, decoding, optim, partitioning, trainer
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig, abstract_params, dummy_inputs, lora
from t5k.models.config import LORA_TARGETS
from t5k.models.layers import DenseGeneral
from tiny_models import train_subset

ENC_DEC = TransformerConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=24, num_encoder_layers=2,
                            num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            dtype="float32")
# GPT-style: biases, one MLP input projection (`wi`), layer norm, tied embeddings.
DEC_ONLY = ENC_DEC.replace(num_encoder_layers=0, norm="layer", norm_epsilon=1e-5, use_bias=True,
                           mlp_activations=("gelu",), position_embedding="absolute", max_length=32,
                           scale_attention_logits=True, tie_embeddings=True)


def _init(model, seed):
    return nn.unbox(model.init(jax.random.PRNGKey(seed), *dummy_inputs(model, 2, 8))["params"])


def _leaves(tree):
    return {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _graft(adapted, base):
    """`adapted`'s tree with every parameter `base` also has taken from `base` (the adapters stay)."""
    flat = _leaves(base)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: flat.get("/".join(str(k.key) for k in path), x), adapted)


def _randomize_adapters(params, seed):
    """Nonzero B (fresh adapters add exactly 0) and new A, so that merging has something to fold."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if path[-1].key in lora.ADAPTER_NAMES:
            return jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32)
        return x
    return jax.tree_util.tree_map_with_path(draw, params)


def _inputs(model, rng):
    if isinstance(model, EncoderDecoder):
        return dict(encoder_input_tokens=jnp.asarray(rng.integers(2, 64, (3, 10))),
                    decoder_input_tokens=jnp.asarray(rng.integers(2, 64, (3, 7))))
    return dict(decoder_input_tokens=jnp.asarray(rng.integers(2, 64, (3, 12))))


def test_adapted_projection_equals_plain_numpy():
    """`x @ W + (alpha / r) x @ A @ B`, written out in numpy over the flattened in/out dims."""
    rng = np.random.default_rng(0)
    for in_features, out_features, axes in (((12,), (3, 4), ("embed", "heads", "kv")),
                                            ((3, 4), (12,), ("heads", "kv", "embed"))):
        layer = DenseGeneral(in_features, out_features, axes, use_bias=True, lora_rank=2, lora_scale=1.5)
        x = rng.normal(size=(2, 5) + in_features).astype(np.float32)
        params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))["params"]
        assert params["lora_a"].shape == in_features + (2,) and params["lora_b"].shape == (2,) + out_features
        params = {name: rng.normal(size=p.shape).astype(np.float32) for name, p in params.items()}
        got = np.asarray(layer.apply({"params": params}, x))
        n_in, n_out = int(np.prod(in_features)), int(np.prod(out_features))
        weight = params["kernel"].reshape(n_in, n_out) + 1.5 * params["lora_a"].reshape(n_in, 2) @ params[
            "lora_b"].reshape(2, n_out)
        want = x.reshape(10, n_in) @ weight + params["bias"].reshape(n_out)
        np.testing.assert_allclose(got.reshape(10, n_out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [ENC_DEC, DEC_ONLY], ids=["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_fresh_adapters_leave_the_pretrained_function_unchanged(config, fuse):
    config = config.replace(fuse_projections=fuse)
    cls = EncoderDecoder if config.num_encoder_layers else DecoderOnly
    base_model = cls(config)
    adapted_model = cls(config.replace(lora_rank=3, lora_targets=LORA_TARGETS))
    base = _init(base_model, 0)
    adapted = _graft(_init(adapted_model, 1), base)
    names = {path.split("/")[-2] for path in _leaves(adapted) if path.endswith("lora_b")}
    assert names == ({"query", "key", "value", "out", "wi_0", "wi_1", "wo"} if cls is EncoderDecoder
                     else {"query", "key", "value", "out", "wi", "wo"})
    batch = _inputs(base_model, np.random.default_rng(0))
    np.testing.assert_array_equal(adapted_model.apply({"params": adapted}, **batch),
                                  base_model.apply({"params": base}, **batch))


@pytest.mark.parametrize("config", [ENC_DEC, DEC_ONLY.replace(scan_layers=True)],
                         ids=["encoder_decoder", "decoder_only_scanned"])
def test_merged_kernels_compute_what_the_adapters_compute(config):
    cls = EncoderDecoder if config.num_encoder_layers else DecoderOnly
    adapted_config = config.replace(lora_rank=2, lora_alpha=4.0, lora_targets=("query", "value", "wo"))
    adapted_model = cls(adapted_config)
    params = _randomize_adapters(_init(adapted_model, 0), seed=1)
    merged, merged_config = lora.merge(params, adapted_config)
    assert merged_config == adapted_config.replace(lora_rank=0) and lora.adapter_count(merged) == 0
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(_init(cls(config), 0))
    batch = _inputs(adapted_model, np.random.default_rng(2))
    adapted_logits = adapted_model.apply({"params": params}, **batch)
    merged_logits = cls(merged_config).apply({"params": merged}, **batch)
    # The adapters moved the function, and the merged kernels follow it.
    base_logits = cls(config).apply({"params": _graft(_init(cls(config), 0), params)}, **batch)
    assert np.abs(np.asarray(adapted_logits - base_logits)).max() > 1e-2
    np.testing.assert_allclose(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    # Cached greedy decoding reads the adapters too.
    decode = decoding.DecodeConfig(max_new_tokens=5)
    if cls is EncoderDecoder:
        prompt = {"encoder_input_tokens": np.asarray(batch["encoder_input_tokens"])}
    else:
        prompt = {"prompt_tokens": np.asarray(batch["decoder_input_tokens"][:, :4])}
    np.testing.assert_array_equal(decoding.generate(adapted_model, params, prompt, decode).tokens,
                                  decoding.generate(cls(merged_config), merged, prompt, decode).tokens)


def test_hf_export_merges_the_adapters():
    config = ENC_DEC.replace(vocab_size=64)
    adapted_config = config.replace(lora_rank=2)
    params = _randomize_adapters(_init(EncoderDecoder(adapted_config), 0), seed=3)
    exported = convert.t5_params_to_hf(params, adapted_config)
    expected = convert.t5_params_to_hf(lora.merge(params, adapted_config)[0], config)
    assert exported.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(exported[key], expected[key], err_msg=key)


def _train(mesh, config, steps):
    """`steps` AdamW steps on one batch that train the adapters alone: (first params, last params, metrics,
    optimizer state, the batch)."""
    rng = np.random.default_rng(0)
    batch = {"encoder_input_tokens": rng.integers(2, 64, (8, 10)), "decoder_input_tokens": rng.integers(2, 64, (8, 6)),
             "decoder_target_tokens": rng.integers(2, 64, (8, 6))}
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    batch["decoder_loss_weights"] = np.ones((8, 6), np.float32)
    return train_subset(EncoderDecoder(config), lora.ADAPTER_PATTERN, batch, mesh, steps) + (batch,)


def test_a_lora_step_trains_the_adapters_alone(devices):
    config = ENC_DEC.replace(num_heads=4, lora_rank=2, lora_targets=("query", "value", "wi_0", "wo"))
    sharded = partitioning.create_mesh(data=2, model=4, devices=devices)
    first, last, history, opt_state, batch = _train(sharded, config, steps=6)
    before, after = _leaves(first), _leaves(last)
    adapters = [path for path in before if path.split("/")[-1] in lora.ADAPTER_NAMES]
    assert len(adapters) == 2 * (6 * 2 + 4 * 2)  # A and B of q, v in 6 attentions and of wi_0, wo in 4 MLPs
    for path, value in before.items():
        if path in adapters:
            assert not np.array_equal(value, after[path]), path
        else:
            np.testing.assert_array_equal(value, after[path], err_msg=path)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], [h["loss"] for h in history]
    # AdamW's two moments, for the adapters only (the frozen parameters have no state).
    state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
    assert state_sizes == 2 * lora.adapter_count(first)
    # grad_norm is the adapters' gradient norm, checked against autodiff of the plain loss on the first state.
    model = EncoderDecoder(config)
    grads = jax.jit(jax.grad(lambda p: trainer.loss_sums(model, p, batch, None, trainer.LossConfig()).loss))(first)
    adapter_grads = [g for path, g in _leaves(grads).items() if path in adapters]
    expected = float(optax.tree.norm(adapter_grads)) / batch["decoder_loss_weights"].sum()
    np.testing.assert_allclose(history[0]["grad_norm"], expected, rtol=1e-4)
    # The same steps on one device.
    single = partitioning.create_mesh(data=1, model=1, devices=devices[:1])
    _, last_single, history_single, _, _ = _train(single, config, steps=6)
    for path, value in _leaves(last_single).items():
        np.testing.assert_allclose(after[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in history_single], rtol=1e-5)


def test_frozen_kernels_get_no_weight_gradient_matmuls(devices):
    """The train step zeroes the frozen gradients before anything reads them, so XLA drops their matmuls: a LoRA
    step costs the forward pass and the activation gradients, about 2/3 of a full step's FLOPs (XLA's count)."""
    config = TransformerConfig(vocab_size=256, d_model=128, num_heads=2, head_dim=64, d_ff=256, num_encoder_layers=1,
                               num_decoder_layers=1, dtype="float32", lora_rank=2)
    model = EncoderDecoder(config)
    mesh, rules = partitioning.create_mesh(devices=devices[:1]), partitioning.logical_axis_rules()
    shapes = {"encoder_input_tokens": (8, 64), "decoder_input_tokens": (8, 32), "decoder_target_tokens": (8, 32)}
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}
    batch["decoder_loss_weights"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    flops = {}
    for name, trainable in (("all", None), ("adapters", optim.trainable_parameters(lora.ADAPTER_PATTERN))):
        tx = optim.make_optimizer(optimizer=optim.adamw, schedule=optim.constant_schedule(1e-3),
                                  param_axes=trainer.param_axes(model), trainable=trainable)
        with partitioning.activate(mesh, rules):
            shardings = trainer.state_shardings(model, tx, mesh, rules)
            step = trainer.compile_train_step(model, tx, trainer.LossConfig(), shardings,
                                              {k: partitioning.batch_sharding(mesh, rules, 2) for k in batch},
                                              trainable=trainable)
            compiled = step.lower(trainer.abstract_state(model, tx, shardings), batch, None).compile()
        cost = compiled.cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.55 < flops["adapters"] / flops["all"] < 0.75, flops


def test_ct5_small_rank_2_on_query_and_value_trains_0_09_percent():
    """CT5 seed: LoRA "as little as 0.09% of the parameters"; ct5_small's defaults with rank 2 on query and value."""
    params = abstract_params(EncoderDecoder(TransformerConfig(lora_rank=2)))
    adapters = lora.adapter_count(params)
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert adapters == 24 * 2 * 2 * (512 + 6 * 64)  # 24 attention layers (8 self, 8 self + 8 cross)
    assert round(100 * adapters / (total - adapters), 2) == 0.09


def test_bad_lora_settings_are_named_errors():
    with pytest.raises(ValueError, match=r"TransformerConfig.lora_targets = 'qury'; expected one of \('query'"):
        TransformerConfig(lora_rank=2, lora_targets=("qury",))
    with pytest.raises(ValueError, match="TransformerConfig.lora_rank = -1; expected 0"):
        TransformerConfig(lora_rank=-1)
    with pytest.raises(ValueError, match=r"trainable_parameters.pattern = '\(lora' is not a regular expression"):
        optim.trainable_parameters("(lora")
    with pytest.raises(ValueError, match="lora_rank is 0, so there are no adapters to merge"):
        lora.merge({}, ENC_DEC)
    adapted = ENC_DEC.replace(lora_rank=2)
    params = _init(EncoderDecoder(adapted), 0)
    del params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    with pytest.raises(KeyError, match="encoder/layers_0/attention/query has an adapter but no 'kernel'"):
        lora.merge(params, adapted)
