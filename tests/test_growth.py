"""Model growth (Ko-bert2BERT): FPI keeps the function (encoder-decoder with RMSNorm, decoder-only with LayerNorm,
biases and absolute positions; heads and d_ff by any amount, d_model by a multiple), AKI takes the appended units
from the next layer, stacking copies layers, and impossible growths are named errors."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5k import growth
from t5k.models import DecoderOnly, EncoderDecoder, TransformerConfig, dummy_inputs

SMALL = TransformerConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=24, num_encoder_layers=2,
                          num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          dtype="float32")
GPT = SMALL.replace(num_encoder_layers=0, norm="layer", norm_epsilon=1e-5, use_bias=True, mlp_activations=("gelu",),
                    position_embedding="absolute", max_length=32, scale_attention_logits=True)


def _params(model, seed=0):
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), *dummy_inputs(model, 2, 8))["params"])
    # Biases and norm offsets start at 0 and scales at 1: randomise all, so that every copy rule is exercised.
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in leaves])


def _logits(model, params, rng):
    if isinstance(model, EncoderDecoder):
        return model.apply({"params": params}, rng.integers(2, 64, (3, 9)), rng.integers(2, 64, (3, 6)))
    return model.apply({"params": params}, rng.integers(2, 64, (3, 12)))


@pytest.mark.parametrize("source, scan", [(SMALL, False), (GPT, False), (GPT, True)],
                         ids=["encoder_decoder", "decoder_only", "decoder_only_scanned_target"])
def test_fpi_preserves_the_function(source, scan):
    """d_model doubles (each unit copied twice); heads 2 -> 3 and d_ff 24 -> 40 are not multiples."""
    cls = EncoderDecoder if source.num_encoder_layers else DecoderOnly
    target = source.replace(d_model=32, num_heads=3, d_ff=40, scan_layers=scan)
    params = _params(cls(source))
    grown = growth.grow(cls(source), params, target, "fpi")
    expected_shapes = jax.tree_util.tree_map(lambda x: x.shape, _params(cls(target)))
    assert jax.tree_util.tree_map(lambda x: x.shape, grown) == expected_shapes
    np.testing.assert_allclose(_logits(cls(target), grown, np.random.default_rng(1)),
                               _logits(cls(source), params, np.random.default_rng(1)), rtol=2e-5, atol=2e-5)


def test_fpi_copies_and_divides_by_the_counts():
    """The rule on one kernel, by hand: wo `[mlp, embed]` of d_ff 24 -> 40 (units 0..15 copied twice)."""
    params = _params(EncoderDecoder(SMALL))
    grown = growth.grow(EncoderDecoder(SMALL), params, SMALL.replace(d_ff=40), "fpi")
    old = np.asarray(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # [24, 16]
    new = np.asarray(grown["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # [40, 16]
    np.testing.assert_allclose(new[:16], old[:16] / 2)
    np.testing.assert_allclose(new[16:24], old[16:24])
    np.testing.assert_allclose(new[24:], old[:16] / 2)
    wi = np.asarray(grown["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])  # [16, 40]: output units copied
    np.testing.assert_array_equal(wi[:, 24:], np.asarray(params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])[:, :16])


def test_aki_takes_the_appended_units_from_the_next_layer():
    source, target = SMALL, SMALL.replace(d_model=32, num_heads=3, d_ff=40)
    params = _params(EncoderDecoder(source))
    fpi = growth.grow(EncoderDecoder(source), params, target, "fpi")
    aki = growth.grow(EncoderDecoder(source), params, target, "aki")
    query = lambda tree, layer: np.asarray(tree["encoder"][f"layers_{layer}"]["attention"]["query"]["kernel"])  # noqa
    # [embed, heads, kv]: the input axis (embed) follows FPI; the appended head 2 is layer 1's (FPI-grown) head.
    np.testing.assert_array_equal(query(aki, 0)[:, :2], query(fpi, 0)[:, :2])
    np.testing.assert_array_equal(query(aki, 0)[:, 2:], query(fpi, 1)[:, 2:])
    np.testing.assert_array_equal(query(aki, 1), query(fpi, 1))  # the top layer keeps its own
    scale = lambda tree, layer: np.asarray(tree["decoder"][f"layers_{layer}"]["pre_mlp_norm"]["scale"])  # noqa
    np.testing.assert_array_equal(scale(aki, 0)[16:], scale(fpi, 1)[16:])
    np.testing.assert_array_equal(aki["token_embedder"]["embedding"], fpi["token_embedder"]["embedding"])
    rng = np.random.default_rng(2)
    assert np.abs(np.asarray(_logits(EncoderDecoder(target), aki, rng) -
                             _logits(EncoderDecoder(source), params, np.random.default_rng(2)))).max() > 1e-3


def test_stacking_repeats_the_layers():
    target = SMALL.replace(num_encoder_layers=4, num_decoder_layers=3)
    params = _params(EncoderDecoder(SMALL))
    grown = growth.grow(EncoderDecoder(SMALL), params, target, "fpi")
    assert sorted(grown["encoder"]) == ["final_norm", "layers_0", "layers_1", "layers_2", "layers_3", "relpos_bias"]
    for stack, layers in (("encoder", 4), ("decoder", 3)):
        for i in range(layers):
            for a, b in zip(jax.tree_util.tree_leaves(grown[stack][f"layers_{i}"]),
                            jax.tree_util.tree_leaves(params[stack][f"layers_{i % 2}"])):
                np.testing.assert_array_equal(a, b)
    _logits(EncoderDecoder(target), grown, np.random.default_rng(0))  # the grown tree is the target's


def test_impossible_growths_are_named_errors():
    model, params = EncoderDecoder(SMALL), _params(EncoderDecoder(SMALL))
    cases = [
        (SMALL.replace(d_ff=16), "TransformerConfig.d_ff 24 -> 16; growth only adds"),
        (SMALL.replace(head_dim=16), "must agree: head_dim 8 -> 16"),
        (SMALL.replace(norm="layer"), "must agree: norm 'rms' -> 'layer'"),
    ]
    for target, message in cases:
        with pytest.raises(growth.GrowthError, match=message):
            growth.grow(model, params, target)
    with pytest.raises(growth.GrowthError, match="method 'net2net'; expected one of"):
        growth.grow(model, params, SMALL, "net2net")
    tied = GPT.replace(tie_embeddings=True)
    with pytest.raises(growth.GrowthError, match="tied embedding table cannot grow d_model"):
        growth.grow(DecoderOnly(tied), _params(DecoderOnly(tied)), tied.replace(d_model=32))
    adapted = SMALL.replace(lora_rank=2)
    with pytest.raises(growth.GrowthError, match="merge the LoRA adapters"):
        growth.grow(EncoderDecoder(adapted), _params(EncoderDecoder(adapted)), adapted.replace(d_model=32))
    with pytest.raises(growth.GrowthError, match="do not match the source config"):
        growth.grow(model, _params(DecoderOnly(GPT)), SMALL)
