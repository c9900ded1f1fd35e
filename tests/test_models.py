"""Model behaviour: preset sizes, logical names, scan == unrolled, remat, masks (padding, packing, prefix LM)."""

import json
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5k import cli
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig, build_model
from t5k.models import layers
from t5k.models.params_cli import param_counts
from t5k.models.stack import stack_layer_params, unstack_layer_params
from t5k import gin_utils

TINY_T5 = TransformerConfig(
    vocab_size=97, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=3,
    dtype="float32", relative_attention_num_buckets=8, relative_attention_max_distance=16,
)
TINY_GPT = TINY_T5.replace(
    norm="layer", norm_epsilon=1e-5, use_bias=True, mlp_activations=("gelu",), position_embedding="absolute",
    max_length=64, scale_attention_logits=True, tie_embeddings=True, num_encoder_layers=0, embedding_stddev=0.02,
)


def _tokens(rng, batch, length, vocab, min_len=1):
    """Random ids in [1, vocab) with trailing padding (each row keeps at least `min_len` tokens)."""
    ids = rng.integers(1, vocab, size=(batch, length))
    lengths = rng.integers(min_len, length + 1, size=batch)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return jnp.asarray(ids, jnp.int32)


def _init(model, *args):
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *args)["params"])


def _apply(model, params, *args, **kwargs):
    """Jitted `model.apply` (eager flax dispatch is ~10x slower than compiling these tiny models)."""
    static = {k: kwargs.pop(k) for k in ("deterministic",) if k in kwargs}
    rngs = kwargs.pop("rngs", None)
    fn = jax.jit(lambda p, a, kw, r: model.apply({"params": p}, *a, rngs=r, **kw, **static))
    return fn(params, args, kwargs, rngs)


# ---------------------------------------------------------------------------------------------------- presets

PRESET_TARGETS = {
    # preset: (target parameters, relative tolerance)
    "ct5_small": (97e6, 0.01),
    "ct5_base": (277e6, 0.01),
    "ct5_large": (822e6, 0.01),
    "ct5_1_7b": (1.7e9, 0.03),
    "ct5_3b": (3e9, 0.03),
    "hyperclova_137m": (137e6, 0.10),
    "hyperclova_350m": (350e6, 0.10),
    "hyperclova_760m": (760e6, 0.10),
    "hyperclova_1_3b": (1.3e9, 0.10),
    "hyperclova_6_9b": (6.9e9, 0.10),
    "hyperclova_13b": (13e9, 0.10),
    "hyperclova_39b": (39e9, 0.10),
    "hyperclova_82b": (82e9, 0.10),
}


@pytest.mark.parametrize("preset", sorted(PRESET_TARGETS))
def test_preset_parameter_counts_match_the_papers(preset):
    gin.clear_config()
    gin_utils.parse_gin([f"gin/models/{preset}.gin"], [])
    model = build_model()
    gin.clear_config()
    assert model.config.vocab_size == 51200
    # Scanned: eval_shape traces one layer body, so even the 82B model counts in a second.
    model = type(model)(model.config.replace(scan_layers=True))
    target, tol = PRESET_TARGETS[preset]
    total = param_counts(model)["total"]
    assert abs(total - target) / target <= tol, f"{preset}: {total:,} vs {target:,.0f}"


def test_t5_1_1_dimensions_give_the_published_counts_exactly():
    # The numbers in MISSION.md: 96.5M / 276.9M / 822.2M / 2.93B at vocab 51,200.
    expected = {"ct5_small": 96_490_880, "ct5_base": 276_872_448, "ct5_large": 822_209_536, "ct5_3b": 2_927_876_096}
    for preset, count in expected.items():
        gin.clear_config()
        gin_utils.parse_gin([f"gin/models/{preset}.gin"], ["TransformerConfig.scan_layers = True"])
        assert param_counts(build_model())["total"] == count
    gin.clear_config()


def test_params_cli_prints_counts_and_rejects_unknown_binding(capsys):
    gin.clear_config()
    assert cli.main(["params", "--gin_file=gin/models/ct5_small.gin", "--json",
                     "--gin.TransformerConfig.vocab_size=32128"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["token_embedder"] == 32128 * 512
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["token_embedder"]
    gin.clear_config()
    assert cli.main(["params", "--gin_file=gin/models/ct5_small.gin", "--gin.TransformerConfig.d_modle=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d_modle" in err[0]
    for binding, message in (("TransformerConfig.d_model=64.5", "TransformerConfig.d_model = 64.5; expected an integer"),
                             ("TransformerConfig.mlp_activations='gelu'",
                              "TransformerConfig.mlp_activations = 'gelu'; expected a tuple of strings"),
                             ("TransformerConfig.d_model=[1", "gin configuration error: ")):
        gin.clear_config()
        assert cli.main(["params", "--gin_file=gin/models/ct5_small.gin", f"--gin.{binding}"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"t5k params: {message}"), (binding, err)
    gin.clear_config()


# ---------------------------------------------------------------------------------------------- logical names

@pytest.mark.parametrize("model_cls,config", [(EncoderDecoder, TINY_T5), (DecoderOnly, TINY_GPT)])
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axis_names(model_cls, config, scan):
    config = config.replace(scan_layers=scan)
    tokens = jnp.ones((2, 5), jnp.int32)
    args = (tokens, tokens) if model_cls is EncoderDecoder else (tokens,)
    boxed = model_cls(config).init(jax.random.PRNGKey(0), *args)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names), name
        if scan and re.search(r"\['layers'\]", name):
            assert leaf.names[0] == "layers", name


# ------------------------------------------------------------------------------------------ scan and remat

@pytest.mark.parametrize("model_cls,config", [(EncoderDecoder, TINY_T5), (DecoderOnly, TINY_GPT)])
def test_scanned_equals_unrolled(model_cls, config):
    rng = np.random.default_rng(0)
    enc, dec = _tokens(rng, 3, 11, 97), _tokens(rng, 3, 7, 97)
    args = (enc, dec) if model_cls is EncoderDecoder else (dec,)
    unrolled = model_cls(config)
    params = _init(unrolled, *args)
    scanned = model_cls(config.replace(scan_layers=True))
    stacked = stack_layer_params(params)
    # The stacked layout must be exactly what the scanned model itself creates.
    expected = jax.tree_util.tree_map(lambda x: x.shape, _init(scanned, *args))
    assert jax.tree_util.tree_map(lambda x: x.shape, stacked) == expected
    out_unrolled = _apply(unrolled, params, *args)
    out_scanned = _apply(scanned, stacked, *args)
    np.testing.assert_allclose(out_scanned, out_unrolled, atol=1e-5, rtol=0)
    # And back.
    jax.tree_util.tree_map(np.testing.assert_array_equal, unstack_layer_params(stacked), params)


@pytest.mark.parametrize("policy,scan", [("minimal", False), ("full", True)])
def test_remat_policies_do_not_change_outputs_or_gradients(policy, scan):
    rng = np.random.default_rng(1)
    enc, dec = _tokens(rng, 2, 9, 97), _tokens(rng, 2, 6, 97)
    base = EncoderDecoder(TINY_T5.replace(scan_layers=scan))
    params = _init(base, enc, dec)
    remat = EncoderDecoder(TINY_T5.replace(scan_layers=scan, remat_policy=policy))

    def loss(model, p):
        return jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, enc, dec))[..., 3])

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g0)


def test_fused_projections_equal_separate_ones():
    rng = np.random.default_rng(2)
    enc, dec = _tokens(rng, 2, 9, 97), _tokens(rng, 2, 6, 97)
    fused = EncoderDecoder(TINY_T5)
    params = _init(fused, enc, dec)
    separate = EncoderDecoder(TINY_T5.replace(fuse_projections=False))
    np.testing.assert_allclose(
        _apply(fused, params, enc, dec), _apply(separate, params, enc, dec), atol=1e-5
    )


# -------------------------------------------------------------------------------------------------- masks

def test_padding_does_not_change_real_positions():
    """Appending padding to encoder inputs and decoder inputs leaves the logits at real positions unchanged."""
    rng = np.random.default_rng(3)
    model = EncoderDecoder(TINY_T5)
    enc = jnp.asarray(rng.integers(1, 97, (1, 8)), jnp.int32)
    dec = jnp.asarray(np.concatenate([[[0]], rng.integers(1, 97, (1, 5))], axis=1), jnp.int32)
    params = _init(model, enc, dec)
    short = _apply(model, params, enc, dec)
    long = _apply(model, params, jnp.pad(enc, ((0, 0), (0, 7))), jnp.pad(dec, ((0, 0), (0, 4))))
    np.testing.assert_allclose(long[:, :6], short, atol=1e-5)


def test_packed_batch_equals_separate_examples():
    """Two examples packed in one row (segment ids + positions) give the logits they give on their own."""
    rng = np.random.default_rng(4)
    model = EncoderDecoder(TINY_T5)
    enc_a, enc_b = rng.integers(1, 97, 5), rng.integers(1, 97, 7)
    dec_a, dec_b = np.r_[0, rng.integers(1, 97, 3)], np.r_[0, rng.integers(1, 97, 4)]
    params = _init(model, jnp.ones((1, 12), jnp.int32), jnp.ones((1, 9), jnp.int32))

    def packed(*parts):
        return jnp.asarray(np.concatenate(parts)[None], jnp.int32)

    logits = model.apply(
        {"params": params},
        packed(enc_a, enc_b), packed(dec_a, dec_b),
        encoder_segment_ids=packed([1] * 5, [2] * 7), decoder_segment_ids=packed([1] * 4, [2] * 5),
        encoder_positions=packed(range(5), range(7)), decoder_positions=packed(range(4), range(5)),
    )
    alone_a = _apply(model, params, packed(enc_a), packed(dec_a))
    alone_b = _apply(model, params, packed(enc_b), packed(dec_b))
    np.testing.assert_allclose(logits[:, :4], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 4:], alone_b, atol=1e-5)


@pytest.mark.parametrize("position_embedding", ["absolute", "rotary", "relative"])
def test_packed_decoder_only_equals_separate_examples(position_embedding):
    rng = np.random.default_rng(5)
    model = DecoderOnly(TINY_GPT.replace(position_embedding=position_embedding))
    a, b = rng.integers(1, 97, 6), rng.integers(1, 97, 5)
    params = _init(model, jnp.ones((1, 11), jnp.int32))

    def row(*parts):
        return jnp.asarray(np.concatenate(parts)[None], jnp.int32)

    logits = model.apply(
        {"params": params}, row(a, b), decoder_segment_ids=row([1] * 6, [2] * 5),
        decoder_positions=row(range(6), range(5)),
    )
    np.testing.assert_allclose(logits[:, :6], _apply(model, params, row(a)), atol=1e-5)
    np.testing.assert_allclose(logits[:, 6:], _apply(model, params, row(b)), atol=1e-5)


def test_causal_lm_never_looks_ahead():
    rng = np.random.default_rng(6)
    model = DecoderOnly(TINY_T5.replace(num_encoder_layers=0))
    tokens = jnp.asarray(rng.integers(1, 97, (2, 10)), jnp.int32)
    params = _init(model, tokens)
    full = _apply(model, params, tokens)
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 96 + 1)
    np.testing.assert_allclose(_apply(model, params, changed)[:, :6], full[:, :6], atol=1e-6)
    assert not np.allclose(_apply(model, params, changed)[:, 6:], full[:, 6:])


def test_prefix_lm_attends_bidirectionally_inside_the_prefix_only():
    rng = np.random.default_rng(7)
    model = DecoderOnly(TINY_GPT)
    tokens = jnp.asarray(rng.integers(1, 97, (1, 10)), jnp.int32)
    prefix = jnp.asarray([[1] * 4 + [0] * 6], jnp.int32)
    params = _init(model, tokens)
    base = _apply(model, params, tokens, decoder_causal_attention=prefix)
    # Changing prefix token 3 changes position 1 (bidirectional prefix) ...
    changed_prefix = tokens.at[0, 3].set(tokens[0, 3] % 96 + 1)
    out = _apply(model, params, changed_prefix, decoder_causal_attention=prefix)
    assert not np.allclose(out[:, 1], base[:, 1])
    # ... but a change after the prefix never reaches earlier positions.
    changed_target = tokens.at[0, 7].set(tokens[0, 7] % 96 + 1)
    out = _apply(model, params, changed_target, decoder_causal_attention=prefix)
    np.testing.assert_allclose(out[:, :7], base[:, :7], atol=1e-6)
    # Without the prefix mask the model is a plain causal LM: position 1 ignores position 3.
    causal = _apply(model, params, changed_prefix)
    np.testing.assert_allclose(causal[:, 1], _apply(model, params, tokens)[:, 1], atol=1e-6)


def test_relative_position_buckets_match_hand_computed_values():
    rel = jnp.arange(-200, 201)
    bidir = np.asarray(layers.relative_position_bucket(rel, True, 32, 128))
    # memory - query = -1 (key one step in the past): n = 1 -> exact bucket 1; +1 -> 16 + 1.
    assert bidir[200 - 1] == 1 and bidir[200 + 1] == 17 and bidir[200] == 0
    # Exact buckets for |offset| < 8, log buckets beyond, saturating at max_distance 128.
    assert [int(bidir[200 - k]) for k in (7, 8, 12, 16, 127, 128, 200)] == [7, 8, 9, 10, 15, 15, 15]
    causal = np.asarray(layers.relative_position_bucket(rel, False, 32, 128))
    assert causal[200 + 5] == 0  # the future shares bucket 0
    assert [int(causal[200 - k]) for k in (15, 16, 32, 64, 128, 1000 % 201)] == [15, 16, 21, 26, 31, 31]


@pytest.mark.parametrize("one_hot_limit", [layers.ONE_HOT_GRAD_LIMIT, 0])
def test_bucket_lookup_gradient_equals_autodiff_of_take(monkeypatch, one_hot_limit):
    """The hand-written table gradient (one-hot matmul, or scatter-add past the size limit) is exactly autodiff's."""
    monkeypatch.setattr(layers, "ONE_HOT_GRAD_LIMIT", one_hot_limit)
    table = jax.random.normal(jax.random.PRNGKey(0), (6, 32))
    buckets = jax.random.randint(jax.random.PRNGKey(1), (3, 17, 19), 0, 32)
    weights = jax.random.normal(jax.random.PRNGKey(2), (6, 3, 17, 19))
    ours = jax.jit(jax.value_and_grad(lambda t: (layers.bucket_lookup(t, buckets) * weights).sum()))(table)
    reference = jax.value_and_grad(lambda t: (jnp.take(t, buckets, axis=1) * weights).sum())(table)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5)
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-6, atol=1e-6)


def test_gated_gelu_is_the_tanh_approximation():
    x = jnp.linspace(-4, 4, 101)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(layers.activation_fn("gelu")(x), expected, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = EncoderDecoder(TINY_T5.replace(dtype="bfloat16"))
    enc = jnp.ones((2, 5), jnp.int32)
    params = _init(model, enc, enc)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = _apply(model, params, enc, enc)
    assert logits.dtype == jnp.float32
    reference = EncoderDecoder(TINY_T5).apply({"params": params}, enc, enc)
    np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.05)


def test_dropout_is_active_only_when_not_deterministic():
    model = EncoderDecoder(TINY_T5.replace(dropout_rate=0.3))
    enc = jnp.ones((2, 5), jnp.int32)
    params = _init(model, enc, enc)
    a = _apply(model, params, enc, enc, deterministic=True)
    b = _apply(model, params, enc, enc, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    c = _apply(model, params, enc, enc, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b) and not np.allclose(b, c)


def test_shared_encoder_decoder_shares_all_but_cross_attention():
    config = TINY_T5.replace(shared_encoder_decoder=True, num_encoder_layers=2, num_decoder_layers=2)
    enc = jnp.ones((2, 5), jnp.int32)
    model = EncoderDecoder(config)
    params = _init(model, enc, enc)
    separate = _init(EncoderDecoder(config.replace(shared_encoder_decoder=False)), enc, enc)
    n_shared = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_separate = sum(x.size for x in jax.tree_util.tree_leaves(separate))
    encoder_layers = sum(x.size for k, v in separate["encoder"].items() if k.startswith("layers_")
                         for x in jax.tree_util.tree_leaves(v))
    assert n_shared == n_separate - encoder_layers
    assert _apply(model, params, enc, enc).shape == (2, 5, 97)


def test_bad_config_and_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(norm="batch")
    with pytest.raises(ValueError, match="mlp_activations"):
        TransformerConfig(mlp_activations=("tanh",))
    for field, value, expected in (("d_model", 64.5, "an integer"), ("num_heads", True, "an integer"),
                                   ("dropout_rate", "0.1", "a number"), ("dtype", 32, "a string"),
                                   ("mlp_activations", "gelu", "a tuple of strings"),
                                   ("scan_layers", 1, "True or False")):
        with pytest.raises(ValueError, match=re.escape(f"TransformerConfig.{field} = {value!r}; expected {expected}")):
            TransformerConfig(**{field: value})
    with pytest.raises(ValueError, match="num_decoder_layers = -1; expected >= 0 and >= 1"):
        TransformerConfig(num_decoder_layers=-1)
    assert TransformerConfig(dropout_rate=0, mlp_activations=["gelu", "linear"]).dropout_rate == 0  # int, list: fine
    model = DecoderOnly(TINY_GPT.replace(max_length=8))
    with pytest.raises(ValueError, match="max_length"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 9), jnp.int32))
    with pytest.raises(TypeError, match="integer ids"):
        EncoderDecoder(TINY_T5).init(jax.random.PRNGKey(0), jnp.ones((1, 4)), jnp.ones((1, 4)))


def test_one_token_cache_write_equals_the_scatter():
    """Decoding steps write their one key/value row by a select; it equals the scatter used for longer writes,
    including positions past the last slot (dropped) and bfloat16 caches."""
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        cache = jnp.asarray(rng.standard_normal((4, 6, 2, 3)), dtype)  # [batch, slots, heads, kv]
        new = jnp.asarray(rng.standard_normal((4, 1, 2, 3)), dtype)
        positions = jnp.asarray([[0], [5], [2], [9]], jnp.int32)  # row 3: past the last slot
        got = layers._write_slots(cache, new, positions)
        rows = jnp.arange(4)[:, None]
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(cache.at[rows, positions].set(new), np.float32))
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(cache[3]))
