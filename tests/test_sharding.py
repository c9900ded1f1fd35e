"""Sharded forward passes on the 8-device CPU mesh equal the single-device result, and really are sharded."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k import partitioning
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig

# Every sharded dim divides the mesh axes used below: heads 4, mlp 48, vocab 96 by model ≤ 4; embed 32 by data 8.
CONFIG = TransformerConfig(
    vocab_size=96, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
    dtype="float32", relative_attention_num_buckets=8, relative_attention_max_distance=16,
)
LAYOUTS = [
    # (data, model, fsdp)
    (4, 2, False),
    (2, 4, False),
    (8, 1, True),
    (2, 4, True),
]


def _batch(model_cls):
    rng = np.random.default_rng(0)
    enc = rng.integers(1, 96, (8, 12)).astype(np.int32)
    enc[:, 9:] = 0
    dec = rng.integers(1, 96, (8, 6)).astype(np.int32)
    dec[:, 0] = 0
    return (jnp.asarray(enc), jnp.asarray(dec)) if model_cls is EncoderDecoder else (jnp.asarray(enc),)


def _single_device(model, params, batch):
    device = jax.devices()[0]
    params, batch = jax.device_put((params, batch), device)
    return jax.jit(lambda p, b: model.apply({"params": p}, *b))(params, batch)


def _sharded(model, boxed, batch, data, model_axis, fsdp):
    mesh = partitioning.create_mesh(data=data, model=model_axis)
    rules = partitioning.logical_axis_rules(fsdp=fsdp)
    param_shardings = partitioning.param_shardings(boxed, mesh, rules)
    params = jax.device_put(nn.unbox(boxed), param_shardings)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    batch = jax.device_put(batch, batch_sharding)
    with partitioning.activate(mesh, rules):
        fn = jax.jit(lambda p, b: model.apply({"params": p}, *b))
        lowered = fn.lower(params, batch)
        compiled = lowered.compile()
        out = compiled(params, batch)
    return out, compiled, lowered.as_text(), params, param_shardings


@pytest.mark.parametrize("model_cls", [EncoderDecoder, DecoderOnly])
@pytest.mark.parametrize("data,model_axis,fsdp", LAYOUTS)
def test_sharded_forward_equals_single_device(model_cls, data, model_axis, fsdp):
    config = CONFIG if model_cls is EncoderDecoder else CONFIG.replace(num_encoder_layers=0)
    model = model_cls(config)
    batch = _batch(model_cls)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), *batch)["params"]
    expected = _single_device(model, nn.unbox(boxed), batch)
    out, compiled, lowered, params, shardings = _sharded(model, boxed, batch, data, model_axis, fsdp)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)

    # The parameters really are split: e.g. an MLP kernel holds 1/model (and 1/data with FSDP) of its elements.
    layer = "layers_0"
    wi = params["decoder"][layer]["mlp"]["wi_0"]["kernel"] if model_cls is EncoderDecoder else params[layer]["mlp"]["wi_0"]["kernel"]
    shard_elems = wi.addressable_shards[0].data.size
    assert shard_elems == wi.size // (model_axis * (data if fsdp else 1))
    # The models' logical constraints reached the program (they are not no-ops on CPU) ...
    assert lowered.count("sharding_constraint") >= 4 * config.num_decoder_layers
    if model_axis > 1:
        assert '{"model"}' in lowered  # heads / mlp activations split over `model`
    # ... and the compiled program is partitioned: it needs collectives to combine the shards.
    hlo = compiled.as_text()
    assert "all-reduce" in hlo or "all-gather" in hlo or "reduce-scatter" in hlo
    # Activations are batch-sharded on the way out (logits [batch, length, vocab]: batch over `data`).
    assert out.sharding.shard_shape(out.shape)[0] == out.shape[0] // data


def test_rules_follow_t5x_conventions():
    rules = dict(partitioning.logical_axis_rules())
    assert rules["batch"] == "data" and rules["mlp"] == "model" and rules["heads"] == "model"
    assert rules["vocab"] == "model" and rules["embed"] is None and rules["layers"] is None
    fsdp = partitioning.logical_axis_rules(fsdp=True)
    assert fsdp.index(("embed", "data")) < fsdp.index(("embed", None))
    # An activation [batch, length, embed] under FSDP keeps embed replicated (data is taken by batch).
    mesh = partitioning.create_mesh(data=8, model=1)
    sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "length", "embed"), mesh, fsdp)
    assert sharding.spec == jax.sharding.PartitionSpec("data", None, None)
    # Additional rules take precedence, FSDP's included: ("embed", None) keeps a parameter's embed replicated.
    mine = partitioning.logical_axis_rules(fsdp=True, additional_rules=[("embed", None)])
    assert mine[0] == ("embed", None)
    spec = nn.logical_to_mesh_axes(jax.sharding.PartitionSpec("embed", "mlp"), mine)
    assert spec == jax.sharding.PartitionSpec(None, "model")


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="does not divide"):
        partitioning.create_mesh(data=3, model=1)
    with pytest.raises(ValueError, match="at most one axis"):
        partitioning.create_mesh(data=-1, model=-1)
    mesh = partitioning.create_mesh(data=-1, model=2)
    assert dict(mesh.shape) == {"data": 4, "model": 2}


@pytest.mark.parametrize("model_cls", [EncoderDecoder, DecoderOnly])
def test_sharded_cached_decoding_equals_single_device(model_cls):
    """Greedy decoding under a (data 4, model 2) mesh gives the single-device tokens; the KV cache is laid out by
    its logical names (batch over `data`, heads over `model`) inside the decoding loop."""
    from t5k import decoding

    config = CONFIG if model_cls is EncoderDecoder else CONFIG.replace(num_encoder_layers=0)
    model = model_cls(config)
    batch = _batch(model_cls)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), *batch)["params"]
    inputs = {"encoder_input_tokens": batch[0]} if model_cls is EncoderDecoder else {"prompt_tokens": batch[0][:, :9]}
    decode_config = decoding.DecodeConfig(method="greedy", max_new_tokens=5, stop_token_ids=())
    expected = np.asarray(decoding.generate(model, nn.unbox(boxed), inputs, decode_config).tokens)

    mesh = partitioning.create_mesh(data=4, model=2)
    rules = partitioning.logical_axis_rules()
    params = jax.device_put(nn.unbox(boxed), partitioning.param_shardings(boxed, mesh, rules))
    with partitioning.activate(mesh, rules):
        got = decoding.generate(model, params, inputs, decode_config).tokens
        lowered = decoding._generate.lower(model, decode_config, params, decoding._check_batch(model, inputs),
                                           jnp.zeros(8, jnp.uint32), None).as_text()
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert len({tuple(row) for row in expected.reshape(8, -1)}) > 1  # not a degenerate constant output
    # Inside the while loop, every layer's updated self-attention cache [batch, slots, heads, kv] is constrained
    # to (data, -, model, -) by its logical names.
    slots = 5 if model_cls is EncoderDecoder else 9 + 5 - 1
    loop = lowered[lowered.index("stablehlo.while"):]
    cache_constraints = re.findall(
        r'sdy.sharding_constraint %\S+ <@\w+, \[\{"data"\}, \{\}, \{"model"\}, \{\}\]> : tensor<8x' + str(slots) + 'x4x8xf32>',
        loop)
    assert len(cache_constraints) == 2 * config.num_decoder_layers, "cache keys and values of every layer"
